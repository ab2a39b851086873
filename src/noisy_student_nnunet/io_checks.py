"""Input images checked before use: nnU-Net's file naming, the model's channel count, complete gzip streams.

SimpleITK (nnU-Net's default reader) reads a truncated ``.nii.gz`` without an error: the voxels past the
cut come back as zeros, so a half-copied scan would be predicted or pseudo-labeled with exit status 0.
:func:`check_gzip_stream` decompresses the whole stream (no memory kept) and names the file when its end
marker or checksum is missing. :func:`read_checked` decompresses each stream once for both the check and
SimpleITK's read where it can (a checked ``.nii`` copy in memory). Decompression goes through
Intel's ISA-L (``isal``) where it is installed: the same streams and errors, at about twice zlib's speed
(``benchmarks/bench_case_overheads.py``). The checks raise :class:`CaseError`: multi-case commands report
the case and go on with the others.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from noisy_student_nnunet.errors import CaseError, NsnError, error_message

T = TypeVar("T")
_CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")
_READ_CHUNK = 1 << 20
_COPY_CHUNK = 512 << 10
#: RAM (bytes) that decompressed copies leave available, besides their own size
_COPY_MARGIN = 512 << 20

try:  # Intel ISA-L: gzip streams decompressed about twice as fast as zlib does, with gzip's own errors
    from isal import igzip as _gzip
    from isal.isal_zlib import error as _isal_error

    _ZLIB_ERRORS: tuple[type[BaseException], ...] = (zlib.error, _isal_error)
except ImportError:  # pragma: no cover - isal is a dependency; the standard library reads the same streams
    _gzip = gzip
    _ZLIB_ERRORS = (zlib.error,)


@contextlib.contextmanager
def _gzip_errors(path: str | Path) -> Iterator[None]:
    """gzip's and zlib's exceptions as one CaseError naming ``path`` and what is wrong with it."""
    try:
        yield
    except EOFError:
        raise CaseError(f"{path}: truncated file (its gzip stream ends before the end marker; "
                        f"copy or download it again)") from None
    except gzip.BadGzipFile as error:
        text = error_message(error)
        if text.startswith("Not a gzipped file"):
            raise CaseError(f"{path}: not gzip-compressed although its name ends in .gz") from None
        raise CaseError(f"{path}: corrupt gzip data ({text})") from None
    except _ZLIB_ERRORS as error:
        raise CaseError(f"{path}: corrupt gzip data ({error_message(error)})") from None
    except FileNotFoundError:
        raise CaseError(f"{path}: file not found") from None


def check_gzip_stream(path: str | Path) -> None:
    """Decompress ``path`` to its end (nothing kept); CaseError naming it if the stream is cut or corrupt."""
    with _gzip_errors(path), _gzip.open(path, "rb") as handle:
        while handle.read(_READ_CHUNK):
            pass


def read_gzip_stream(path: str | Path) -> bytes:
    """The whole decompressed content of ``path``, checked as :func:`check_gzip_stream` checks it.

    For readers that can parse bytes (nibabel's ``from_bytes``): the file is read and decompressed once,
    where a check followed by the reader's own read decompresses it twice.
    """
    with _gzip_errors(path), _gzip.open(path, "rb") as handle:
        return handle.read()


def _require_file(path: str | Path) -> None:
    if not Path(path).is_file():
        raise CaseError(f"{path}: file not found")


def _is_gzip(path: str | Path) -> bool:
    return str(path).endswith(".gz")


def check_image_file(path: str | Path) -> None:
    """An input image exists and, if gzip-compressed, is complete."""
    _require_file(path)
    if _is_gzip(path):
        check_gzip_stream(path)


def reads_plain_nifti(reader_class) -> bool:
    """``reader_class`` reads an uncompressed ``.nii`` as it reads the same bytes gzip-compressed: nnU-Net's
    ``SimpleITKIO`` (ITK's NIfTI reader for both, which keeps no file name). nibabel's readers map a ``.nii``
    into memory instead of reading it, so their arrays would live in the temporary file: they read the
    original."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return reader_class is SimpleITKIO


def _uncompressed_size(path: str | Path) -> int:
    """The gzip trailer's ISIZE: the decompressed size modulo 4 GiB (a hint for the room needed, not trusted)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            return int.from_bytes(handle.read(4), "little")
    except OSError:  # shorter than a trailer: the decompression names what is wrong
        return 0


def _cgroup_memory_left() -> int | None:
    """Bytes this process's cgroup (v2) may still charge, where it has a limit: memfd pages count against it."""
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as current:
            text = limit.read().strip()
            return None if text == "max" else int(text) - int(current.read().strip())
    except (OSError, ValueError):
        return None


def _memory_for_copies(needed: int) -> bool:
    """In-memory copies are possible (Linux ``memfd_create``) and ``needed`` bytes fit, with a margin, in the
    available RAM and under a cgroup memory limit."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - no reading of the memory: no copies
        return False
    cgroup = _cgroup_memory_left()
    if cgroup is not None:
        available = min(available, cgroup)
    return available >= needed + _COPY_MARGIN


def _copy_through(source, target, buffer: bytearray) -> None:
    """Copy ``source`` to ``target`` through one reused buffer: fresh chunks at or above glibc's mmap threshold
    (1 MB in the OpenVINO predictor, ``inference/heap.py``) would be mapped and page-faulted anew each time."""
    view = memoryview(buffer)
    while True:
        n = source.readinto(view)
        if not n:
            return
        target.write(view[:n])


@contextlib.contextmanager
def decompressed_niftis(files: Sequence[str | Path]) -> Iterator[list[str] | None]:
    """Paths to read in place of ``files``: each ``.nii.gz`` decompressed once, and so checked whole (end marker
    and checksum; :class:`CaseError` naming it otherwise), into an anonymous in-memory file (``memfd_create``),
    reached through a ``.nii`` link in a private temporary folder; other files as they are. The memory goes back
    when the block ends, or with the process if it is killed (a file in ``/dev/shm`` would stay until a reboot).
    None where that is not possible (not Linux, too little free RAM, a write that fails): the caller then reads
    the originals."""
    streams = [str(path) for path in files if str(path).endswith(".nii.gz")]
    if not _memory_for_copies(sum(_uncompressed_size(path) for path in streams)):
        yield None
        return
    try:
        scratch = tempfile.mkdtemp(prefix="nsn-read-")
    except OSError:  # no temporary folder for the links: read the originals
        yield None
        return
    descriptors: list[int] = []
    buffer = bytearray(_COPY_CHUNK)
    try:
        paths: list[str] | None = []
        for i, path in enumerate(str(f) for f in files):
            if not path.endswith(".nii.gz"):
                paths.append(path)
                continue
            try:
                descriptors.append(os.memfd_create(f"nsn-{os.path.basename(path)}", os.MFD_CLOEXEC))
                with _gzip_errors(path), _gzip.open(path, "rb") as source, \
                        open(descriptors[-1], "wb", closefd=False) as target:
                    _copy_through(source, target, buffer)
                link = os.path.join(scratch, f"{i:04d}_{os.path.basename(path)[:-3]}")
                os.symlink(f"/proc/self/fd/{descriptors[-1]}", link)  # resolved by this process's reader
            except CaseError:
                raise
            except OSError:  # no memory after all, or no link: read the originals
                paths = None
                break
            paths.append(link)
        yield paths
    finally:
        for descriptor in descriptors:
            os.close(descriptor)
        shutil.rmtree(scratch, ignore_errors=True)


def read_checked(files: Sequence[str | Path], num_channels: int, read: Callable[[list[str]], T],
                 expects: str = "the model", reads_plain_nifti: bool = False) -> T:
    """``read(paths)`` for the case's ``files`` once they pass the checks: one file per channel the model was
    trained with, each present and, if gzip-compressed, complete.

    ``reads_plain_nifti`` (see :func:`reads_plain_nifti`): each ``.nii.gz`` is decompressed once, checked, into an
    in-memory ``.nii`` (:func:`decompressed_niftis`) that ``read`` gets instead, so that the reader does not
    decompress the stream a second time (the CPU time of one decompression less per case; the wall time is about
    that of the reader alone either way: ``benchmarks/bench_case_overheads.py``). Otherwise, or where the copies
    cannot be made, the gzip streams are checked in a thread beside ``read(files)``: side by
    side they take about one decompression's time on two cores (zlib, ISA-L and SimpleITK release the GIL).
    Whatever ``read`` returned is used only if the check passes; if both fail, the check's error wins (it names
    the file and what is wrong)."""
    if len(files) != num_channels:
        raise CaseError(f"{files[0] if files else '(no file)'}: case has {len(files)} channel file(s), {expects} "
                        f"expects {num_channels} (_0000 to _{num_channels - 1:04d})")
    for path in files:
        _require_file(path)
    originals = [str(path) for path in files]
    streams = [path for path in originals if _is_gzip(path)]
    if not streams:
        return read(originals)
    if reads_plain_nifti and all(path.endswith(".nii.gz") for path in streams):
        with decompressed_niftis(originals) as copies:  # the streams are checked whole here
            if copies is not None:
                try:
                    return read(copies)
                except Exception:  # noqa: BLE001 - the reader failed on a copy: it reads the original below
                    pass
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsn-gzip-check") as pool:
        checked = pool.submit(lambda: [check_gzip_stream(path) for path in streams])
        try:
            result = read(originals)
        except BaseException:
            checked.result()  # raises the check's CaseError if there is one
            raise
        checked.result()
    return result


def read_images_checked(files: Sequence[str | Path], num_channels: int, reader_class,
                        expects: str = "the model") -> tuple:
    """``reader_class().read_images`` of the case's ``files`` through :func:`read_checked`, each ``.nii.gz``
    decompressed once where the reader takes the plain copy (:func:`reads_plain_nifti`)."""
    return read_checked(files, num_channels, reader_class().read_images, expects, reads_plain_nifti(reader_class))


def check_channels_read(files: Sequence[str | Path], channels_read: int, num_channels: int,
                        expects: str = "the model") -> None:
    """The reader's channel count (a 4D file holds several) equals the model's."""
    if channels_read != num_channels:
        raise CaseError(f"{files[0]}: image has {channels_read} channels, {expects} expects {num_channels}")


def num_input_channels(dataset_json: dict, where: str | Path = "dataset.json") -> int:
    """The number of input channels a model takes: the entries of its dataset.json's ``channel_names``
    (``modality`` in datasets converted from nnU-Net v1). One rule for the predictor and ``nsn pseudolabel``."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise NsnError(f"{where}: no 'channel_names' (or v1 'modality') naming the input channels")
    return len(channels)


def reader_reason(error: BaseException) -> str:
    """The useful part of a reader's message: SimpleITK prefixes ITK's reason with its source location."""
    text = error_message(error)
    match = re.search(r"(?:sitk|itk)::ERROR:\s*(.+)$", text)
    return match.group(1) if match else text


def name_unreadable_file(files: Sequence[str | Path], reader_class, error: BaseException) -> str:
    """A one-line message for a case the reader failed on, naming the file it fails on alone."""
    for path in files:
        try:
            reader_class().read_images([str(path)])
        except Exception as single:  # readers raise many types (RuntimeError from ITK, OSError, ...)
            return f"{path}: cannot read image: {reader_reason(single)}"
    return f"{files[0]}: cannot read case: {reader_reason(error)}"


@dataclass
class InputCases:
    """The cases of an image folder: their files, and the ones that cannot be used (with why)."""

    files: dict[str, list[Path]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def all_ids(self) -> list[str]:
        return sorted(set(self.files) | set(self.problems))

    def part(self, num_parts: int, part_id: int) -> list[str]:
        """nnU-Net's sharding: the sorted cases ``[part_id::num_parts]``."""
        return self.all_ids[part_id::num_parts]


def group_case_files(folder: Path, file_ending: str, num_channels: int, expects: str = "the model") -> InputCases:
    """Group ``CASE_XXXX<ending>`` files by case; a file without the channel suffix, or a case whose channel
    files are not exactly ``_0000`` .. ``_{num_channels - 1}``, becomes a problem naming the file."""
    found: dict[str, dict[int, Path]] = {}
    out = InputCases()
    for path in sorted(Path(folder).iterdir()):
        if not path.name.endswith(file_ending) or path.name.startswith("."):
            continue
        stem = path.name[:-len(file_ending)]
        match = _CHANNEL_RE.match(stem)
        if match is None:
            out.problems[stem] = (f"{path}: not named CASE_XXXX{file_ending} (nnU-Net's 4-digit channel suffix, "
                                  f"_0000 for the first channel, is missing)")
            continue
        found.setdefault(match.group(1), {})[int(match.group(2))] = path
    for case, channels in found.items():
        expected = set(range(num_channels))
        if set(channels) != expected:
            first = channels[min(channels)]
            out.problems[case] = (f"{first}: case {case} has channel files {sorted(channels)}, {expects} expects "
                                  f"{sorted(expected)} (_0000 to _{num_channels - 1:04d})")
        else:
            out.files[case] = [channels[c] for c in range(num_channels)]
    return out


def check_dataset_files(files: Iterable[str | Path], num_workers: int = 4) -> None:
    """Every file of a raw dataset complete (gzip streams checked in parallel; zlib releases the GIL).

    NsnError naming the first bad file (in sorted order) and how many are bad.
    """
    paths = sorted({Path(f) for f in files})
    problems: list[str] = []

    def check(path: Path) -> None:
        try:
            check_image_file(path)
        except CaseError as error:
            problems.append(str(error))

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        list(pool.map(check, paths))
    if problems:
        problems.sort()
        more = f" (and {len(problems) - 1} more bad file(s))" if len(problems) > 1 else ""
        raise NsnError(f"{problems[0]}{more}")

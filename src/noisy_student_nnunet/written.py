"""Files we write are checked before they get their final name: a full disk never leaves a file that looks right.

SimpleITK's ``WriteImage`` (nnU-Net's default writer) does not raise when the disk fills: it prints
``** ERROR: NWAD: wrote only 0 of N bytes`` to stderr and returns, so a rename after it would publish a
truncated or empty label map. blosc2 and ``torch.save`` raise a ``RuntimeError`` that does not say why.
Here every written temporary file is

- flushed to the disk (``fsync``: a file system that allocates late reports a full disk only then), and
- checked cheaply by its type: a ``.nii.gz`` by its gzip trailer (the stream's length, ISIZE, must be the
  header's voxel offset plus voxels x bytes per voxel; the header is the only part decompressed), ``.nii`` by
  its size, ``.npz``/``.pth`` (zip archives) by their central directory, ``.pkl`` by loading it, ``.png`` by its
  end chunk, anything else by its size when the caller knows it.

A failure raises :class:`WriteFailed` (one line: the final file name and the cause, "no space left on device"
when the file system is full), and the caller removes the temporary file, so nothing is left under a final name.
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from noisy_student_nnunet.errors import DISK_FULL_ERRNOS, EXIT_MACHINE_FAULT, NsnError, error_message

_HEADER_BYTES = 4096  # compressed bytes read to decompress a NIfTI header (348 or 540 bytes, plus extensions)


class WriteFailed(NsnError):
    """A file could not be written whole (disk full, quota, a writer that stopped early). Nothing was left under
    its final name; what was complete before stays, and a rerun after freeing space resumes."""

    exit_code = EXIT_MACHINE_FAULT

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}; nothing was written under this name")


def disk_full(folder: str | os.PathLike) -> bool:
    """The file system holding ``folder`` has (almost) no free block left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may write into the reserved blocks
    return free * st.f_frsize < 4 * max(st.f_frsize, 4096)


def _cause(folder: Path, detail: str) -> str:
    return f"no space left on device ({detail})" if disk_full(folder) else detail


@contextmanager
def writing(final: str | os.PathLike) -> Iterator[None]:
    """Around a writer: a full disk or quota (``OSError``), or a writer's ``RuntimeError`` while the file system
    is full (blosc2, torch), becomes :class:`WriteFailed` naming ``final``."""
    final = Path(final)
    try:
        yield
    except WriteFailed:
        raise
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS:
            raise WriteFailed(final, "no space left on device" if error.errno == errno.ENOSPC
                              else (error.strerror or error_message(error)).lower()) from None
        raise
    except RuntimeError as error:
        if disk_full(final.parent):
            raise WriteFailed(final, f"no space left on device ({error_message(error)[:120]})") from None
        raise


def discard(path: str | os.PathLike) -> None:
    """Remove a temporary file, emptying it first: a writer that failed may still hold it open (nibabel's gzip
    stream, kept alive by the exception's traceback), and an open file's blocks are freed only when emptied."""
    try:
        os.truncate(path, 0)
    except OSError:
        pass
    Path(path).unlink(missing_ok=True)


def sync(path: str | os.PathLike) -> None:
    """Flush ``path`` to the disk; a late allocation failure shows here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- per type checks: each raises ValueError saying what is wrong ---------------------------------------------


def _nifti_data_bytes(header: bytes) -> int:
    """Bytes a NIfTI-1/2 file holds (voxel offset + voxels x bytes per voxel), from its header."""
    for endian in "<>":
        (size,) = struct.unpack(endian + "i", header[:4])
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            (bitpix,) = struct.unpack(endian + "h", header[72:74])
            (offset,) = struct.unpack(endian + "f", header[108:112])
            break
        if size == 540 and len(header) >= 540:
            (bitpix,) = struct.unpack(endian + "h", header[14:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            (offset,) = struct.unpack(endian + "q", header[168:176])
            break
    else:
        raise ValueError("no NIfTI header at its start")
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        raise ValueError("its NIfTI header is damaged")
    voxels = 1
    for d in dims[1:dims[0] + 1]:
        voxels *= max(int(d), 1)
    return int(offset) + voxels * bitpix // 8


def _count_gzip_bytes(path: Path) -> int:
    """The whole stream decompressed, counted (only when the trailer disagrees: a multi-member file)."""
    import gzip

    total = 0
    with gzip.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            total += len(chunk)
    return total


def check_nifti_gz(path: Path) -> None:
    size = path.stat().st_size
    if size < 18:
        raise ValueError(f"{size} bytes, not a gzip stream")
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_BYTES)
        handle.seek(size - 4)
        (isize,) = struct.unpack("<I", handle.read(4))
    if head[:2] != b"\x1f\x8b":
        raise ValueError(f"{size} bytes, not a gzip stream")
    try:
        header = zlib.decompressobj(31).decompress(head, 540)
    except zlib.error as error:
        raise ValueError(f"corrupt gzip data ({error})") from None
    expected = _nifti_data_bytes(header)
    if isize == expected % 2**32:
        return
    try:
        if _count_gzip_bytes(path) == expected:
            return
    except (EOFError, OSError, zlib.error):
        pass
    raise ValueError(f"the gzip stream is cut short ({size} bytes on disk; its end does not record the "
                     f"{expected} bytes the header announces)")


def check_nifti(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        expected = _nifti_data_bytes(handle.read(540))
    if size < expected:
        raise ValueError(f"{size} of {expected} bytes")


def check_zip(path: Path) -> None:
    """A zip archive (``.npz``, torch's ``.pth``): its central directory at the end lists members that fit."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    raise ValueError(f"member {info.filename} extends past the end ({size} bytes)")
    except zipfile.BadZipFile as error:
        raise ValueError(f"not a complete zip archive ({error}; {size} bytes)") from None


def check_pickle(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            pickle.load(handle)
    except (EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"does not load back ({error_message(error)})") from None


def check_png(path: Path) -> None:
    with open(path, "rb") as handle:
        start = handle.read(8)
        handle.seek(max(0, path.stat().st_size - 12))
        end = handle.read(12)
    if start != b"\x89PNG\r\n\x1a\n" or end[4:8] != b"IEND":
        raise ValueError("the PNG has no end chunk")


def check_file(tmp: str | os.PathLike, final: str | os.PathLike, size: int | None = None) -> None:
    """Sync ``tmp`` and check it as the type ``final``'s name says; WriteFailed (naming ``final``) if it is not
    whole. ``size``: the byte count the caller wrote (checked for every type)."""
    tmp, final = Path(tmp), Path(final)
    with writing(final):
        sync(tmp)
    name = final.name.lower()
    try:
        if size is not None and tmp.stat().st_size != size:
            raise ValueError(f"{tmp.stat().st_size} of {size} bytes")
        if name.endswith(".nii.gz"):
            check_nifti_gz(tmp)
        elif name.endswith(".nii"):
            check_nifti(tmp)
        elif name.endswith((".npz", ".pth")):
            check_zip(tmp)
        elif name.endswith(".pkl"):
            check_pickle(tmp)
        elif name.endswith(".png"):
            check_png(tmp)
        elif size is None and tmp.stat().st_size == 0:
            raise ValueError("the writer left an empty file")
    except (ValueError, OSError, struct.error) as error:
        raise WriteFailed(final, _cause(final.parent, f"written incompletely: {error_message(error)}")) from None

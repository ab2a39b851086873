"""Where results go: checked before any work, written whole, with the permissions the umask gives.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700 folders whatever the umask, so a file
written through them and renamed into place would be private even on a shared project folder;
:func:`atomic_file` and :func:`publish_dir` give them the mode a plain ``open()`` / ``mkdir()`` would.
"""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from noisy_student_nnunet.errors import NsnError

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it, so briefly and under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """What ``mkdir`` would give a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def _file_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (nothing can be created below it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """``option`` names a file to write: refuse a folder or a path below a regular file, before any work."""
    path = Path(path)
    if path.is_dir():
        raise NsnError(f"{option} {path}: is a folder; name the file to write")
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise NsnError(f"{option} {path}: cannot be created, {blocker} is a file, not a folder")
    return path


def check_output_folder(path: str | os.PathLike, option: str) -> Path:
    """``option`` names a folder to write into: refuse an existing file or a path below one, before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NsnError(f"{option} {path}: is a file, not a folder")
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise NsnError(f"{option} {path}: cannot be created, {blocker} is a file, not a folder")
    return path


@contextmanager
def atomic_file(path: str | os.PathLike, size: int | None = None) -> Iterator[str]:
    """Yield a temporary name next to ``path``; when the block succeeds, check the file (synced, whole for its
    type, ``size`` bytes if given: :func:`~noisy_student_nnunet.written.check_file`), give it the umask's mode and
    rename it to ``path`` (readers never see half a file); when either fails, remove it. A full disk raises
    :class:`~noisy_student_nnunet.written.WriteFailed` naming ``path``."""
    from noisy_student_nnunet.written import check_file, discard, writing

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with writing(path):
            yield tmp
        check_file(tmp, path, size)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to ``path`` whole (on disk and its size checked before the rename) or not at all."""
    with atomic_file(path, size=len(data)) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8, line ends as given) to ``path`` whole or not at all."""
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_dir(path: str | os.PathLike) -> None:
    """Give a folder made by ``tempfile.mkdtemp`` (0700) the mode ``mkdir`` would have given it."""
    os.chmod(path, dir_mode())

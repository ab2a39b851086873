"""One run per output folder: a second run on the same folder is refused, naming the run that holds it.

The lock is ``fcntl.flock`` on a file in the folder, held for the run's lifetime; the file records the holder
(pid, host, command, start time) for the message. A run that dies, even by SIGKILL, loses its lock with its
last open descriptor, so a stale lock file (its holder gone) never blocks a rerun: it is simply taken over.
The file itself stays (removing it while another process opens it would let two runs hold two files).

``run_pipeline.sh`` opens the lock file on a descriptor of its own and lets ``python -m
noisy_student_nnunet.locks`` lock that descriptor: the lock belongs to the open file, which the shell (and
every step it starts) keeps open until the pipeline ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from noisy_student_nnunet.errors import NsnError, run_guarded

LOCK_NAME = ".nsn.lock"


class FolderBusy(NsnError):
    """Another run holds the folder's lock."""


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        record = {}
    if not record:
        return "another process (it has not recorded itself yet)"
    return (f"pid {record.get('pid')} on {record.get('host')} ({record.get('what')}, since "
            f"{record.get('started')})")


def lock_descriptor(fd: int, path: str | os.PathLike, what: str, pid: int | None = None, wait: bool = False) -> None:
    """Lock the open file ``fd`` (the lock file ``path``) for this run, or raise FolderBusy naming the holder
    (``wait``: block until the holder is done instead)."""
    path = Path(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise FolderBusy(f"{path.parent} is in use by {_holder(path)}: wait for that run to end or stop it "
                         f"(lock file {path})") from None
    record = {"pid": pid or os.getpid(), "host": socket.gethostname(), "what": what,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def holder_if_held(path: str | os.PathLike) -> str | None:
    """Who holds the lock file ``path`` now (as FolderBusy names it), or None where no run holds it. Probes by
    taking the lock for an instant: a run that starts at that very instant is refused once and may retry."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(Path(path))
    finally:
        os.close(fd)  # closing releases a lock taken here
    return None


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str, name: str = LOCK_NAME, wait: bool = False) -> Iterator[Path]:
    """Hold ``folder/name`` for the block (``what``: the command, for the message another run prints; ``wait``:
    block while another run holds it, else FolderBusy)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        lock_descriptor(fd, path, what, wait=wait)
        yield path
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """``python -m noisy_student_nnunet.locks FD LOCKFILE PID WHAT``: lock the caller's open descriptor FD."""
    args = sys.argv[1:] if argv is None else argv
    fd, path, pid, what = int(args[0]), args[1], int(args[2]), " ".join(args[3:])
    return run_guarded(what, lambda: lock_descriptor(fd, path, what, pid))


if __name__ == "__main__":
    sys.exit(main())

"""User-facing errors and how every command reports them.

Commands raise :class:`NsnError` with a one-line message that names the offending file or option;
the console scripts (``nsn``, ``nnUNetv2_predict_lowfootprint``) print ``PROG: error: MESSAGE`` and
exit with status 2, never a traceback. A file the operating system refuses to read or write
(``OSError``: permission, disk full, a path below a regular file) is reported the same way, with its
name. ``NSN_DEBUG=1`` adds the traceback, for bug reports.

Exit status of every command: 0 success; 1 some cases of a multi-case command failed (each named,
the others finished); 2 a usage error or bad input that stopped the command before its work;
3 a fault of the machine stopped it (disk full, a written file that did not verify): what was complete
stays, free space and rerun the same command to resume; 130 interrupted.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable

DEBUG_ENV = "NSN_DEBUG"
EXIT_FAILED_CASES = 1
EXIT_USAGE = 2
EXIT_MACHINE_FAULT = 3
EXIT_INTERRUPTED = 130


class NsnError(Exception):
    """A user-facing error: bad input, missing file, invalid option. The message is one line."""

    exit_code = EXIT_USAGE  #: subclasses for faults of the machine exit with EXIT_MACHINE_FAULT


class CaseError(NsnError):
    """A problem with one case of a multi-case command (its message names the file): the case is
    reported and skipped, the other cases go on."""


def one_line(text: object) -> str:
    """``text`` as one line: upstream messages (SimpleITK, nnU-Net) often put the file name on the
    second line, so lines are joined rather than cut."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines)


def error_message(error: BaseException) -> str:
    """One line for ``error``: its message, or its type when it has none."""
    return one_line(error) or type(error).__name__


def debug_enabled() -> bool:
    """``NSN_DEBUG`` set to anything but empty or 0: show tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


#: errnos of a full disk, a full quota or a file over the size limit: a machine fault (exit 3), not the user's input
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _os_error_message(error: OSError) -> str:
    reason = error.strerror or error_message(error)
    names = [str(n) for n in (error.filename, error.filename2) if n is not None]
    return f"{reason}: {' -> '.join(names)}" if names else reason


def run_guarded(prog: str, func: Callable[[], int | None]) -> int:
    """Run a command's body; turn user-facing errors into one line on stderr and an exit status."""
    try:
        return int(func() or 0)
    except NsnError as error:
        return _fail(prog, error_message(error), error.exit_code)
    except OSError as error:
        full = error.errno in DISK_FULL_ERRNOS
        return _fail(prog, _os_error_message(error), EXIT_MACHINE_FAULT if full else EXIT_USAGE)
    except MemoryError:
        return _fail(prog, "out of memory (see the command's help for size options)", EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(prog: str, message: str, code: int) -> int:
    if debug_enabled():
        traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code

"""One exception type for user-facing errors.

Commands raise :class:`NsnError` with a one-line message that names the offending file or option;
``nsn`` prints it and exits with status 2, never a traceback.
"""


class NsnError(Exception):
    """A user-facing error: bad input, missing file, invalid option. The message is one line."""

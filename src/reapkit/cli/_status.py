"""Exit statuses of the ``reapkit`` command and the error that means "bad usage"."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments: reported as one line, exit status 2."""

"""Exit statuses of the ``reapkit`` command and the error that means "bad usage"."""

from __future__ import annotations

from .._errors import Unsupported

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

#: The extra that installs what only the interactive commands need (``top``, ``demo`` and the
#: table of ``plugins``): the daemon runs without it.
CLI_EXTRA = "reapkit[cli]"
_CLI_EXTRA_PACKAGES = frozenset({"rich"})


class UsageError(Exception):
    """Bad arguments: reported as one line, exit status 2."""


def extra_missing(command: str, exc: ModuleNotFoundError, hint: str = "") -> Unsupported | None:
    """The error naming the extra to install when ``exc`` is a package of :data:`CLI_EXTRA`
    missing (exit status 3), else ``None``."""
    package = (exc.name or "").partition(".")[0]
    if package not in _CLI_EXTRA_PACKAGES:
        return None
    return Unsupported(
        package,
        f"'reapkit {command}' needs it, and the extra {CLI_EXTRA} installs it:"
        f" pip install '{CLI_EXTRA}'{hint}",
    )

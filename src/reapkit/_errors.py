"""reapkit's exceptions.

Each one subclasses the built-in exception it refines (attrs' ``FrozenError(AttributeError)``
idea), so ``except ProcessLookupError`` or ``except PermissionError`` in a caller's code keeps
working. A vanishing process is normal on Linux, not an error to shout about: code that walks
``/proc`` catches :class:`NoSuchProcess` and moves on.
"""

from __future__ import annotations

import errno as _errno


class ReapkitError(Exception):
    """The base of every error reapkit raises on purpose."""


class PolicyError(ReapkitError, ValueError):
    """An invalid policy: names the file, the key path and what was expected."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


class _OSErrorWithMessage(ReapkitError, OSError):
    """An ``OSError`` whose ``str()`` is the message alone, without ``[Errno N]``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NoSuchProcess(_OSErrorWithMessage, ProcessLookupError):
    """The process is gone (exited and reaped), or never existed."""

    def __init__(self, pid: int, detail: str = "") -> None:
        self.pid = pid
        super().__init__(_errno.ESRCH, f"process {pid} no longer exists{detail}")


class ProcessChanged(NoSuchProcess):
    """The PID now belongs to another process (PID reuse): the one we meant is gone.

    Detected by comparing the start time (``/proc/<pid>/stat`` field 22, in clock ticks since
    boot) with the one recorded when the process was selected.
    """

    def __init__(self, pid: int, expected_start: int, found_start: int) -> None:
        self.expected_start = expected_start
        self.found_start = found_start
        super().__init__(
            pid,
            f" (PID reused: started at tick {found_start}, the selected process at tick"
            f" {expected_start})",
        )


class AccessDenied(_OSErrorWithMessage, PermissionError):
    """Reading or signalling a process is not permitted to this reaper."""

    def __init__(self, pid: int | None, what: str) -> None:
        self.pid = pid
        super().__init__(_errno.EACCES, f"permission denied: {what}")


class ProcFormatError(ReapkitError, ValueError):
    """A ``/proc`` file did not have the format the kernel documents (truncated or garbled)."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        super().__init__(f"{path}: {detail}")


class Unsupported(_OSErrorWithMessage):
    """This kernel, or this process's privileges, lack a feature; the message names it."""

    def __init__(self, feature: str, hint: str, code: int = _errno.ENOSYS) -> None:
        self.feature = feature
        super().__init__(code, f"{feature} is not available: {hint}")


class NotDying(_OSErrorWithMessage):
    """``process_mrelease`` refused: the target has no fatal signal pending, or it shares its
    memory with a live process (vfork, ``CLONE_VM``).

    Only SIGKILL reliably makes a process reapable. A SIGTERM it handles never does; one at
    its default disposition does only when the kernel turns it into a group exit at delivery,
    which depends on the victim's state at that instant (a frozen task usually misses it).
    """

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        who = f"process {pid}" if pid is not None else "the process"
        super().__init__(
            _errno.EINVAL,
            f"process_mrelease refused: {who} is not dying (it needs SIGKILL first, SIGTERM is"
            " not enough) or shares its memory with a live process",
        )


class InvalidValue(ReapkitError, ValueError):
    """A configuration value (duration, size, PSI trigger, ...) that cannot be used.

    The message names the value and what was expected; the policy loader adds the file and
    the key path.
    """

"""Process identity: a PID, its start time, and a pidfd opened before any signal is sent.

A PID alone is a name that the kernel hands to the next process once the old one is reaped.
Two things together make a kill hit the process that was chosen:

* the pidfd: signals sent through it reach that process or nobody, never a successor;
* the start time (``/proc/<pid>/stat`` field 22): compared with the one recorded at selection,
  it tells whether the PID still names the process that was chosen, before a pidfd is even
  opened and again before each signal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
from types import TracebackType

import attrs
import trio

from ._errors import AccessDenied, NoSuchProcess, ProcessChanged
from ._kernel._syscalls import pidfd_open, pidfd_send_signal
from ._procfs import ProcFS

_DEFAULT_PROCFS = ProcFS()


def pidfd_pid(pidfd: int) -> int:
    """The PID a pidfd names, from ``/proc/self/fdinfo`` (``-1`` once the process was reaped).

    Always the real ``/proc``: the descriptor is this process's own.
    """
    with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise ValueError(f"fd {pidfd} is not a pidfd")


def _still_ours(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` still holds its PID (not yet waited for).

    Signal 0 looks the task up first and checks permission second: ``EPERM`` also proves that
    the process exists.
    """
    try:
        pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@attrs.define(eq=False, repr=False)
class ProcessRef:
    """A process pinned by PID, start time and pidfd. Create with :meth:`open`.

    Close it (or use it as a context manager) when done: the pidfd is a file descriptor.
    """

    pid: int = attrs.field(on_setattr=attrs.setters.frozen)
    #: Clock ticks since boot at which the process started (``/proc/<pid>/stat`` field 22).
    start_time: int = attrs.field(on_setattr=attrs.setters.frozen)
    _pidfd: int
    _procfs: ProcFS

    @classmethod
    def open(
        cls, pid: int, *, start_time: int | None = None, procfs: ProcFS | None = None
    ) -> ProcessRef:
        """Pin process ``pid``.

        With ``start_time`` (what selection saw), raise :class:`ProcessChanged` if the PID now
        belongs to a different process. Raises :class:`NoSuchProcess` if it is gone.
        """
        procfs = procfs or _DEFAULT_PROCFS
        try:
            fd = pidfd_open(pid)
        except ProcessLookupError:
            raise NoSuchProcess(pid) from None
        try:
            found = procfs.stat(pid).start_time
            # The stat was read by PID. If our process was reaped and the PID reused between
            # pidfd_open and that read, it describes the successor: check the pidfd's process
            # still holds the PID *after* the read, so the start time is really its own.
            if not _still_ours(fd):
                raise NoSuchProcess(pid)
            if start_time is not None and found != start_time:
                raise ProcessChanged(pid, start_time, found)
        except BaseException:
            os.close(fd)
            raise
        return cls(pid, found, fd, procfs)

    @classmethod
    def unpinned(cls, pid: int, start_time: int, procfs: ProcFS) -> ProcessRef:
        """A reference without a pidfd, for dry runs on fake ``/proc`` trees (a guard on such
        a tree never signals). It cannot signal or wait: it is closed from the start."""
        return cls(pid, start_time, -1, procfs)

    @property
    def closed(self) -> bool:
        return self._pidfd < 0

    def fileno(self) -> int:
        """The pidfd. Valid until :meth:`close`."""
        if self._pidfd < 0:
            raise ValueError(f"{self!r} is closed")
        return self._pidfd

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` through the pidfd, after checking that the PID still names this process.

        Raises :class:`ProcessChanged` if the PID was reused, :class:`NoSuchProcess` if the
        process was reaped, :class:`AccessDenied` without permission to signal it (``CAP_KILL``).
        Signalling a zombie is a harmless no-op. Use :class:`reapkit.KillGuard` rather than
        calling this directly: the guard decides *whether* to signal.
        """
        fd = self.fileno()
        found = self._procfs.stat(self.pid).start_time
        if found != self.start_time:
            raise ProcessChanged(self.pid, self.start_time, found)
        owner = pidfd_pid(fd)
        if owner == -1:
            raise NoSuchProcess(self.pid)
        if owner != self.pid:
            # Only a hand-built ref can get here: the guard checked self.pid, so the signal
            # must not go to whatever the descriptor names.
            raise ValueError(f"{self!r}: its pidfd names process {owner}, not {self.pid}")
        try:
            pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            raise NoSuchProcess(self.pid) from None
        except PermissionError:
            raise AccessDenied(self.pid, f"signalling process {self.pid} needs CAP_KILL") from None

    def has_exited(self) -> bool:
        """Whether the process has exited (it may still be a zombie). Never blocks."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def wait(self) -> None:
        """Wait, without a timeout, until the process has exited (the pidfd becomes readable),
        as ``trio.Process.wait`` does. Costs nothing while waiting: the pidfd sits in trio's
        epoll set. (``reapkit.lowlevel.wait_exit(ref, timeout=)`` answers whether it exited in
        time.)"""
        await trio.lowlevel.wait_readable(self.fileno())

    #: The old name of :meth:`wait`.
    wait_exit = wait

    def close(self) -> None:
        """Close the pidfd. Safe to call twice. Wakes any task waiting on it with
        ``trio.ClosedResourceError``, as trio does for its own fds."""
        fd, self._pidfd = self._pidfd, -1
        if fd < 0:
            return
        with contextlib.suppress(RuntimeError):  # outside a trio run nobody can be waiting
            trio.lowlevel.notify_closing(fd)
        try:
            os.close(fd)
        except OSError as exc:  # pragma: no cover - only EBADF from a double close elsewhere
            if exc.errno != errno.EBADF:
                raise

    def __enter__(self) -> ProcessRef:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Like trio's _FdHolder: an unclosed reference must not leak its descriptor.
        if getattr(self, "_pidfd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = -1

    def __repr__(self) -> str:
        state = "closed" if self._pidfd < 0 else f"pidfd={self._pidfd}"
        return f"<ProcessRef pid={self.pid} start_time={self.start_time} {state}>"

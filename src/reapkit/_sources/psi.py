"""PSI triggers (Documentation/accounting/psi.rst) as a trio event source.

A trigger is armed by writing ``"some|full <threshold_us> <window_us>"`` *with a trailing NUL*
to ``/proc/pressure/<resource>`` or a cgroup v2 ``<resource>.pressure``; the kernel then
signals the fd with ``POLLPRI`` at most once per window when the stall exceeds the threshold.

Traps (``shared/KERNEL_NOTES.md``): a PSI fd always polls readable, so trio's own epoll (which
asks only for ``EPOLLIN``) would spin. Each trigger gets a private epoll that waits for
``EPOLLPRI``, and trio waits for *that* epoll's fd: it wakes exactly when the trigger fires.
The readiness check itself consumes the event, so the wake is the event. A removed cgroup
makes the fd report ``EPOLLERR`` for good: the watch ends with :class:`PressureWatchEnded`.

Where triggers cannot be armed (old kernel, no permission) the source polls the file once per
window and fires when the stall total grew by the threshold within it — the trigger's own rule,
so a policy means the same either way; such events say ``origin="poll"``.
"""

from __future__ import annotations

import errno
import os
import select
from typing import Literal

import attrs
import trio

from .._errors import InvalidValue, Unsupported
from .._kernel._probe import effective_capabilities
from .._units import PsiSpec
from ._base import SourceStatistics, owned_epoll, owned_fd


@attrs.frozen
class PressureLine:
    """One line of a pressure file: averages in percent, total stall in microseconds."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@attrs.frozen
class PressureSnapshot:
    """A pressure file as read: its ``some`` line and, where present, its ``full`` line."""

    some: PressureLine
    #: ``None`` where the file has no ``full`` line (system-wide cpu before Linux 5.13).
    full: PressureLine | None

    def line(self, kind: Literal["some", "full"]) -> PressureLine | None:
        return self.some if kind == "some" else self.full


def parse_pressure(data: bytes) -> PressureSnapshot:
    """Parse ``some avg10=0.00 avg60=0.00 avg300=0.00 total=4040`` (+ a ``full`` line)."""
    lines: dict[str, PressureLine] = {}
    try:
        for raw in data.decode("ascii").splitlines():
            kind, *fields = raw.split()
            values = dict(f.split("=", 1) for f in fields)
            lines[kind] = PressureLine(
                float(values["avg10"]),
                float(values["avg60"]),
                float(values["avg300"]),
                int(values["total"]),
            )
        return PressureSnapshot(lines["some"], lines.get("full"))
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise InvalidValue(f"not a pressure file: {data[:80]!r}") from exc


@attrs.frozen
class PressureEvent:
    """A trigger fired: the stall exceeded the threshold within the window."""

    timestamp: float
    spec: PsiSpec
    #: The pressure file as read right after the trigger fired (``None`` if it could not be).
    snapshot: PressureSnapshot | None
    #: ``"trigger"``: the kernel's notification; ``"poll"``: the polling fallback.
    origin: Literal["trigger", "poll"]


@attrs.frozen
class PressureWatchEnded:
    """The watch ended for good: the cgroup it watched was removed."""

    timestamp: float
    spec: PsiSpec
    reason: str


@attrs.frozen
class PsiStatistics(SourceStatistics):
    #: ``"trigger"`` or ``"poll"`` once running, ``None`` before.
    mode: str | None


@attrs.define
class PsiTriggerSource:
    """Watch one PSI trigger. ``mode="auto"`` arms a kernel trigger, or polls where it cannot."""

    spec: PsiSpec
    mode: Literal["auto", "trigger", "poll"] = "auto"
    #: Windows must be multiples of 2 s; ``None``: decided from ``CAP_SYS_RESOURCE``.
    unprivileged_only: bool | None = None
    _events: int = attrs.field(default=0, init=False)
    _wakeups: int = attrs.field(default=0, init=False)
    _running_mode: str | None = attrs.field(default=None, init=False)

    def statistics(self) -> PsiStatistics:
        return PsiStatistics(f"psi {self.spec}", self._events, self._wakeups, self._running_mode)

    async def run(
        self,
        send: trio.MemorySendChannel[PressureEvent | PressureWatchEnded],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send an event each time the trigger fires, until cancelled or the cgroup is gone.

        Raises (before ``started``) :class:`InvalidValue` for a window the kernel would refuse
        here, :class:`Unsupported` if the pressure file does not exist.
        """
        async with send:
            unprivileged = self.unprivileged_only
            if unprivileged is None:
                unprivileged = not effective_capabilities()["CAP_SYS_RESOURCE"]
            if self.mode != "poll":
                self.spec.check_window(unprivileged_only=unprivileged)
            fd = self._arm() if self.mode != "poll" else None
            if fd is None:
                await self._poll(send, task_status)
            else:
                await self._watch(fd, send, task_status)

    def _arm(self) -> int | None:
        """Open the pressure file and write the trigger; ``None`` to fall back to polling."""
        path = self.spec.path
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Unsupported(f"PSI for '{self.spec}'", f"{path} does not exist") from None
        except PermissionError:
            self._cannot_arm(f"{path} is not writable")
            return None
        try:
            os.write(fd, self.spec.trigger_string())
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EINVAL:
                raise InvalidValue(
                    f"PSI trigger '{self.spec}': the kernel refused it (EINVAL); windows must be"
                    " within 500ms..10s, multiples of 2s without CAP_SYS_RESOURCE"
                ) from None
            self._cannot_arm(f"writing the trigger failed: {exc.strerror}")
            return None
        return fd

    def _cannot_arm(self, why: str) -> None:
        if self.mode == "trigger":
            raise Unsupported(f"PSI trigger '{self.spec}'", why, errno.EOPNOTSUPP)

    async def _watch(
        self,
        fd: int,
        send: trio.MemorySendChannel[PressureEvent | PressureWatchEnded],
        task_status: trio.TaskStatus[None],
    ) -> None:
        with owned_fd(fd), owned_epoll(fd, select.EPOLLPRI) as ep:
            self._running_mode = "trigger"
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(ep.fileno())
                self._wakeups += 1
                now = trio.current_time()
                if any(mask & select.EPOLLERR for _fd, mask in ep.poll(0)):
                    await send.send(PressureWatchEnded(now, self.spec, "the cgroup was removed"))
                    return
                try:
                    snapshot: PressureSnapshot | None = parse_pressure(os.pread(fd, 4096, 0))
                except (OSError, InvalidValue):
                    snapshot = None
                self._events += 1
                await send.send(PressureEvent(now, self.spec, snapshot, "trigger"))

    async def _poll(
        self,
        send: trio.MemorySendChannel[PressureEvent | PressureWatchEnded],
        task_status: trio.TaskStatus[None],
    ) -> None:
        previous = self._read_total()
        if previous is None:
            raise Unsupported(f"PSI for '{self.spec}'", f"{self.spec.path} cannot be read")
        self._running_mode = "poll"
        task_status.started()
        while True:
            await trio.sleep(self.spec.window)
            self._wakeups += 1
            now = trio.current_time()
            read = self._read_snapshot()
            if read is None:
                await send.send(PressureWatchEnded(now, self.spec, f"{self.spec.path} is gone"))
                return
            line = read.line(self.spec.kind)
            total = line.total_us if line else 0
            if total - previous >= self.spec.threshold_us:
                self._events += 1
                await send.send(PressureEvent(now, self.spec, read, "poll"))
            previous = total

    def _read_snapshot(self) -> PressureSnapshot | None:
        try:
            with open(self.spec.path, "rb") as f:
                return parse_pressure(f.read())
        except (OSError, InvalidValue):
            return None

    def _read_total(self) -> int | None:
        snapshot = self._read_snapshot()
        if snapshot is None:
            return None
        line = snapshot.line(self.spec.kind)
        return line.total_us if line else 0

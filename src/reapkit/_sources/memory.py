"""Memory thresholds: MemAvailable, SwapFree and cgroup usage, sampled as often as headroom asks.

Sampling adapts like earlyoom's (``kill.c``: sleep in proportion to how far memory is from the
line), but reacts faster near it: the interval is the headroom divided by an assumed fill rate
(``fill_rate``, 10 GiB/s by default: faster than one core can fault in fresh pages), clamped to
``[min_interval, max_interval]`` = [2 ms, 1 s] where earlyoom uses [100 ms, 1 s]. While
MemAvailable is above half of RAM and every line is below half, the interval is
``max_interval``: at most one wakeup a second.

Hysteresis: a threshold fires once when it is crossed (``state="crossed"``) and re-arms only
after the value is back past the line by ``hysteresis`` (``state="recovered"``): one crossing,
one event, however long memory stays low (plus a ``still-crossed`` reminder every
``reminder`` seconds).

The headroom is measured from whichever side the value is on: to the line while armed, to the
re-arming point (line + hysteresis) while crossed. So the sampler never goes blind after a
crossing: when a kill frees memory, the recovery is seen within the interval the headroom
asked for, and a new crossing after it within milliseconds, not at the next reminder.

For cgroup v2 thresholds the kernel also notifies changes of ``memory.events`` (``high``,
``max``, ``oom`` counters) with ``EPOLLPRI``; such a change wakes the sampler at once.

With ``lead`` above 0, an armed threshold whose headroom shrank since the sample before, fast
enough to reach the line within ``lead`` seconds at that rate, sends ``state="approaching"``
(at most every ``lead / 8`` seconds): the engine prepares its ranking then, so that at the
crossing only the best few candidates need a fresh read (see docs/architecture.md).
"""

from __future__ import annotations

import math
import os
import select
from collections.abc import Iterable
from contextlib import ExitStack
from typing import Final, Literal

import attrs
import trio

from .._errors import InvalidValue, Unsupported
from .._procfs import MemInfo, ProcFS
from .._units import Size, parse_size
from ._base import SourceStatistics, owned_epoll, owned_fd

Metric = Literal["mem_available", "swap_free", "cgroup_usage"]
GiB: Final = 1 << 30


@attrs.frozen
class MemoryThreshold:
    """``mem_available`` / ``swap_free``: fires when the value falls *below* ``line`` (bytes or
    percent of MemTotal / SwapTotal). ``cgroup_usage``: fires when the usage of the memory
    cgroup directory ``cgroup`` rises *above* ``line`` (bytes or percent of its limit)."""

    metric: Metric
    line: Size
    cgroup: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.metric == "cgroup_usage") != (self.cgroup is not None):
            raise InvalidValue(f"memory threshold {self.metric}: 'cgroup' goes with cgroup_usage")

    def __str__(self) -> str:
        if self.metric == "cgroup_usage":
            return f"usage of {self.cgroup} above {self.line}"
        return f"{self.metric} below {self.line}"


@attrs.frozen
class MemoryEvent:
    """A threshold was crossed (or recovered), with the sampled value and the line."""

    timestamp: float
    threshold: MemoryThreshold
    #: ``"crossed"``: the condition now holds (once per crossing); ``"still-crossed"``: it still
    #: holds (every ``reminder`` seconds); ``"recovered"``: back past the line + hysteresis;
    #: ``"gone"``: the cgroup was removed, this watch ended; ``"approaching"``: not crossed,
    #: but at the rate it moved since the sample before it will be within the source's ``lead``.
    state: Literal["crossed", "still-crossed", "recovered", "gone", "approaching"]
    #: Bytes: MemAvailable, SwapFree or the cgroup's usage, as sampled.
    value: int
    #: The line in bytes, resolved against ``total``.
    line: int
    #: MemTotal, SwapTotal or the cgroup's limit (MemTotal when unlimited).
    total: int


@attrs.frozen
class MemoryStatistics(SourceStatistics):
    #: The sampling interval chosen last, in seconds.
    interval: float
    #: Wakeups caused by a cgroup v2 ``memory.events`` notification.
    notifications: int


@attrs.frozen
class _Sample:
    value: int
    total: int


class CgroupMemoryFiles:
    """Usage and limit of a memory cgroup directory, v1 or v2."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        if os.path.exists(os.path.join(directory, "memory.current")):
            self.version, usage, limit = 2, "memory.current", "memory.max"
        elif os.path.exists(os.path.join(directory, "memory.usage_in_bytes")):
            self.version, usage, limit = 1, "memory.usage_in_bytes", "memory.limit_in_bytes"
        else:
            raise Unsupported(
                f"memory cgroup {directory}",
                "it has no memory.current or memory.usage_in_bytes",
            )
        self.usage_path = os.path.join(directory, usage)
        self.limit_path = os.path.join(directory, limit)
        self.events_path = os.path.join(directory, "memory.events") if self.version == 2 else None

    def sample(self, mem_total: int) -> _Sample:
        usage = int(_read_small(self.usage_path))
        raw = _read_small(self.limit_path).strip()
        # v2 writes "max"; v1 writes a huge page-rounded number for "unlimited".
        limit = mem_total if raw == b"max" else min(int(raw), mem_total)
        return _Sample(usage, limit)


def _read_small(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 64)
    finally:
        os.close(fd)


def _as_thresholds(value: Iterable[MemoryThreshold]) -> tuple[MemoryThreshold, ...]:
    return tuple(value)


@attrs.define
class MemoryThresholdSource:
    """Sample the thresholds and send a :class:`MemoryEvent` at each crossing and recovery."""

    thresholds: tuple[MemoryThreshold, ...] = attrs.field(converter=_as_thresholds)
    procfs: ProcFS = attrs.field(factory=ProcFS)
    #: Re-arm once the value is back past the line by this much (of the threshold's total).
    hysteresis: Size = attrs.field(factory=lambda: parse_size("1%"))
    fill_rate: float = 10 * GiB
    #: While a line stays crossed, a ``still-crossed`` event this often (seconds).
    reminder: float = 1.0
    min_interval: float = 0.002
    max_interval: float = 1.0
    #: Send ``approaching`` when the line is this many seconds away at the rate the headroom
    #: shrank since the sample before (0: never).
    lead: float = 0.0
    _events: int = attrs.field(default=0, init=False)
    _wakeups: int = attrs.field(default=0, init=False)
    _notifications: int = attrs.field(default=0, init=False)
    _interval: float = attrs.field(default=math.nan, init=False)

    def statistics(self) -> MemoryStatistics:
        names = "; ".join(str(t) for t in self.thresholds)
        return MemoryStatistics(
            f"memory {names}", self._events, self._wakeups, self._interval, self._notifications
        )

    async def run(
        self,
        send: trio.MemorySendChannel[MemoryEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with send:
            cgroups = {
                t.cgroup: CgroupMemoryFiles(t.cgroup)
                for t in self.thresholds
                if t.cgroup is not None
            }
            armed = [True] * len(self.thresholds)
            reminded = [-math.inf] * len(self.thresholds)
            #: Per threshold: (time, headroom) of the sample before, while armed.
            before: list[tuple[float, float] | None] = [None] * len(self.thresholds)
            announced = [-math.inf] * len(self.thresholds)
            gone: set[int] = set()
            with ExitStack() as stack:
                event_watches = self._watch_memory_events(stack, cgroups.values())
                task_status.started()
                while True:
                    now = trio.current_time()
                    meminfo = self.procfs.meminfo()
                    headrooms: list[float] = []
                    for i, threshold in enumerate(self.thresholds):
                        if i in gone:
                            continue
                        try:
                            sample = self._sample(threshold, meminfo, cgroups)
                        except (FileNotFoundError, ProcessLookupError, OSError):
                            # The cgroup was removed: end this watch, keep the others.
                            gone.add(i)
                            self._events += 1
                            await send.send(MemoryEvent(now, threshold, "gone", 0, 0, 0))
                            continue
                        event, headroom = self._step(threshold, sample, armed, i, now)
                        if event is None and not armed[i] and now - reminded[i] >= self.reminder:
                            # Still beyond the line: remind, so a rule that could not act on
                            # the crossing (cooldown, a victim dying) gets another chance.
                            line = threshold.line.resolve(sample.total)
                            event = MemoryEvent(
                                now, threshold, "still-crossed", sample.value, line, sample.total
                            )
                        if (
                            event is None
                            and armed[i]
                            and self._approaching(before[i], now, headroom, announced[i])
                        ):
                            announced[i] = now
                            line = threshold.line.resolve(sample.total)
                            event = MemoryEvent(
                                now, threshold, "approaching", sample.value, line, sample.total
                            )
                        before[i] = (now, headroom) if armed[i] else None
                        headrooms.append(headroom)
                        if event is not None:
                            if event.state in ("crossed", "still-crossed"):
                                reminded[i] = now
                            self._events += 1
                            await send.send(event)
                    self._interval = self._next_interval(meminfo, headrooms)
                    await self._sleep(self._interval, event_watches)
                    self._wakeups += 1

    def _approaching(
        self, before: tuple[float, float] | None, now: float, headroom: float, announced: float
    ) -> bool:
        """Whether the line is within ``lead`` seconds at the rate the headroom shrank since
        the sample ``before`` (and the last ``approaching`` is ``lead / 8`` old)."""
        if self.lead <= 0 or before is None or now <= before[0] or now - announced < self.lead / 8:
            return False
        rate = (before[1] - headroom) / (now - before[0])  # bytes per second, toward the line
        return rate > 0 and headroom <= rate * self.lead

    def _watch_memory_events(
        self, stack: ExitStack, cgroups: Iterable[CgroupMemoryFiles]
    ) -> list[tuple[int, select.epoll]]:
        """The cgroups' ``memory.events`` files, each watched for the kernel's change
        notification (``EPOLLPRI``): ``(fd, epoll)`` pairs, closed by ``stack``."""
        watches = []
        for files in cgroups:
            if files.events_path and os.path.exists(files.events_path):
                fd = stack.enter_context(owned_fd(os.open(files.events_path, os.O_RDONLY)))
                os.read(fd, 4096)  # a read marks the current state as seen
                ep = stack.enter_context(owned_epoll(fd, select.EPOLLPRI))
                watches.append((fd, ep))
        return watches

    async def _sleep(self, interval: float, event_watches: list[tuple[int, select.epoll]]) -> None:
        if not event_watches:
            await trio.sleep(interval)
            return
        with trio.move_on_after(interval):
            async with trio.open_nursery() as nursery:

                async def wake_on(fd: int, ep: select.epoll) -> None:
                    await trio.lowlevel.wait_readable(ep.fileno())
                    os.pread(fd, 4096, 0)  # re-arm: kernfs compares against the last read
                    self._notifications += 1
                    nursery.cancel_scope.cancel()

                for fd, ep in event_watches:
                    nursery.start_soon(wake_on, fd, ep)

    def _sample(
        self, threshold: MemoryThreshold, meminfo: MemInfo, cgroups: dict[str, CgroupMemoryFiles]
    ) -> _Sample:
        if threshold.metric == "mem_available":
            return _Sample(meminfo.available, meminfo.total)
        if threshold.metric == "swap_free":
            return _Sample(meminfo.swap_free, meminfo.swap_total)
        assert threshold.cgroup is not None
        return cgroups[threshold.cgroup].sample(meminfo.total)

    def _step(
        self,
        threshold: MemoryThreshold,
        sample: _Sample,
        armed: list[bool],
        i: int,
        now: float,
    ) -> tuple[MemoryEvent | None, float]:
        """Advance threshold ``i``'s state; returns (an event or None, headroom in bytes)."""
        line = threshold.line.resolve(sample.total)
        margin = self.hysteresis.resolve(sample.total)
        if threshold.metric == "cgroup_usage":
            distance = line - sample.value  # usage rising toward the line
        elif sample.total == 0:
            distance = -1  # no swap at all counts as "below the line", as in earlyoom
        else:
            distance = sample.value - line
        event = None
        if armed[i] and distance <= 0:
            armed[i] = False
            event = MemoryEvent(now, threshold, "crossed", sample.value, line, sample.total)
        elif not armed[i] and distance > margin:
            armed[i] = True
            event = MemoryEvent(now, threshold, "recovered", sample.value, line, sample.total)
        if sample.total == 0:
            return event, math.inf  # no swap at all: nothing can move
        # Armed: bytes until the line. Crossed: bytes until the re-arming point, which a kill
        # can bring close at once; a re-crossing after it must be seen as fast as the first.
        return event, distance if armed[i] else margin - distance

    def _next_interval(self, meminfo: MemInfo, headrooms: list[float]) -> float:
        # Idle (one wakeup a second) only while memory is plentiful *and* every line is far
        # below it: a line above half of RAM (a large machine, a line set just under the
        # current MemAvailable) must be watched by its headroom like any other.
        half = meminfo.total // 2
        if meminfo.available >= half and all(
            (t.metric == "mem_available" and t.line.resolve(meminfo.total) < half)
            or t.metric == "swap_free"
            for t in self.thresholds
        ):
            return self.max_interval
        seconds = min(headrooms, default=math.inf) / self.fill_rate
        return min(self.max_interval, max(self.min_interval, seconds))

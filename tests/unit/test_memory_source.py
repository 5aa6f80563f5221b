"""The memory-threshold source against fake /proc trees and cgroup files (autojump clock)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
import trio.testing

from reapkit import InvalidValue
from reapkit._sources.memory import MemoryEvent, MemoryThreshold, MemoryThresholdSource
from reapkit._units import parse_size
from reapkit.lowlevel import ProcFS
from reapkit.testing import FakeProc

GiB = 1 << 30
MiB = 1 << 20


async def _collect(
    source: MemoryThresholdSource, steps: list[tuple[float, object]]
) -> list[MemoryEvent]:
    """Run the source; at each (delay, action) sleep then call action(); return events."""
    send, receive = trio.open_memory_channel[MemoryEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        for delay, action in steps:
            await trio.sleep(delay)
            action()  # type: ignore[operator]
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    # The source closed its end on cancellation. Reminders are tested on their own below.
    return [event async for event in receive if event.state != "still-crossed"]


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path / "proc")
    proc.set_meminfo(total=16 * GiB, available=12 * GiB)
    return proc


async def test_one_crossing_one_event_with_hysteresis(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    line = MemoryThreshold("mem_available", parse_size("10%"))  # 1.6 GiB
    source = MemoryThresholdSource([line], procfs=ProcFS(fake.root))

    def available(n: int) -> object:
        return lambda: fake.set_meminfo(total=16 * GiB, available=n)

    events = await _collect(
        source,
        [
            (5, available(1 * GiB)),  # crossed
            (5, available(int(1.5 * GiB))),  # still below: nothing
            (5, available(1690 * MiB)),  # above the 1638 MiB line, within 1 % hysteresis: nothing
            (5, available(3 * GiB)),  # recovered
            (5, available(1 * GiB)),  # crossed again
        ],
    )
    assert [(e.state, e.value) for e in events] == [
        ("crossed", 1 * GiB),
        ("recovered", 3 * GiB),
        ("crossed", 1 * GiB),
    ]
    assert events[0].line == int(1.6 * GiB) and events[0].total == 16 * GiB


async def test_sampling_adapts_to_headroom(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    source = MemoryThresholdSource(
        [MemoryThreshold("mem_available", parse_size("1GiB"))], procfs=ProcFS(fake.root)
    )
    send, _receive = trio.open_memory_channel[MemoryEvent](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        await trio.sleep(10.5)
        # Above half of RAM: one wakeup a second, no more.
        assert source.statistics().wakeups == 10
        assert source.statistics().interval == 1.0
        fake.set_meminfo(total=16 * GiB, available=1 * GiB + 20 * MiB)
        await trio.sleep(1.5)
        # 20 MiB from the line: 20 MiB / 10 GiB/s = 2 ms, the floor.
        assert source.statistics().interval == pytest.approx(0.002)
        fake.set_meminfo(total=16 * GiB, available=1 * GiB + 500 * MiB)
        await trio.sleep(0.1)
        assert source.statistics().interval == pytest.approx(500 / 10240, rel=0.01)
        nursery.cancel_scope.cancel()


async def test_no_swap_counts_as_below_like_earlyoom(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    source = MemoryThresholdSource(
        [MemoryThreshold("swap_free", parse_size("10%"))], procfs=ProcFS(fake.root)
    )
    events = await _collect(source, [])
    assert [(e.state, e.total) for e in events] == [("crossed", 0)]


@pytest.mark.parametrize("version", [1, 2])
async def test_cgroup_usage_v1_and_v2(
    fake: FakeProc, tmp_path: Path, version: int, autojump_clock: trio.testing.MockClock
) -> None:
    cg = tmp_path / "cg"
    cg.mkdir()
    usage, limit = (
        ("memory.usage_in_bytes", "memory.limit_in_bytes")
        if version == 1
        else ("memory.current", "memory.max")
    )
    (cg / usage).write_text(f"{100 * MiB}\n")
    (cg / limit).write_text(f"{400 * MiB}\n")
    threshold = MemoryThreshold("cgroup_usage", parse_size("50%"), cgroup=str(cg))
    source = MemoryThresholdSource([threshold], procfs=ProcFS(fake.root))
    events = await _collect(
        source,
        [
            (3, lambda: (cg / usage).write_text(f"{250 * MiB}\n")),
            (3, lambda: (cg / usage).write_text(f"{50 * MiB}\n")),
        ],
    )
    assert [(e.state, e.value, e.line) for e in events] == [
        ("crossed", 250 * MiB, 200 * MiB),
        ("recovered", 50 * MiB, 200 * MiB),
    ]


async def test_unlimited_v2_cgroup_uses_mem_total(
    fake: FakeProc, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    (tmp_path / "memory.current").write_text(f"{9 * GiB}\n")
    (tmp_path / "memory.max").write_text("max\n")
    threshold = MemoryThreshold("cgroup_usage", parse_size("50%"), cgroup=str(tmp_path))
    events = await _collect(MemoryThresholdSource([threshold], procfs=ProcFS(fake.root)), [])
    assert [(e.state, e.total) for e in events] == [("crossed", 16 * GiB)]


def test_cgroup_goes_with_cgroup_usage() -> None:
    with pytest.raises(InvalidValue, match="cgroup"):
        MemoryThreshold("mem_available", parse_size("5%"), cgroup="/x")
    with pytest.raises(InvalidValue, match="cgroup"):
        MemoryThreshold("cgroup_usage", parse_size("5%"))


async def test_still_crossed_reminders_while_below_the_line(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    source = MemoryThresholdSource(
        [MemoryThreshold("mem_available", parse_size("10%"))], procfs=ProcFS(fake.root)
    )
    send, receive = trio.open_memory_channel[MemoryEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        fake.set_meminfo(total=16 * GiB, available=1 * GiB)
        await trio.sleep(5.5)
        nursery.cancel_scope.cancel()
    states = [e.state async for e in receive]
    assert states[0] == "crossed" and set(states[1:]) == {"still-crossed"}
    assert 4 <= len(states) - 1 <= 6  # about one a second


async def test_a_removed_cgroup_ends_its_watch_only(
    fake: FakeProc, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.current").write_text("0\n")
    (cg / "memory.max").write_text("max\n")
    thresholds = [
        MemoryThreshold("cgroup_usage", parse_size("50%"), cgroup=str(cg)),
        MemoryThreshold("mem_available", parse_size("10%")),
    ]
    source = MemoryThresholdSource(thresholds, procfs=ProcFS(fake.root))
    events = await _collect(
        source,
        [
            (2, lambda: [p.unlink() for p in cg.iterdir()]),
            (2, lambda: fake.set_meminfo(total=16 * GiB, available=1 * GiB)),
        ],
    )
    assert [(e.state, e.threshold.metric) for e in events] == [
        ("gone", "cgroup_usage"),
        ("crossed", "mem_available"),
    ]


async def test_a_line_above_half_of_ram_is_watched_by_its_headroom(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    # MemAvailable 12 GiB of 16: plentiful, but the line (10 GiB) is above half: a fast
    # allocator would cross it between two once-a-second samples.
    line = MemoryThreshold("mem_available", parse_size("10GiB"))
    source = MemoryThresholdSource([line], procfs=ProcFS(fake.root))
    send, _receive = trio.open_memory_channel[MemoryEvent](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        await trio.sleep(0.5)
        assert source.statistics().interval == pytest.approx(2 / 10)  # 2 GiB at 10 GiB/s
        nursery.cancel_scope.cancel()


async def test_a_recrossing_after_a_kill_is_seen_at_once_not_at_the_reminder(
    fake: FakeProc, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A kill loop: a cgroup crosses its line, a kill frees memory, it crosses again 0.3 s
    # later. The sampler must not sleep its longest interval while the line is crossed.
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(f"{512 * MiB}\n")
    (cg / "memory.usage_in_bytes").write_text(f"{100 * MiB}\n")
    threshold = MemoryThreshold("cgroup_usage", parse_size("256MiB"), cgroup=str(cg))
    source = MemoryThresholdSource([threshold], procfs=ProcFS(fake.root))
    send, receive = trio.open_memory_channel[MemoryEvent](1000)
    changes: list[tuple[float, int]] = []

    def usage(n: int) -> None:
        changes.append((trio.current_time(), n))
        (cg / "memory.usage_in_bytes").write_text(f"{n}\n")

    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        await trio.sleep(1.5)
        for _ in range(3):
            usage(400 * MiB)  # crossed, 144 MiB past the line
            await trio.sleep(0.05)  # the rule decides and kills
            usage(30 * MiB)  # the victim's memory is back
            await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    events = [e async for e in receive]
    assert [e.state for e in events] == ["crossed", "recovered"] * 3
    for event, (changed, value) in zip(events, changes, strict=True):
        assert event.value == value
        # seen within the interval the headroom asks for (tens of ms), not the 1 s reminder
        assert event.timestamp - changed < 0.05


async def _falling(
    fake: FakeProc, source: MemoryThresholdSource, rate: int, until: int
) -> list[MemoryEvent]:
    """MemAvailable from 4 GiB down by ``rate`` bytes a second (a step each 10 ms) to
    ``until``, held there 2 s; every event the source sent."""
    send, receive = trio.open_memory_channel[MemoryEvent](1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        await trio.sleep(1.5)
        value = 4 * GiB
        while value > until:
            value = max(until, value - rate // 100 // 1024 * 1024)
            fake.set_meminfo(total=16 * GiB, available=value)
            await trio.sleep(0.01)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    return [e async for e in receive]


async def test_a_line_approaching_fast_is_announced_before_it_is_crossed(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    fake.set_meminfo(total=16 * GiB, available=4 * GiB)
    line = MemoryThreshold("mem_available", parse_size("10%"))  # 1.6 GiB
    source = MemoryThresholdSource([line], procfs=ProcFS(fake.root), lead=0.5)
    events = await _falling(fake, source, 1 * GiB, 1 * GiB)
    states = [e.state for e in events if e.state != "still-crossed"]
    first = states.index("approaching")
    assert (
        first < states.index("crossed") and "approaching" not in states[states.index("crossed") :]
    )
    early = events[first]
    # Announced within the lead at the rate seen (1 GiB/s: 0.5 GiB above the line), not earlier.
    assert early.value - early.line <= GiB // 2
    # At most one announcement per lead / 8 of the clock.
    times = [e.timestamp for e in events if e.state == "approaching"]
    assert all(b - a >= 0.5 / 8 for a, b in itertools.pairwise(times))


async def test_steady_or_slow_memory_is_not_approaching(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    fake.set_meminfo(total=16 * GiB, available=4 * GiB)
    line = MemoryThreshold("mem_available", parse_size("10%"))
    source = MemoryThresholdSource([line], procfs=ProcFS(fake.root), lead=0.5)
    # Down to 0.4 GiB above the line at 100 MiB/s: the line stays 4 s away, then still.
    events = await _falling(fake, source, 100 * MiB, 2 * GiB)
    assert events == []


async def test_no_announcement_without_a_lead(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    fake.set_meminfo(total=16 * GiB, available=4 * GiB)
    line = MemoryThreshold("mem_available", parse_size("10%"))
    source = MemoryThresholdSource([line], procfs=ProcFS(fake.root))
    events = await _falling(fake, source, 1 * GiB, 1 * GiB)
    assert [e.state for e in events if e.state != "still-crossed"] == ["crossed"]

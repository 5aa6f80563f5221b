"""The memory-threshold source on a real memory cgroup with a real hog."""

from __future__ import annotations

import pytest
import trio

from reapkit._sources.memory import MemoryEvent, MemoryThreshold, MemoryThresholdSource
from reapkit._testing._hog import start_hog, start_pulser
from reapkit._units import parse_size
from reapkit.testing import SandboxCgroup

from ..conftest import MiB

pytestmark = pytest.mark.kernel


async def test_a_real_crossing_fires_once_and_recovery_once(memory_cgroup: SandboxCgroup) -> None:
    memory_cgroup.set_memory_limit(256 * MiB)
    threshold = MemoryThreshold(
        "cgroup_usage", parse_size("100MiB"), cgroup=memory_cgroup.directory
    )
    source = MemoryThresholdSource([threshold])
    send, receive = trio.open_memory_channel[MemoryEvent](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        with trio.fail_after(30):
            hog = await trio.to_thread.run_sync(start_hog, 160 * MiB, [memory_cgroup.directory])
            with hog:
                crossed = await receive.receive()
                await trio.sleep(1.5)  # the hog keeps its memory: no second crossing
                while True:
                    try:
                        event = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    assert event.state == "still-crossed"  # reminders only
            recovered = await receive.receive()
            while recovered.state == "still-crossed":
                recovered = await receive.receive()
        nursery.cancel_scope.cancel()
    assert crossed.state == "crossed" and crossed.value >= 100 * MiB
    assert crossed.total == 256 * MiB
    assert recovered.state == "recovered" and recovered.value < 100 * MiB
    assert source.statistics().events >= 2


async def test_a_recrossing_after_recovery_is_a_new_crossing_not_a_reminder(
    memory_cgroup: SandboxCgroup,
) -> None:
    # After a crossing the sampler used to sleep its longest interval (1 s): memory freed
    # and taken again within that second went unseen, and the rule acted on the reminder.
    memory_cgroup.set_memory_limit(256 * MiB)
    threshold = MemoryThreshold(
        "cgroup_usage", parse_size("100MiB"), cgroup=memory_cgroup.directory
    )
    source = MemoryThresholdSource([threshold])
    send, receive = trio.open_memory_channel[MemoryEvent](100)
    with start_pulser([memory_cgroup.directory]) as hog:
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            with trio.fail_after(30):
                await trio.to_thread.run_sync(hog.hold, 160 * MiB)
                first = await receive.receive()
                freed_at = trio.current_time()
                await trio.to_thread.run_sync(hog.hold, 0)  # what a kill does to the usage
                await trio.sleep(0.1)
                await trio.to_thread.run_sync(hog.hold, 160 * MiB)  # within the 1 s reminder
                after: list[MemoryEvent] = []
                while not after or after[-1].state == "recovered":
                    event = await receive.receive()
                    if event.timestamp >= freed_at:
                        after.append(event)
            nursery.cancel_scope.cancel()
    assert first.state == "crossed"
    # In trio clock order: the recovery, then the second crossing as a crossing of its own.
    assert [e.state for e in after] == ["recovered", "crossed"]
    assert after[1].value >= 100 * MiB

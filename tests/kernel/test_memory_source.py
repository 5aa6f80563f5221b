"""The memory-threshold source on a real memory cgroup with a real hog."""

from __future__ import annotations

import pytest
import trio

from reapkit._hog import start_hog
from reapkit._sandbox import SandboxCgroup
from reapkit._sources.memory import MemoryEvent, MemoryThreshold, MemoryThresholdSource
from reapkit._units import parse_size

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

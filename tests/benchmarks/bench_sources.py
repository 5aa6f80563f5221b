"""Event sources: idle wakeups, and time from a real memory-threshold crossing to its event.

The crossing is watched independently by a separate process that reads the cgroup's usage
every ~0.2 ms and prints the CLOCK_MONOTONIC time it first saw the line crossed; the source's
event carries ``trio.current_time()``, the same clock. The hog allocates as fast as it can.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

import trio

from reapkit._demo import MiB
from reapkit._hog import start_hog
from reapkit._sandbox import SandboxCgroup
from reapkit._sources.memory import MemoryEvent, MemoryThreshold, MemoryThresholdSource
from reapkit._sources.proc_connector import ProcConnectorSource
from reapkit._sources.psi import PsiTriggerSource
from reapkit._units import parse_psi, parse_size

IDLE_SECONDS = 10.0
REPEATS = 7
LINE = 256 * MiB

_WATCHER = r"""
import sys, time
path, line = sys.argv[1], int(sys.argv[2])
print("watching", flush=True)
while True:
    with open(path, "rb") as f:
        if int(f.read()) >= line:
            print(time.monotonic(), flush=True)
            break
    time.sleep(0.0002)
"""


async def _idle_wakeups() -> list[tuple[str, float]]:
    psi = [PsiTriggerSource(parse_psi(f"memory {k} 100ms/2s")) for k in ("some", "full")]
    memory = MemoryThresholdSource([MemoryThreshold("mem_available", parse_size("5%"))])
    connector = ProcConnectorSource()
    send, receive = trio.open_memory_channel[object](10_000)
    async with trio.open_nursery() as nursery:
        for source in psi:
            await nursery.start(source.run, send.clone())
        await nursery.start(memory.run, send.clone())
        if os.geteuid() == 0:
            await nursery.start(connector.run, send.clone())
        await trio.sleep(IDLE_SECONDS)
        nursery.cancel_scope.cancel()
    del receive
    sources: list[Any] = [*psi, memory] + ([connector] if os.geteuid() == 0 else [])
    return [(s.statistics().name, s.statistics().wakeups / IDLE_SECONDS) for s in sources]


async def _crossing_latency(cgroup: SandboxCgroup) -> float:
    usage = os.path.join(cgroup.directory, "memory.usage_in_bytes")
    if not os.path.exists(usage):
        usage = os.path.join(cgroup.directory, "memory.current")
    threshold = MemoryThreshold("cgroup_usage", parse_size(LINE), cgroup=cgroup.directory)
    source = MemoryThresholdSource([threshold])
    send, receive = trio.open_memory_channel[MemoryEvent](10)
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, usage, str(LINE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "watching"
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            await trio.sleep(1.2)  # settle into the idle interval, as in real life
            hog = await trio.to_thread.run_sync(start_hog, 512 * MiB, [cgroup.directory])
            with hog:
                event = await receive.receive()
            nursery.cancel_scope.cancel()
        crossed_at = float(watcher.stdout.readline())
        # trio's clock has a random offset from CLOCK_MONOTONIC (on purpose): convert.
        offset = time.monotonic() - trio.current_time()
    finally:
        watcher.kill()
        watcher.wait()
        if watcher.stdout is not None:
            watcher.stdout.close()
    return (event.timestamp + offset - crossed_at) * 1000


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


async def _main() -> str:
    idle = await _idle_wakeups()
    latencies: list[float] = []
    if os.geteuid() == 0:
        for _ in range(REPEATS):
            with SandboxCgroup.create("memory", prefix="reapkit-bench") as cgroup:
                cgroup.set_memory_limit(768 * MiB)
                latencies.append(await _crossing_latency(cgroup))
    lines = [
        "## Event sources",
        "",
        f"Wakeups per second of each source over {IDLE_SECONDS:.0f} s on an idle machine"
        " (PSI: kernel trigger wakeups; memory: sampler wakeups, MemAvailable well above half;"
        " proc connector: wakeups for process events, which on an idle machine come only from"
        " what else runs on it).",
        "",
        "| source | wakeups/s |",
        "|---|---:|",
        *(f"| {name} | {rate:.2f} |" for name, rate in idle),
        "",
    ]
    if latencies:
        lines += [
            f"Time from a real crossing of a cgroup usage line ({LINE // MiB} MiB) to the memory"
            " source's event, for a 512 MiB hog allocating as fast as it can in a 768 MiB"
            " cgroup; the crossing seen by an independent process polling every ~0.2 ms."
            f" Milliseconds, median (min-max) of {REPEATS}; the watcher's own resolution is"
            " ~0.2-0.3 ms, so the source can see the crossing first (a small negative value)."
            " earlyoom's floor for the same is its 100 ms minimum sampling interval. A"
            " system-wide MemAvailable line is sampled once a second while MemAvailable is above"
            " half of RAM (the idle-wakeup goal), so there the first sample below half bounds"
            " how late a very fast allocator can be seen.",
            "",
            "| crossing -> event, ms |",
            "|---:|",
            f"| {_fmt(latencies)} |",
        ]
    return "\n".join(lines)


def run() -> str:
    return trio.run(_main)


if __name__ == "__main__":
    print(run())

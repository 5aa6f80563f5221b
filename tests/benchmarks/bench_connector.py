"""Proc connector throughput: a fork/exec/exit storm from every core, the ProcessTable served.

Each run starts one ``sh -c 'while :; do /bin/true; done'`` per CPU inside a sandbox memory
cgroup (256 MiB) and a pids cgroup (64 tasks), serves a :class:`~reapkit._table.ProcessTable`
(default 8 MiB receive buffer) for the duration, stops the storm by removing the cgroup, lets
the table settle and compares it with a fresh ``/proc`` scan. The storm's own rate comes from
the ``processes`` line of ``/proc/stat`` (forks since boot), measured in the same run, and once
without any listener (the kernel skips the proc events when nobody subscribed).
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Iterator

import attrs
import trio

from reapkit._table import ProcessTable
from reapkit.testing import SandboxCgroup

from ..conftest import live_pids

RUNS = 3
RUN_SECONDS = 10.0
ALONE_SECONDS = 3.0
#: Capacity runs: the trio loop is blocked this long while the storm fills the socket buffer
#: (16 MiB holds about 20,000 datagrams: ~3 s of storm here), then the backlog is drained.
BACKLOG_SECONDS = 1.2
SETTLE_SECONDS = 0.5
TITLE = "## Proc connector throughput"

# The child joins both cgroups ($1, $2: their cgroup.procs) before the loop starts.
_STORM = 'echo $$ > "$1" && echo $$ > "$2" && while :; do /bin/true; done'


@attrs.frozen
class RunResult:
    seconds: float
    forks: int  # on the whole machine, from /proc/stat
    events_at_stop: int  # applied by the table while the storm ran
    events_total: int  # ... and after the settle
    overruns: int
    resyncs: int
    cpu_seconds: float  # this process (the table and its source): user + system
    matched: bool
    mismatch: str


def _forks_since_boot() -> int:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"processes "):
                return int(line.split()[1])
    raise RuntimeError("no processes line in /proc/stat")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _compare(table: ProcessTable, attempts: int = 5) -> tuple[bool, str]:
    """Scan A, table T, scan B: A∩B ⊆ T ⊆ A∪B (the rest of the machine keeps moving)."""
    detail = ""
    for _ in range(attempts):
        before = live_pids()
        await trio.sleep(0.05)
        seen = set(table.pids())
        after = live_pids()
        missing, extra = (before & after) - seen, seen - (before | after)
        if not missing and not extra:
            return True, ""
        detail = f"missing {len(missing)}, extra {len(extra)}"
        await trio.sleep(0.2)
    return False, detail


@contextlib.contextmanager
def _storm(n: int) -> Iterator[tuple[SandboxCgroup, list[subprocess.Popen[bytes]]]]:
    memory = SandboxCgroup.create("memory", prefix="reapkit-bench")
    try:
        pids = SandboxCgroup.create("pids", prefix="reapkit-bench")
        try:
            memory.set_memory_limit(256 << 20)
            with open(os.path.join(pids.directory, "pids.max"), "w") as f:
                f.write("64")
            procs = [os.path.join(c.directory, "cgroup.procs") for c in (memory, pids)]
            children: list[subprocess.Popen[bytes]] = []
            try:
                for _ in range(n):
                    # stderr: sh reports "Killed" for the /bin/true killed with it at the end.
                    argv = ["sh", "-c", _STORM, "sh", *procs]
                    children.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
                yield memory, children
            finally:
                memory.remove()  # kills every member through its pidfd
                for child in children:
                    child.kill()  # in case it had not joined yet: our own child, by its pid
                    child.wait(10)
        finally:
            pids.remove()
    finally:
        memory.remove()


async def _one_run(seconds: float) -> RunResult:
    async with trio.open_nursery() as nursery:
        table: ProcessTable = await nursery.start(ProcessTable().serve)
        with _storm(os.cpu_count() or 2) as (memory, _children):
            start_events = table.statistics().events_seen
            forks = _forks_since_boot()
            cpu = _cpu_seconds()
            started = time.monotonic()
            await trio.sleep(seconds)
            at_stop = table.statistics().events_seen
            memory.remove()
            elapsed = time.monotonic() - started
            forks = _forks_since_boot() - forks
            cpu = _cpu_seconds() - cpu
        await trio.sleep(SETTLE_SECONDS)
        matched, mismatch = await _compare(table)
        stats = table.statistics()
        nursery.cancel_scope.cancel()
    return RunResult(
        seconds=elapsed,
        forks=forks,
        events_at_stop=at_stop - start_events,
        events_total=stats.events_seen - start_events,
        overruns=stats.overruns,
        resyncs=stats.resyncs,
        cpu_seconds=cpu,
        matched=matched,
        mismatch=mismatch,
    )


async def _drain_capacity(block: float) -> tuple[int, float, int]:
    """Events drained from a backlog, the CPU seconds the draining took, overruns."""
    async with trio.open_nursery() as nursery:
        table: ProcessTable = await nursery.start(ProcessTable().serve)
        with _storm(os.cpu_count() or 2) as (memory, _children):
            time.sleep(block)  # noqa: ASYNC251 - on purpose: nothing reads the socket meanwhile
            memory.remove()
        # No checkpoint since the storm started: everything it sent is still in the socket.
        start_events = table.statistics().events_seen
        cpu = _cpu_seconds()
        while True:
            before = table.statistics().events_seen
            await trio.sleep(0.05)
            if table.statistics().events_seen == before:
                break
        cpu = _cpu_seconds() - cpu
        stats = table.statistics()
        nursery.cancel_scope.cancel()
    return stats.events_seen - start_events, cpu, stats.overruns


def _storm_alone(seconds: float) -> float:
    """Processes created per second by the storm with nobody listening."""
    with _storm(os.cpu_count() or 2) as (memory, _children):
        forks = _forks_since_boot()
        started = time.monotonic()
        time.sleep(seconds)
        memory.remove()
        elapsed = time.monotonic() - started
        return (_forks_since_boot() - forks) / elapsed


def _fmt(values: list[float], spec: str = ",.0f") -> str:
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def run() -> str:
    if os.geteuid() != 0:
        return f"{TITLE}\n\nSkipped: needs root (sandbox cgroups for the storm)."
    results = [trio.run(_one_run, RUN_SECONDS) for _ in range(RUNS)]
    alone = _storm_alone(ALONE_SECONDS)
    drains = [trio.run(_drain_capacity, BACKLOG_SECONDS) for _ in range(RUNS)]
    capacity = [events / cpu for events, cpu, _ in drains]
    per_event = [1e6 * cpu / events for events, cpu, _ in drains]
    drain_lost = sum(lost for _, _, lost in drains)
    rows = [
        f"| {i} | {r.forks / r.seconds:,.0f} | {r.events_at_stop / r.seconds:,.0f}"
        f" | {r.events_total - r.events_at_stop:,} | {r.overruns} | {r.resyncs}"
        f" | {100 * r.cpu_seconds / r.seconds:.0f} %"
        f" | {'yes' if r.matched else 'NO: ' + r.mismatch} |"
        for i, r in enumerate(results, 1)
    ]
    handled = [r.events_at_stop / r.seconds for r in results]
    storm = [r.forks / r.seconds for r in results]
    lost = sum(r.overruns for r in results)
    return "\n".join(
        [
            TITLE,
            "",
            f"A fork/exec/exit storm (one `sh -c 'while :; do /bin/true; done'` per CPU, in"
            f" sandbox cgroups) for {RUN_SECONDS:.0f} s while a `ProcessTable` is served with"
            " the default 8 MiB receive buffer; then the storm is stopped and, after"
            f" {SETTLE_SECONDS} s, the table is compared with a fresh `/proc` scan."
            f" {RUNS} runs. Events are process events applied by the table (fork, exec, exit);"
            " the storm rate is forks on the whole machine (`/proc/stat` `processes`) per"
            " second. Reader CPU is this process's user + system time (the table, its source"
            " and the trio loop) as a share of one CPU.",
            "",
            f"- **events/s handled: {_fmt(handled)}** (median, min-max), events lost: {lost}",
            f"- storm while listening: {_fmt(storm)} processes/s;"
            f" the same storm with nobody listening: {alone:,.0f} processes/s",
            f"- capacity: **{_fmt(capacity)} events per CPU-second**"
            f" ({_fmt(per_event, '.1f')} µs of CPU per event) draining a backlog of"
            f" {_fmt([float(e) for e, _, _ in drains])} events left in the socket while the"
            f" trio loop was blocked for {BACKLOG_SECONDS} s of storm; lost: {drain_lost}."
            " The storm on this machine cannot produce more than its fork rate x 3 events/s:"
            " the capacity is what one CPU can handle.",
            "",
            "| run | storm processes/s | events/s handled | backlog at stop (events) |"
            " lost (ENOBUFS) | resyncs | reader CPU | table = scan |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    print(run())

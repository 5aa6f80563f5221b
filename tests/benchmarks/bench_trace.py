"""Traces: what ``reapkit record`` costs and writes, with 1,000 processes on the machine.

1,000 sleeping processes (``sleep``, in a scope cgroup created here, as in the reaction
benchmark) beside the machine's own. The recorder runs in a process of its own for
``SECONDS``, ``REPEATS`` times per mode:

* *as here*: its intervals as they follow this machine's headroom (plenty of memory: a
  ``mem`` sample a second, a process snapshot every 10 s);
* *densest*: as if memory were nearly gone — a ``mem`` sample every 10 ms, a snapshot every
  second (the lower bounds of the intervals), the most a recording ever costs.

Measured: the trace's size per minute (gzip-compressed, as written), the recorder's CPU time
per second of recording (``time.process_time`` around it: user + system, all its threads; the
interpreter's start-up left out), its peak RSS
(``VmHWM``, read by the recorder's process at its end), and the processes each snapshot held.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

from .bench_reaction import _scope

SECONDS = 20.0
REPEATS = 3
SLEEPERS = 1_000
MODES = {"as here": "", "densest": "1e15"}
#: The bound docs/replay.md#record states, at 1,000 processes: trace size per minute and the
#: recorder's share of one core, at the densest rate and as here; its peak RSS.
BOUND_KIB_PER_MIN = 1024
BOUND_CPU = {"densest": 0.15, "as here": 0.02}
BOUND_RSS_MIB = 50

_RECORD = r"""
import sys, trio
from reapkit._recorder import Recorder
from reapkit._trace import TraceWriter
rate = float(sys.argv[3]) if sys.argv[3] else None
kw = {"mem_fill_rate": rate, "snapshot_fill_rate": rate} if rate else {}
recorder = Recorder(TraceWriter(sys.argv[1]), **kw)
async def main():
    with trio.move_on_after(float(sys.argv[2])):
        await recorder.run()
import time
cpu = time.process_time()
trio.run(main)
cpu = time.process_time() - cpu
s = recorder.statistics()
with open("/proc/self/status") as f:  # VmHWM: this program's peak, not the fork's before exec
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
print(s.snapshots, s.processes, s.lines_written, s.lines_dropped, hwm, cpu, flush=True)
"""


def _record(path: str, rate: str) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _RECORD, path, str(SECONDS), rate],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _pid, status, _usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"the recorder failed ({proc.returncode})")
    *counts, cpu = out.split()
    snapshots, processes, lines, dropped, hwm_kib = map(int, counts)
    return {
        "kib_per_min": os.stat(path).st_size / 1024 * 60 / SECONDS,
        "cpu": float(cpu) / SECONDS,
        "rss_mib": hwm_kib / 1024,
        "snapshots": snapshots,
        "processes": processes,
        "lines_per_s": lines / SECONDS,
        "dropped": dropped,
    }


def _cell(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def run() -> str:
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with _scope(SLEEPERS), tempfile.TemporaryDirectory(prefix="reapkit-bench-trace-") as tmp:
        for i in range(REPEATS):
            for mode, rate in MODES.items():  # interleaved
                path = os.path.join(tmp, f"{i}-{mode.replace(' ', '-')}.trace")
                results[mode].append(_record(path, rate))
    lines = [
        "## Traces (`reapkit record`) {#traces}",
        "",
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        f"{SLEEPERS:,} sleepers in scope, {SECONDS:g} s per run, {REPEATS} runs per mode,"
        " median (min-max):",
        "",
        "| mode | trace KiB/min | recorder CPU (share of a core) | peak RSS MiB | processes"
        " per snapshot | snapshots | lines/s | lines lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, runs in results.items():

        def col(key: str, fmt: str, runs: list[dict[str, float]] = runs) -> str:
            return _cell([r[key] for r in runs], fmt)

        lines.append(
            f"| {mode} | {col('kib_per_min', '.0f')} | {col('cpu', '.3f')} | "
            f"{col('rss_mib', '.1f')} | {col('processes', '.0f')} | {col('snapshots', '.0f')} |"
            f" {col('lines_per_s', '.0f')} | {col('dropped', '.0f')} |"
        )

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    size = max(median(mode, "kib_per_min") for mode in MODES)
    rss = max(median(mode, "rss_mib") for mode in MODES)
    cpu = {mode: median(mode, "cpu") for mode in MODES}
    within = (
        size <= BOUND_KIB_PER_MIN
        and rss <= BOUND_RSS_MIB
        and all(cpu[mode] <= BOUND_CPU[mode] for mode in MODES)
    )
    lines += [
        "",
        f"The bound [docs/replay.md](replay.md#record) states, with {SLEEPERS:,} processes: at"
        f" most {BOUND_KIB_PER_MIN:,} KiB of trace per minute, {BOUND_RSS_MIB} MiB resident,"
        f" {BOUND_CPU['densest']:.0%} of one core at the densest rate and"
        f" {BOUND_CPU['as here']:.0%} as here. Measured: {size:.0f} KiB/min, {rss:.1f} MiB,"
        f" {cpu['densest']:.1%} and {cpu['as here']:.1%}:"
        f" {'within' if within else '**outside**'}.",
    ]
    return "\n".join(lines)

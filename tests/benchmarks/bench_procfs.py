"""Per-process cost of reading what victim selection needs from the real /proc.

Run: ``PYTHONPATH=src python tests/benchmarks/bench_procfs.py``. ``run()`` returns a Markdown
section. Compared:

(a) the floor: two bare ``os.open`` + ``os.read`` + ``os.close`` of ``/proc/<pid>/statm`` with
    the paths built in advance, i.e. the syscalls of two small reads and nothing else;
(b) ``ProcFS.process_info(pid)``: two reads (``stat``, ``oom_score``), parsing, one record;
(c) ``ProcFS.stat(pid)``: one read, the full ``stat`` record;
(d) bare reads of the two files (b) reads, ``stat`` + ``oom_score``: (b) minus (d) is the Python
    cost (parsing, record), (d) minus (a) the kernel's extra cost of generating ``stat``.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

from reapkit._errors import NoSuchProcess
from reapkit._procfs import ProcFS

REPEATS = 15
TARGET_READS_PER_REPEAT = 3000  # processes per sample, so one sample is a few milliseconds


def _bare(path_pairs: list[tuple[str, str]]) -> int:
    done = 0
    flags = os.O_RDONLY | os.O_CLOEXEC
    for pair in path_pairs:
        try:
            for path in pair:
                fd = os.open(path, flags)
                try:
                    os.read(fd, 4096)
                finally:
                    os.close(fd)
        except OSError:  # the process exited: ENOENT or ESRCH
            continue
        done += 1
    return done


def _each(method: Callable[[int], object], pids: list[int]) -> int:
    done = 0
    for pid in pids:
        try:
            method(pid)
        except NoSuchProcess:
            continue
        done += 1
    return done


def _sample(body: Callable[[], int], passes: int) -> float:
    """µs per process for *passes* passes over all processes."""
    done = 0
    start = time.perf_counter_ns()
    for _ in range(passes):
        done += body()
    elapsed = time.perf_counter_ns() - start
    return elapsed / 1000 / max(done, 1)


def run() -> str:
    fs = ProcFS()
    pids = []
    for pid in fs.pids():
        try:
            fs.process_info(pid)
        except NoSuchProcess:
            continue
        pids.append(pid)
    statm_twice = [(f"{fs.root}/{pid}/statm",) * 2 for pid in pids]
    stat_and_score = [(f"{fs.root}/{pid}/stat", f"{fs.root}/{pid}/oom_score") for pid in pids]
    passes = max(1, TARGET_READS_PER_REPEAT // max(len(pids), 1))

    cases: dict[str, Callable[[], int]] = {
        "(a) floor: 2x os.open+os.read+os.close of statm": lambda: _bare(statm_twice),
        "(b) `ProcFS.process_info(pid)` (stat + oom_score)": lambda: _each(fs.process_info, pids),
        "(c) `ProcFS.stat(pid)`": lambda: _each(fs.stat, pids),
        "(d) bare os.open+os.read+os.close of stat + oom_score": lambda: _bare(stat_and_score),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection in one sample is noise, not cost
    try:
        for body in cases.values():  # warm-up: dentry cache, code paths
            body()
        # Interleave the cases so that background noise spreads over all of them.
        for _ in range(REPEATS):
            for name, body in cases.items():
                samples[name].append(_sample(body, passes))
    finally:
        if gc_was_enabled:
            gc.enable()

    rows = []
    for name, values in samples.items():
        rows.append(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"
        )
    a, b, _, d = (statistics.median(values) for values in samples.values())
    return "\n".join(
        [
            "## /proc reads per process",
            "",
            "Wall-clock µs per process to read what victim selection needs from the real /proc,"
            f" over the {len(pids)} processes present ({REPEATS} repeats of {passes} passes"
            f" each; Python {platform.python_version()}, Linux {platform.release()}).",
            "",
            "| measurement | median µs | min µs | max µs |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            f"Ratio (b)/(a) of the medians: **{b / a:.2f}**. Of the {b - a:.2f} µs above the"
            f" floor, {d - a:.2f} µs is the kernel generating `stat` and `oom_score` rather than"
            f" `statm` ((d) - (a)) and {b - d:.2f} µs is Python work in `process_info`: paths,"
            " error mapping, splitting, number checks and the frozen record ((b) - (d)).",
        ]
    )


if __name__ == "__main__":
    print(run())
    sys.exit(0)

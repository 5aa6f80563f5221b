"""``make bench``: run every benchmark and write ``docs/benchmarks.md``.

Each benchmark module has ``run() -> str`` returning a Markdown section. Figures are medians
of repeated runs with min and max; comparisons are ratios against a baseline measured in the
same run. The report records the command, the kernel and the machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

from . import bench_connector, bench_pipeline, bench_procfs, bench_sources, bench_stuck

BENCHMARKS = (bench_procfs, bench_sources, bench_connector, bench_stuck, bench_pipeline)
REPORT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return kib / (1 << 20)


def main() -> None:
    sections = []
    for bench in BENCHMARKS:
        name = bench.__name__.rsplit(".", 1)[1]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        sections.append(bench.run())
        print(f"  {name} took {time.monotonic() - started:.1f} s", file=sys.stderr)
    header = f"""# Benchmarks

Written by `make bench` (`python -m tests.benchmarks.run`) on
{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Do not edit by hand: run it again.

| | |
|---|---|
| kernel | Linux {platform.release()} ({platform.machine()}) |
| machine | {os.cpu_count()} CPUs ({_cpu_model()}), {_mem_total_gib():.1f} GiB memory |
| Python | {platform.python_version()} |

Each figure is the median of repeated runs, with min and max. Every comparison is a ratio
against a baseline measured in the same run.
"""
    REPORT.write_text(header + "\n" + "\n\n".join(s.strip() for s in sections) + "\n")
    print(f"wrote {REPORT}", file=sys.stderr)


if __name__ == "__main__":
    main()

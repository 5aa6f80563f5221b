"""``make bench``: run every benchmark and write ``docs/benchmarks.md``.

Each benchmark module has ``run() -> str`` returning a Markdown section. Figures are medians
of repeated runs with min and max; comparisons are ratios against a baseline measured in the
same run. The report records the command, the kernel and the machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import (
    bench_chaos,
    bench_connector,
    bench_footprint,
    bench_pipeline,
    bench_procfs,
    bench_reaction,
    bench_sources,
    bench_stuck,
    bench_trace,
)

BENCHMARKS = (
    bench_procfs,
    bench_sources,
    bench_connector,
    bench_stuck,
    bench_pipeline,
    bench_reaction,
    bench_footprint,
    bench_trace,
    bench_chaos,
)
REPORT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
PLOTS = REPORT.parent / "benchmarks"
MiB = 1 << 20


def _median_span(values: list[float]) -> tuple[float, float, float]:
    """Median, and the distances down to min and up to max (for error bars)."""
    med = statistics.median(values)
    return med, med - min(values), max(values) - med


def _plot_stuck(plt: Any) -> str | None:
    stuck = bench_pipeline.RESULTS.get("stuck")
    if not stuck:
        return None
    sizes = [size for size, _f, _p in stuck]  # type: ignore[attr-defined]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    xs = range(len(sizes))
    bound = bench_stuck.BOUND * 1000
    alone = []
    for size in sizes:
        runs = bench_stuck.RESULTS.get(size, {}).get("kill-only", [])
        back = [v for v in runs if v is not None]
        alone.append((back, len(back) < len(runs)))
    heights = [statistics.median(b) if b and not cut else bound for b, cut in alone]
    bars = ax.bar([x - width for x in xs], heights, width, label="kill alone", color="#bbbbbb")
    for bar, (_b, cut) in zip(bars, alone, strict=True):
        if cut:
            bar.set_hatch("//")
            ax.annotate(f"> {bound:.0f} ms\n(not back)", (bar.get_x() + width / 2, bound),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
    for offset, index, label, color in (
        (0, 1, "floor", "#4c72b0"),
        (width, 2, "reapkit", "#dd8452"),
    ):
        stats = [_median_span(row[index]) for row in stuck]  # type: ignore[index]
        ax.bar([x + offset for x in xs], [m for m, _lo, _hi in stats], width, label=label,
               color=color, yerr=[[lo for _m, lo, _hi in stats], [hi for _m, _lo, hi in stats]],
               capsize=3)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [f"{s // MiB} MiB" for s in sizes])
    ax.set_ylabel("ms until 90 % of the victim's memory is back (log)")
    ax.set_title("Stuck victim (state D): kill alone vs floor vs reapkit pipeline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = PLOTS / "stuck.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_selection(plt: Any) -> str | None:
    selection = bench_pipeline.RESULTS.get("selection")
    if not selection:
        return None
    assert isinstance(selection, dict)
    ns = sorted(selection)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (
        ("oom-score", "reapkit oom-score"),
        ("oom-score-kept", "reapkit oom-score, kept files"),
        ("largest-rss", "reapkit largest-rss"),
        ("floor", "floor: list + one oom_score read each"),
        ("psutil", "psutil scan (largest RSS)"),
        ("earlyoom", "earlyoom -d --dryrun (whole machine)"),
    ):
        points = [(n, _median_span(selection[n][key])) for n in ns if selection[n].get(key)]
        if not points:
            continue
        ax.errorbar([n for n, _s in points], [s[0] for _n, s in points],
                    yerr=[[s[1] for _n, s in points], [s[2] for _n, s in points]],
                    marker="o", capsize=3, label=label)  # fmt: skip
    ax.set_xlabel("sleeping processes in the sandbox")
    ax.set_ylabel("ms to choose a victim")
    ax.set_title("Selection time vs process count (median, min-max)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = PLOTS / "selection.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_reaction(plt: Any) -> str | None:
    data = bench_reaction.RESULTS
    if not any(runs["reapkit"] for runs in data.values()):
        return None
    scales = sorted({n for n, _c in data})
    conditions = [c for c in bench_reaction.CONDITIONS if any(k[1] == c for k in data)]
    fig, axes = plt.subplots(1, len(conditions), figsize=(4 * len(conditions) + 1, 4),
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, condition in zip(axes[0], conditions, strict=True):
        for offset, name, color in ((-0.06, "reapkit", "#dd8452"), (0.06, "earlyoom", "#4c72b0")):
            points = [
                (i + offset, _median_span([r["ms"] for r in data[(n, condition)][name]]))
                for i, n in enumerate(scales)
                if data.get((n, condition), {}).get(name)
            ]
            if not points:
                continue
            ax.errorbar([x for x, _s in points], [s[0] for _x, s in points],
                        yerr=[[s[1] for _x, s in points], [s[2] for _x, s in points]],
                        marker="o", capsize=3, label=name, color=color)  # fmt: skip
        for i, n in enumerate(scales):
            runs = data.get((n, condition))
            ratio = bench_reaction._ratio(runs["reapkit"], runs["earlyoom"]) if runs else None
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (i, 0), xycoords=("data", "axes fraction"),
                            xytext=(0, 4), textcoords="offset points", ha="center",
                            fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(scales)), [f"{n:,}" for n in scales])
        ax.set_xlabel("sleeping processes in scope")
        ax.set_title(condition)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("ms, crossing -> SIGTERM received")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Reaction to a fast hog (median, min-max; reapkit / earlyoom at the bottom)")
    fig.tight_layout()
    path = PLOTS / "reaction.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_plots() -> list[str]:
    try:
        import matplotlib  # the bench extra; the report is written without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)
        return []
    PLOTS.mkdir(exist_ok=True)
    written = [_plot_stuck(plt), _plot_selection(plt), _plot_reaction(plt)]
    return [p for p in written if p]


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


def _keep_guest_section(text: str) -> str:
    """``text`` with the section ``make bench-vm`` wrote kept (it takes a guest and an hour:
    ``make bench`` does not run it, and must not lose it)."""
    from tests.vmlab import bench as bench_vm

    if not REPORT.exists():
        return text
    old = REPORT.read_text()
    if bench_vm.START not in old or bench_vm.END not in old:
        return text
    section = bench_vm.START + old.split(bench_vm.START, 1)[1].split(bench_vm.END, 1)[0]
    return bench_vm.splice(text, section + bench_vm.END)


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
    text = header + "\n" + "\n\n".join(s.strip() for s in sections) + "\n"
    REPORT.write_text(_keep_guest_section(text))
    print(f"wrote {REPORT}", file=sys.stderr)
    for path in write_plots():
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

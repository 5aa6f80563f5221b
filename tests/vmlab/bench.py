"""``make bench-vm``: the whole-machine head-to-head, in a guest kernel.

Boots a 2 GiB guest with 1 GiB of zram (``tests/vmlab/guest.py``), runs every scenario of
``tests/vmlab/scenarios.py`` under every contender, interleaved, and writes what it saw:
the raw runs to ``docs/benchmarks/vm-runs.jsonl`` and a section of ``docs/benchmarks.md``
(between the ``bench-vm`` markers, which ``make bench`` keeps) with tables and plots::

    python -m tests.vmlab.bench [--repeats 3] [--scenarios leak,zram] [--from RUNS.jsonl]

``--from`` writes the report from runs already made, without a guest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.vmlab import scenarios

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "benchmarks.md"
PLOTS = REPORT.parent / "benchmarks"
RUNS = PLOTS / "vm-runs.jsonl"


def runs_file(nice: int) -> Path:
    """Where the runs of a heartbeat at ``nice`` are kept (the main ones: nice 0)."""
    return RUNS if nice == 0 else PLOTS / f"vm-runs-nice{nice}.jsonl"


START, END = "<!-- bench-vm:start -->", "<!-- bench-vm:end -->"
#: The target of the head-to-head: reapkit's default policy against earlyoom.
OURS, PEER, TARGET = "reapkit-default", "earlyoom", 0.5
SCENARIO_TEXT = {
    "leak": "one process allocates flat out, no swap",
    "zram": "a slow leak that keeps touching what it holds, zram swap",
    "workers": "six medium workers allocating together, no swap",
    "stuck": "the largest process is stuck in state D when killed",
}


def run_guest(
    repeats: int, scenario_names: str, contenders: str, timeout: float, nice: int
) -> list[str]:
    """Run the scenarios in a guest; return the ``RKBENCH`` lines it printed (and show all)."""
    command = [
        sys.executable, "-m", "tests.vmlab.guest", "--memory", "2G", "--zram", "1G",
        "--timeout", str(timeout), "--", sys.executable, "-m", "tests.vmlab.scenarios",
        "--repeats", str(repeats), "--scenarios", scenario_names, "--contenders", contenders,
        "--heartbeat-nice", str(nice),
    ]  # fmt: skip
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT) as guest:
        assert guest.stdout is not None
        for line in guest.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.startswith("RKBENCH "):
                lines.append(line[len("RKBENCH ") :])
    if guest.returncode != 0:
        raise SystemExit(f"bench-vm: the guest run failed (exit status {guest.returncode})")
    return lines


def _span(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def _ratio(ours: Sequence[float], base: Sequence[float]) -> float | None:
    if not ours or not base or statistics.median(base) <= 0:
        return None
    return statistics.median(ours) / statistics.median(base)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _stalls(runs: Iterable[dict[str, Any]]) -> list[float]:
    return [r["worst_stall_ms"] for r in runs if "worst_stall_ms" in r]


def _lowest(runs: Iterable[dict[str, Any]]) -> list[float]:
    return [r["lowest_available_mib"] for r in runs if "lowest_available_mib" in r]


def _recoveries(runs: Iterable[dict[str, Any]]) -> list[float]:
    return [r["onset_to_back_ms"] for r in runs if r.get("onset_to_back_ms") is not None]


def _nice(run: dict[str, Any]) -> int:
    return int(run.get("heartbeat_nice", 0))


def report(records: list[dict[str, Any]]) -> str:
    guest = next((r for r in records if r.get("type") == "guest"), {})
    every = [r for r in records if r.get("type") == "run"]
    runs = [r for r in every if _nice(r) == 0]
    niced = sorted({_nice(r) for r in every} - {0})
    names = [s for s in scenarios.SCENARIOS if any(r["scenario"] == s for r in runs)]
    contenders = [c for c in scenarios.CONTENDERS if any(r["contender"] == c for r in runs)]
    repeats = max((r["repeat"] for r in runs), default=-1) + 1
    out = [
        START,
        "## Whole machine out of memory (guest kernel)",
        "",
        "Written by `make bench-vm` (`python -m tests.vmlab.bench`; raw runs in "
        "[`benchmarks/vm-runs.jsonl`](benchmarks/vm-runs.jsonl), "
        "`python -m tests.vmlab.bench --from` rewrites this section from them). "
        f"A guest of {guest.get('mem_total_mib', '?')} MiB (MemTotal), {guest.get('cpus', '?')} "
        f"CPUs, Debian's kernel {guest.get('kernel', '?')}, pure cgroup v2, 1 GiB of zram that "
        "is switched on only for the zram scenario; software emulation (TCG), so every figure "
        "is only comparable with others in this section. Contenders run one at a time, "
        f"interleaved, {repeats} runs each: the kernel's OOM killer alone, earlyoom 1.7 and "
        "nohang 0.2 (Debian's packages, their default settings), reapkit with its default "
        "policy, reapkit with `examples/policies/earlyoom.toml`.",
        "",
        "In every run: two 64 MiB bystanders, and a heartbeat that sleeps 10 ms and touches "
        "4 MiB of its own memory and every page of a 32 MiB file it maps from the guest's disk "
        "(page cache a shortage evicts, read back when it is touched: what freezes a desktop), "
        "all of which must survive. Onset: MemAvailable first below "
        "10 % of MemTotal. Memory back: MemAvailable at 15 % again after a victim died. "
        "Worst stall: the heartbeat's longest tick beyond its 10 ms, from the start of the "
        "shortage until 2 s after the memory was back (or the run's limit: then the runner "
        "ended the shortage itself, and the machine counts as not saved). Milliseconds, median "
        "(min-max). The ratios compare medians with earlyoom's and the kernel's in the same "
        "guest.",
        "",
    ]
    verdicts = []
    for name in names:
        out += [f"### {name}: {SCENARIO_TEXT.get(name, '')}", ""]
        out += [
            "| contender | saved | right victim, bystanders intact | kernel OOM killer acted "
            "| onset → memory back, ms | lowest MemAvailable, MiB | worst stall, ms "
            "| stall vs earlyoom | stall vs kernel |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        here = [r for r in runs if r["scenario"] == name]
        by = {c: [r for r in here if r["contender"] == c] for c in contenders}
        for contender in contenders:
            mine = by[contender]
            good = [r for r in mine if "error" not in r]
            errors = len(mine) - len(good)
            out.append(
                f"| {contender} | {sum(r['saved'] for r in good)}/{len(mine)} "
                f"| {sum(r['right_victim'] for r in good)}/{len(mine)} "
                f"| {sum(r['kernel_oom_kills'] > 0 for r in good)}/{len(mine)} "
                f"| {_span(_recoveries(good))} | {_span(_lowest(good))} | {_span(_stalls(good))} "
                f"| {_fmt_ratio(_ratio(_stalls(good), _stalls(by.get(PEER, []))))} "
                f"| {_fmt_ratio(_ratio(_stalls(good), _stalls(by.get('kernel', []))))} |"
                + (f" {errors} run(s) failed to start" if errors else "")
            )
        ratio = _ratio(_stalls(by.get(OURS, [])), _stalls(by.get(PEER, [])))
        ours = [r for r in by.get(OURS, []) if "error" not in r]
        right = bool(ours) and all(r["saved"] and r["right_victim"] for r in ours)
        met = right and ratio is not None and ratio <= TARGET
        verdicts.append((name, ratio, right, met, by))
        out.append("")
    out += [
        "### Against the target",
        "",
        f"Target: on every scenario `{OURS}` saves the machine with the right victim, and its "
        f"worst stall is at most {TARGET}x earlyoom's.",
        "",
        "| scenario | saved, right victim, every run | worst stall vs earlyoom | target |",
        "|---|---|---:|---|",
    ]
    missed = []
    for name, ratio, right, met, by in verdicts:
        out.append(
            f"| {name} | {'yes' if right else 'no'} | {_fmt_ratio(ratio)} "
            f"| {'met' if met else '**missed**'} |"
        )
        if not met and ratio is not None:
            missed.append(_why(name, ratio, by))
    if missed:
        out += ["", "Where it missed, the figures beside the stall:", "", *missed]
    for nice in niced:
        out += ["", *_niced_section(nice, [r for r in every if _nice(r) == nice])]
    out += [
        "",
        "![worst stall](benchmarks/vm-stall.png)",
        "",
        "No bar on the right: that contender did not get the memory back within the run's limit.",
        "",
        END,
    ]
    return "\n".join(out)


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):,.0f}" if values else "-"


def _why(name: str, ratio: float, by: dict[str, list[dict[str, Any]]]) -> str:
    """One line on a missed scenario: by how much, how low memory went, and how large the
    stalls were when the kernel alone handled it (the heartbeat's floor in this guest)."""
    ours, peer, kernel = by.get(OURS, []), by.get(PEER, []), by.get("kernel", [])
    return (
        f"- {name}: {ratio / TARGET:.1f}x over the target. Lowest MemAvailable "
        f"{_median(_lowest(ours))} MiB against earlyoom's {_median(_lowest(peer))} MiB; "
        f"onset → memory back {_median(_recoveries(ours))} ms against "
        f"{_median(_recoveries(peer))} ms; the kernel alone: worst stall "
        f"{_span(_stalls(kernel))} ms."
    )


def _niced_section(nice: int, runs: list[dict[str, Any]]) -> list[str]:
    """The same shortages with the heartbeat at another nice value: with CPU contention set
    aside, what is left of its stalls is mostly memory."""
    out = [
        f"### The heartbeat at nice {nice}",
        "",
        f"The same runs with the heartbeat at nice {nice}, so that the CPU scheduler favours "
        "it over the hogs: what still stalls it is mostly memory (reclaim, refaults), not a "
        "busy CPU.",
        "",
        "| scenario | contender | runs | saved, right victim | worst stall, ms | vs earlyoom |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in scenarios.SCENARIOS:
        here = [r for r in runs if r["scenario"] == name and "error" not in r]
        peer = _stalls(r for r in here if r["contender"] == PEER)
        for contender in scenarios.CONTENDERS:
            mine = [r for r in here if r["contender"] == contender]
            if mine:
                good = sum(r["saved"] and r["right_victim"] for r in mine)
                out.append(
                    f"| {name} | {contender} | {len(mine)} | {good}/{len(mine)} "
                    f"| {_span(_stalls(mine))} | {_fmt_ratio(_ratio(_stalls(mine), peer))} |"
                )
    return out


def write_plot(records: list[dict[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return None
    runs = [r for r in records if r.get("type") == "run" and "error" not in r and not _nice(r)]
    names = [s for s in scenarios.SCENARIOS if any(r["scenario"] == s for r in runs)]
    contenders = [c for c in scenarios.CONTENDERS if any(r["contender"] == c for r in runs)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(contenders))
    for ax, key, title in (
        (axes[0], "worst_stall_ms", "Heartbeat's worst stall"),
        (axes[1], "onset_to_back_ms", "Onset of the shortage → memory back"),
    ):
        for j, contender in enumerate(contenders):
            for i, name in enumerate(names):
                values = [
                    r[key] for r in runs
                    if r["scenario"] == name and r["contender"] == contender
                    and r.get(key) is not None
                ]  # fmt: skip
                if not values:
                    continue
                med = statistics.median(values)
                x = i + (j - (len(contenders) - 1) / 2) * width
                ax.bar(x, max(med, 1.0), width, color=f"C{j}",
                       label=contender if i == 0 else None)  # fmt: skip
                ax.errorbar(x, max(med, 1.0), yerr=[[med - min(values)], [max(values) - med]],
                            color="black", capsize=2, linewidth=0.8)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("ms (median, min-max; log)")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    path = PLOTS / "vm-stall.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def splice(text: str, section: str) -> str:
    """``text`` with its bench-vm section replaced by ``section`` (appended if it has none)."""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + section + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vmlab.bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(scenarios.SCENARIOS))
    parser.add_argument("--contenders", default=",".join(scenarios.CONTENDERS))
    parser.add_argument("--timeout", type=float, default=5400.0, help="the guest's hard limit")
    parser.add_argument(
        "--heartbeat-nice", type=int, default=0,
        help="run the heartbeat at this nice value; its runs are kept in a file of their own "
        "and reported beside the main ones",
    )  # fmt: skip
    parser.add_argument(
        "--from", dest="sources", type=Path, action="append",
        help="report these runs (JSON lines; may be given more than once)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.sources:
        lines = [line for source in args.sources for line in source.read_text().splitlines()]
    else:
        lines = run_guest(
            args.repeats, args.scenarios, args.contenders, args.timeout, args.heartbeat_nice
        )
        runs = runs_file(args.heartbeat_nice)
        PLOTS.mkdir(exist_ok=True)
        runs.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))
        print(f"wrote {runs}", file=sys.stderr)
        others = sorted(p for p in PLOTS.glob("vm-runs*.jsonl") if p != runs)
        lines += [line for other in others for line in other.read_text().splitlines()]
    records = [json.loads(line) for line in lines if line.strip()]
    REPORT.write_text(splice(REPORT.read_text(), report(records)))
    print(f"wrote {REPORT}", file=sys.stderr)
    plot = write_plot(records)
    if plot:
        print(f"wrote {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The seed's problem: a victim stuck in state D (frozen by the cgroup v1 freezer), SIGKILLed.

Time until its memory is back in its sandbox memory cgroup: (a) the kill alone, bounded;
(b) the floor: ``pidfd_send_signal`` + ``process_mrelease`` called directly. The full reapkit
pipeline (trigger → decision → action → reap stage) joins this table with the pipeline itself.
"""

from __future__ import annotations

import os
import statistics

from reapkit.cli._scenarios import MiB, stuck_victim, stuck_victim_sandbox
from reapkit.lowlevel import ProcFS

SIZES = (256 * MiB, 1024 * MiB, 4096 * MiB)
BOUND = 2.0
REPEATS = {"kill-only": 3, "mrelease": 7}

#: Filled by run(), for the plots: size -> {"kill-only": [ms or None], "mrelease": [ms]}.
RESULTS: dict[int, dict[str, list[float | None]]] = {}


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def run() -> str:
    if os.geteuid() != 0:
        return "## Stuck victim\n\nSkipped: needs root to create cgroups."
    procfs = ProcFS()
    rows = []
    for size in SIZES:
        with stuck_victim_sandbox(size) as (memory, freezer):
            results = {
                scenario: [
                    stuck_victim(
                        scenario,
                        size=size,
                        bound=BOUND,
                        memory=memory,
                        freezer=freezer,
                        procfs=procfs,
                    )
                    for _ in range(REPEATS[scenario])
                ]
                for scenario in ("kill-only", "mrelease")
            }
        RESULTS[size] = {k: [r.ms_to_memory_back for r in v] for k, v in results.items()}
        alone = results["kill-only"]
        back = [r.ms_to_memory_back for r in alone if r.ms_to_memory_back is not None]
        alone_cell = (
            f"not back within {BOUND * 1000:.0f} ms in {len(alone) - len(back)} of {len(alone)}"
            if len(back) < len(alone)
            else _fmt(back)
        )
        floor = [r.ms_to_memory_back for r in results["mrelease"]]
        assert all(v is not None for v in floor)
        ms = [v for v in floor if v is not None]
        rate = [size / MiB / (v / 1000) for v in ms]
        rows.append(
            f"| {size // MiB} MiB | {alone_cell} | {_fmt(ms)} | {statistics.median(rate):,.0f} |"
        )
    return "\n".join(
        [
            "## Stuck victim: time until memory is back",
            "",
            "A victim frozen in state D by the cgroup v1 freezer, in a memory cgroup with a hard"
            " limit, SIGKILLed through its pidfd. Memory counts as back when the cgroup's usage"
            " fell by 90 % of the victim's size. Milliseconds from the signal: median (min-max);"
            f" kill alone x{REPEATS['kill-only']}, process_mrelease x{REPEATS['mrelease']}.",
            "",
            "| victim | kill alone (bounded) | floor: pidfd_send_signal + process_mrelease |"
            " MiB/s reclaimed (floor) |",
            "|---|---|---|---|",
            *rows,
        ]
    )

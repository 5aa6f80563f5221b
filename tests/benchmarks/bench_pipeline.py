"""The pipeline: how long a rule takes to choose, and a stuck victim through the whole path.

1. Selection: N sleeping processes in a sandbox cgroup; a rule scoped to it; the time for
   ``Engine.preview`` (candidates from /proc, the selector chain, the guard's check of the
   chosen one) — what a decision costs before any action.
2. Stuck victim through the full pipeline (manual trigger -> rule -> candidates -> selector ->
   kill -> reap stage) against the floor (``pidfd_send_signal`` + ``process_mrelease`` called
   directly), both timed the same way: an OS thread polls the sandbox's memory usage with
   ``time.monotonic`` until 90 % of the victim's size is back.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import threading
import time

import trio

from reapkit import ProcessRef
from reapkit._demo import BACK_FRACTION, MiB
from reapkit._engine import Engine
from reapkit._hog import start_hog
from reapkit._policy import load_policy
from reapkit._reaper import open_reaper
from reapkit._sandbox import SandboxCgroup
from reapkit.lowlevel import pidfd_send_signal, process_mrelease

SCALES = (1_000, 10_000)
SELECTION_REPEATS = 7
STUCK_SIZES = (256 * MiB, 1024 * MiB)
STUCK_REPEATS = 7


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def _rule_text(cgroup: str, select: str, actions: str = '"kill"') -> str:
    return (
        f'[reaper.reap]\nthreads = 1\n\n[[rule]]\nname = "bench"\n'
        f'scope = {{ cgroup = "{cgroup}" }}\nselect = [{select}]\nactions = [{actions}]\n'
        'victim_timeout = "2s"\ncooldown = "0s"\n'
    )


async def _selection(n: int) -> dict[str, list[float]]:
    with SandboxCgroup.create("memory", prefix="reapkit-bench") as cgroup:
        cgroup.set_memory_limit(6 << 30)
        starter = subprocess.Popen(
            ["sh", "-c", f"echo $$ > {cgroup.directory}/cgroup.procs;"
             f" i=0; while [ $i -lt {n} ]; do sleep 3600 & i=$((i+1)); done"],
        )  # fmt: skip
        await trio.to_thread.run_sync(starter.wait)
        while len(cgroup.pids()) < n:
            await trio.sleep(0.1)
        results: dict[str, list[float]] = {}
        for label, select in (("oom-score", '"oom-score"'), ("largest-rss", '"largest-rss"')):
            policy = load_policy(text=_rule_text(cgroup.directory, select), dry_run=True)
            engine = Engine(policy.rules, emit=_ignore)
            times = []
            for _ in range(SELECTION_REPEATS):
                started = time.perf_counter()
                chosen, _ranked, _steps = await engine.preview(policy.rules[0])
                times.append((time.perf_counter() - started) * 1000)
                assert chosen is not None
            results[label] = times
        return results


async def _ignore(_record: object) -> None:
    return None


def _watch_usage(cgroup: SandboxCgroup, before: int, target: int, out: list[float]) -> None:
    """In an OS thread: the monotonic time at which ``target`` bytes were back."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if before - cgroup.memory_usage() >= target:
            out.append(time.monotonic())
            return
        time.sleep(0.0005)


async def _full_pipeline(size: int, memory: SandboxCgroup, freezer: SandboxCgroup) -> float:
    policy = load_policy(text=_rule_text(memory.directory, '"largest-rss"', '"kill", "reap"'))
    hog = await trio.to_thread.run_sync(start_hog, size, [memory.directory, freezer.directory])
    with hog:
        try:
            freezer.freeze()
            async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
                before = memory.memory_usage()
                back: list[float] = []
                watcher = threading.Thread(
                    target=_watch_usage, args=(memory, before, int(size * BACK_FRACTION), back)
                )
                watcher.start()
                started = time.monotonic()
                await reaper.trigger("bench")
                with trio.fail_after(20):
                    record = await records.receive()
                await trio.to_thread.run_sync(watcher.join)
            assert record.outcome == "killed" and back, record
            return (back[0] - started) * 1000
        finally:
            freezer.thaw()


def _floor(size: int, memory: SandboxCgroup, freezer: SandboxCgroup) -> float:
    """The bare syscalls, timed by the same watcher thread as the pipeline."""
    hog = start_hog(size, [memory.directory, freezer.directory])
    with hog:
        try:
            with ProcessRef.open(hog.pid) as ref:
                freezer.freeze()
                before = memory.memory_usage()
                back: list[float] = []
                watcher = threading.Thread(
                    target=_watch_usage, args=(memory, before, int(size * BACK_FRACTION), back)
                )
                watcher.start()
                started = time.monotonic()
                pidfd_send_signal(ref.fileno(), signal.SIGKILL)
                process_mrelease(ref.fileno())
                watcher.join()
            assert back
            return (back[0] - started) * 1000
        finally:
            freezer.thaw()


async def _stuck() -> list[tuple[int, list[float], list[float]]]:
    rows = []
    for size in STUCK_SIZES:
        floors, pipeline = [], []
        with SandboxCgroup.create("memory", prefix="reapkit-bench") as memory:
            memory.set_memory_limit(size + 256 * MiB)
            with SandboxCgroup.create("freezer", prefix="reapkit-bench") as freezer:
                for _ in range(STUCK_REPEATS):  # interleaved: same conditions for both
                    floors.append(await trio.to_thread.run_sync(_floor, size, memory, freezer))
                    pipeline.append(await _full_pipeline(size, memory, freezer))
        rows.append((size, floors, pipeline))
    return rows


async def _main() -> str:
    if os.geteuid() != 0:
        return "## Pipeline\n\nSkipped: needs root to create cgroups."
    selection = {n: await _selection(n) for n in SCALES}
    stuck = await _stuck()
    lines = [
        "## Pipeline: choosing a victim",
        "",
        "N sleeping processes in a sandbox cgroup; a rule scoped to it; `Engine.preview` —"
        " candidates read from /proc (two reads each), the selector, the guard's check of the"
        f" one chosen. Milliseconds, median (min-max) of {SELECTION_REPEATS}.",
        "",
        "| processes | oom-score | largest-rss (reads VmSwap too) | per process (oom-score) |",
        "|---:|---|---|---:|",
        *(
            f"| {n:,} | {_fmt(r['oom-score'])} | {_fmt(r['largest-rss'])} |"
            f" {statistics.median(r['oom-score']) * 1000 / n:.1f} µs |"
            for n, r in selection.items()
        ),
        "",
        "## Pipeline: stuck victim through the whole path",
        "",
        "A victim frozen in state D, then: (floor) `pidfd_send_signal(SIGKILL)` +"
        " `process_mrelease` called directly; (pipeline) `reaper.trigger()` -> rule ->"
        " candidates -> `largest-rss` -> `kill` through the guard -> the reap stage's thread."
        " Milliseconds from the start until 90 % of the victim's size is back in its memory"
        f" cgroup, median (min-max) of {STUCK_REPEATS}, interleaved. The pipeline adds a"
        " decision (candidates, selector, guard) and a hand-over to the reaper thread; where"
        " the ratio is below 1 the difference is inside the floor's own run-to-run spread"
        " (see min-max), not a speed-up.",
        "",
        "| victim | floor | full pipeline | pipeline / floor (medians) |",
        "|---|---|---|---:|",
        *(
            f"| {size // MiB} MiB | {_fmt(f)} | {_fmt(p)} |"
            f" {statistics.median(p) / statistics.median(f):.2f} |"
            for size, f, p in stuck
        ),
    ]
    return "\n".join(lines)


def run() -> str:
    return trio.run(_main)


if __name__ == "__main__":
    print(run())

"""The pipeline: how long a rule takes to choose, and a stuck victim through the whole path.

1. Selection: N sleeping processes in a sandbox cgroup; a rule scoped to it; the time for
   ``Engine.preview`` (candidates from /proc, the selector chain, the guard's check of the
   chosen one) — what a decision costs before any action. Beside it, in the same run, a plain
   psutil scan of the same processes (largest RSS) and earlyoom's own "selecting victim took"
   (``earlyoom -d --dryrun``: dry run, it signals nothing; it scans the whole machine, where
   the sandbox's processes dominate).
2. Stuck victim through the full pipeline (manual trigger -> rule -> candidates -> selector ->
   kill -> reap stage) against the floor (``pidfd_send_signal`` + ``process_mrelease`` called
   directly), both timed the same way: an OS thread polls the sandbox's memory usage with
   ``time.monotonic`` until 90 % of the victim's size is back.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time

import trio

from reapkit import ProcessRef
from reapkit._engine import Engine
from reapkit._policy import load_policy
from reapkit._reaper import open_reaper
from reapkit.cli._scenarios import BACK_FRACTION, MiB
from reapkit.lowlevel import pidfd_send_signal, process_mrelease
from reapkit.testing import SandboxCgroup, start_hog

SCALES = (1_000, 5_000, 10_000)
SELECTION_REPEATS = 9
STUCK_SIZES = (256 * MiB, 1024 * MiB, 4096 * MiB)
STUCK_REPEATS = {256 * MiB: 7, 1024 * MiB: 7, 4096 * MiB: 5}
#: How long earlyoom runs in dry-run mode per scale, collecting its "selecting victim took".
EARLYOOM_SECONDS = 3.0
_TOOK = re.compile(r"selecting victim took (\d+\.\d+) ms")

#: Filled by run(), for the plots.
RESULTS: dict[str, object] = {}


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def _rule_text(cgroup: str, select: str, actions: str = '"kill"', keep: int = 0) -> str:
    return (
        f"[reaper]\nkeep_score_files = {keep}\n\n"
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
        engines = []
        for label, select, keep in (
            ("oom-score", '"oom-score"', 0),
            ("oom-score-kept", '"oom-score"', n + 1000),
            ("largest-rss", '"largest-rss"', 0),
        ):
            policy = load_policy(text=_rule_text(cgroup.directory, select, keep=keep), dry_run=True)
            engine = Engine(policy.rules, emit=_ignore, keep_score_files=policy.keep_score_files)
            engines.append((label, policy.rules[0], engine))
            results[label] = []
        pids = cgroup.pids()
        results["psutil"], results["floor"] = [], []
        try:
            await engines[1][2].preview(engines[1][1])  # open the kept files once, untimed
            for _ in range(SELECTION_REPEATS):  # interleaved: drift hits every column alike
                for label, rule, engine in engines:
                    started = time.perf_counter()
                    chosen, _ranked, _steps = await engine.preview(rule)
                    results[label].append((time.perf_counter() - started) * 1000)
                    assert chosen is not None
                results["psutil"].append(_psutil_scan(pids))
                results["floor"].append(_floor_scan(cgroup.directory))
        finally:
            for _label, _rule, engine in engines:
                engine.close()
        results["earlyoom"] = await trio.to_thread.run_sync(_earlyoom_selection)
        return results


def _floor_scan(directory: str) -> float:
    """The reads a choice cannot do without, in a bare loop: list the cgroup's PIDs, then one
    ``open`` + ``read`` + ``close`` of ``oom_score`` per process. Milliseconds."""
    started = time.perf_counter()
    with open(f"{directory}/cgroup.procs", "rb") as f:
        pids = f.read().split()
    for pid in pids:
        fd = os.open(b"/proc/" + pid + b"/oom_score", os.O_RDONLY)
        os.read(fd, 64)
        os.close(fd)
    return (time.perf_counter() - started) * 1000


def _psutil_scan(pids: list[int]) -> float:
    """A plain psutil scan of the same processes: the one with the largest RSS. Milliseconds."""
    import psutil  # a bench dependency only

    started = time.perf_counter()
    best, best_rss = None, -1
    for pid in pids:
        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
        if rss > best_rss:
            best, best_rss = pid, rss
    elapsed = (time.perf_counter() - started) * 1000
    assert best is not None
    return elapsed


def _mem_total_kib() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1])


def _earlyoom_selection() -> list[float]:
    """earlyoom's own victim-selection time, from ``earlyoom -d --dryrun`` (never kills).

    The line is set just under MemTotal so that the condition holds at once and it selects
    every poll (100 ms). ``-d`` also prints one line per process while selecting, which is
    inside earlyoom's figure: an upper bound on its plain selection. Its output goes to a file
    (no pipe back-pressure). Its first selection (the start-up self test) is dropped."""
    binary = shutil.which("earlyoom")
    if binary is None:
        return []
    line_kib = int(_mem_total_kib() * 0.999)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [binary, "-d", "--dryrun", "-r", "0", "-M", f"{line_kib},{line_kib}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            time.sleep(EARLYOOM_SECONDS)
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.seek(0)
        text = out.read()
    assert "dryrun mode enabled" in text, text[:500]
    took = [float(m) for m in _TOOK.findall(text)]
    return took[1:]


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
            memory.set_memory_limit(size + (512 if size >= 4096 * MiB else 256) * MiB)
            with SandboxCgroup.create("freezer", prefix="reapkit-bench") as freezer:
                for _ in range(STUCK_REPEATS[size]):  # interleaved: same conditions for both
                    floors.append(await trio.to_thread.run_sync(_floor, size, memory, freezer))
                    pipeline.append(await _full_pipeline(size, memory, freezer))
        rows.append((size, floors, pipeline))
    return rows


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{_med(a) / _med(b):.2f}" if a and b else "not measured"


def _rate(size: int, ms: list[float]) -> str:
    return f"{size / MiB / (_med(ms) / 1000):,.0f}"


async def _main() -> str:
    if os.geteuid() != 0:
        return "## Pipeline\n\nSkipped: needs root to create cgroups."
    selection = {n: await _selection(n) for n in SCALES}
    stuck = await _stuck()
    RESULTS["selection"] = selection
    RESULTS["stuck"] = stuck
    have_earlyoom = shutil.which("earlyoom") is not None
    eo = (
        "earlyoom's own figure: its `selecting victim took` lines from `earlyoom -d --dryrun`"
        f" running for {EARLYOOM_SECONDS:.0f} s beside the sleepers (one selection per 100 ms"
        " poll; the first, its start-up self test, dropped). earlyoom scans the whole machine"
        " (the N sleepers plus the ~100 other processes) and reads `oom_score` and `statm` of"
        " every process, `comm` and `oom_score_adj` only of the best so far (strace of"
        " earlyoom 1.7); with `-d` it also prints one line per process inside the timed"
        " loop, so its figure is an upper bound on its plain selection."
        if have_earlyoom
        else "earlyoom: not measured (the `earlyoom` binary is not installed)."
    )
    lines = [
        "## Pipeline: choosing a victim",
        "",
        "N sleeping processes in a sandbox cgroup; a rule scoped to it; `Engine.preview` — the"
        " cgroup's PIDs, one `oom_score` read per process (`stat` only for the candidates a"
        " selector looks at: for `oom-score`, the one chosen), the selector, the guard's check"
        " of the one chosen. *kept files*: the same with `[reaper] keep_score_files` (one"
        " `pread` per process on files kept open; about 4.3 KiB of kernel memory per process)."
        " `largest-rss` reads `stat` and `status` (VmSwap) of every candidate. *floor*: the"
        " reads no choice can skip, in a bare Python loop — `cgroup.procs`, then `open` +"
        " `read` + `close` of each `oom_score`. Milliseconds, median (min-max) of"
        f" {SELECTION_REPEATS}, the columns interleaved. psutil: a plain loop over the same PIDs,"
        " `psutil.Process(pid).memory_info().rss`, keeping the largest."
        f" {eo} Target: reapkit ≤ 0.5x earlyoom at 10,000.",
        "",
        "| processes | reapkit oom-score | oom-score, kept files | largest-rss | floor |"
        " psutil scan | earlyoom -d | oom-score / earlyoom | kept files / earlyoom |"
        " oom-score / floor |",
        "|---:|---|---|---|---|---|---|---:|---:|---:|",
        *(
            f"| {n:,} | {_fmt(r['oom-score'])} | {_fmt(r['oom-score-kept'])} |"
            f" {_fmt(r['largest-rss'])} | {_fmt(r['floor'])} | {_fmt(r['psutil'])} |"
            f" {_fmt(r['earlyoom']) if r['earlyoom'] else 'not measured'} |"
            f" {_ratio(r['oom-score'], r['earlyoom'])} |"
            f" {_ratio(r['oom-score-kept'], r['earlyoom'])} |"
            f" {_ratio(r['oom-score'], r['floor'])} |"
            for n, r in selection.items()
        ),
        "",
        "![selection time vs process count](benchmarks/selection.png)",
        "",
        "## Pipeline: stuck victim through the whole path",
        "",
        "A victim frozen in state D, then: (floor) `pidfd_send_signal(SIGKILL)` +"
        " `process_mrelease` called directly; (pipeline) `reaper.trigger()` -> rule ->"
        " candidates -> `largest-rss` -> `kill` through the guard -> the reap stage's thread."
        " Milliseconds from the start until 90 % of the victim's size is back in its memory"
        " cgroup, median (min-max) of "
        + ", ".join(f"{n} ({s // MiB} MiB)" for s, n in STUCK_REPEATS.items())
        + ", interleaved. MiB/s: the victim's size over the median time. The pipeline adds a"
        " decision (candidates, selector, guard) and a hand-over to the reaper thread; where"
        " the ratio is below 1 the difference is inside the floor's own run-to-run spread"
        " (see min-max), not a speed-up. Target: pipeline ≤ 1.2x floor at 1 GiB. The kill"
        " alone is in the stuck-victim table above (never back within its bound).",
        "",
        "| victim | floor | full pipeline | pipeline / floor (medians) | MiB/s floor |"
        " MiB/s pipeline |",
        "|---|---|---|---:|---:|---:|",
        *(
            f"| {size // MiB} MiB | {_fmt(f)} | {_fmt(p)} |"
            f" {_med(p) / _med(f):.2f} | {_rate(size, f)} | {_rate(size, p)} |"
            for size, f, p in stuck
        ),
        "",
        "![stuck victim: kill alone, floor, pipeline](benchmarks/stuck.png)",
    ]
    return "\n".join(lines)


def run() -> str:
    return trio.run(_main)


if __name__ == "__main__":
    print(run())

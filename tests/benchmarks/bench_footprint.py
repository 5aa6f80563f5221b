"""Footprint: ``reapkit run --dry-run`` with the default policy, idle.

The daemon runs as a subprocess (dry run: its kill guard signals nothing, whatever the policy
says; the default policy is used). After a warm-up, two snapshots ``WINDOW`` seconds apart of
its ``/proc/<pid>/stat`` (utime + stime) and of every thread's ``/proc/<pid>/task/*/status``
(voluntary + nonvoluntary context switches: wakeups), and its VmRSS (RssAnon + RssFile) and
VmLck (it calls ``mlockall``). Beside it, in this process and over the same window, the same
default policy through ``open_reaper`` (dry run) gives each event source's own wakeup count:
the part of the wakeups that comes from the event sources.

Then the library: wall time of a fresh ``python -c STATEMENT`` for ``import reapkit`` and what
a plugin or an embedding service imports next, median of ``IMPORT_RUNS``, beside ``pass``
(the interpreter alone) and ``import trio``; and the peak RSS of ``reapkit probe`` (the
liveness probe a pod runs every period) and ``reapkit check`` (the systemd unit's
ExecReload). reapkit's sources are byte-compiled first, as pip does at install (an editable
checkout run with ``PYTHONDONTWRITEBYTECODE`` would compile them on every import).
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

import reapkit
from reapkit._policy import load_policy
from reapkit._reaper import open_reaper

WARMUP = 5.0
#: The idle window the issue asks for.
WINDOW = 60.0
_TICK = os.sysconf("SC_CLK_TCK")

#: Fresh interpreters timed for each import statement.
IMPORT_RUNS = 15
#: What each statement stands for, and the statement.
IMPORTS = (
    ("the interpreter alone", "pass"),
    ("the library", "import reapkit"),
    (
        "a plugin's names",
        "from reapkit import Candidate, Ranked, Selector, Situation, register, selector",
    ),
    ("an embedding service's names", "from reapkit import load_policy, open_reaper"),
    ("trio alone, for reference", "import trio"),
)
#: The target for ``import reapkit``.
IMPORT_TARGET_MS = 100

#: Filled by run().
RESULTS: dict[str, object] = {}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def _status(path: str) -> dict[str, str]:
    with open(path, encoding="ascii") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def _switches(pid: int) -> tuple[int, int]:
    """Context switches summed over the threads alive now, and the number of threads."""
    total, threads = 0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = _status(f"/proc/{pid}/task/{tid}/status")
        except FileNotFoundError:
            continue
        total += int(st["voluntary_ctxt_switches"]) + int(st["nonvoluntary_ctxt_switches"])
        threads += 1
    return total, threads


def _kib(st: dict[str, str], key: str) -> int:
    return int(st.get(key, "0 kB").split()[0])


def _snapshot(pid: int) -> dict[str, float]:
    st = _status(f"/proc/{pid}/status")
    switches, threads = _switches(pid)
    return {
        "t": time.monotonic(),
        "cpu": _cpu_seconds(pid),
        "switches": switches,
        "threads": threads,
        "rss_kib": _kib(st, "VmRSS"),
        "anon_kib": _kib(st, "RssAnon"),
        "file_kib": _kib(st, "RssFile"),
        "lck_kib": _kib(st, "VmLck"),
        "hwm_kib": _kib(st, "VmHWM"),
    }


async def _measure() -> dict[str, object]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "reapkit.cli", "run", "--dry-run"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        policy = load_policy(dry_run=True)
        async with open_reaper(policy) as reaper:
            await trio.sleep(WARMUP)
            if daemon.poll() is not None:
                assert daemon.stderr is not None
                raise RuntimeError(f"reapkit run exited: {daemon.stderr.read()!r}")
            first = _snapshot(daemon.pid)
            sources_first = {s.name: s.wakeups for s in reaper.statistics().sources}
            await trio.sleep(WINDOW)
            last = _snapshot(daemon.pid)
            sources_last = {s.name: s.wakeups for s in reaper.statistics().sources}
        if daemon.poll() is not None:
            raise RuntimeError("reapkit run exited during the window")
    finally:
        if daemon.poll() is None:
            daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if daemon.stderr is not None:
            daemon.stderr.close()
    seconds = last["t"] - first["t"]
    return {
        "seconds": seconds,
        "first": first,
        "last": last,
        "cpu_ms": (last["cpu"] - first["cpu"]) * 1000,
        "wakeups_per_s": (last["switches"] - first["switches"]) / seconds,
        "sources": {
            name: (sources_last[name] - sources_first.get(name, 0)) / seconds
            for name in sources_last
        },
    }


def _import_times() -> dict[str, list[float]]:
    times: dict[str, list[float]] = {statement: [] for _what, statement in IMPORTS}
    for _ in range(IMPORT_RUNS + 1):  # interleaved; the first round warms the page cache
        for statement, runs in times.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True)
            runs.append((time.perf_counter() - start) * 1000)
    return {statement: runs[1:] for statement, runs in times.items()}


#: Runs ``reapkit ARGS...`` as its only child and prints that child's peak RSS in KiB.
_PEAK = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "reapkit.cli", *sys.argv[1:]],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
#: Short-lived commands that run beside the daemon, in its cgroup: the liveness probe a pod
#: runs every period (on a missing heartbeat: it exits 1 after trying to read it), and the
#: policy check of the systemd unit's ExecReload.
COMMANDS = (
    ("`reapkit probe` (liveness probe)", ("probe", "/nonexistent/heartbeat")),
    ("`reapkit check` (ExecReload)", ("check",)),
)


def _peak_kib(args: tuple[str, ...]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def _library_section() -> list[str]:
    times = _import_times()
    RESULTS["imports_ms"] = times
    peaks = {what: _peak_kib(args) for what, args in COMMANDS}
    RESULTS["peak_kib"] = peaks
    rows = []
    for what, statement in IMPORTS:
        runs = times[statement]
        med = statistics.median(runs)
        verdict = ""
        if statement == "import reapkit":
            ok = med < IMPORT_TARGET_MS
            verdict = f"< {IMPORT_TARGET_MS} ms | {'met' if ok else 'missed'}"
        rows.append(
            f"| {what}: `{statement}` | {med:.0f} ({min(runs):.0f}-{max(runs):.0f}) ms"
            f" | {verdict or '|'} |"
        )
    return [
        "",
        "### The library, and short-lived commands beside the daemon",
        "",
        f"Wall time of a fresh `python -c STATEMENT`, median (min-max) of {IMPORT_RUNS},"
        " interleaved, with reapkit's bytecode compiled as pip compiles it at install."
        " `import reapkit` resolves each public name on first use, so the rows after it"
        " are what a plugin or an embedding service pays. Then the peak RSS (`ru_maxrss`)"
        " of two short-lived commands charged to the daemon's cgroup: the liveness probe a"
        " pod runs every period, and the policy check of the systemd unit's ExecReload.",
        "",
        "| what | value | target | verdict |",
        "|---|---:|---|---|",
        *rows,
        *(f"| {what}, peak RSS | {kib / 1024:.1f} MiB | | |" for what, kib in peaks.items()),
    ]


def run() -> str:
    # As installed: pip byte-compiles at install; a checkout may not have been (and may be
    # run with PYTHONDONTWRITEBYTECODE), which would time the compiler and count its memory.
    compileall.compile_dir(Path(reapkit.__file__).parent, quiet=1)
    library = _library_section()
    result = trio.run(_measure)
    RESULTS.update(result)
    first, last = result["first"], result["last"]
    assert isinstance(first, dict) and isinstance(last, dict)
    seconds = float(result["seconds"])  # type: ignore[arg-type]
    cpu_ms = float(result["cpu_ms"])  # type: ignore[arg-type]
    rss_mib = last["rss_kib"] / 1024
    sources = result["sources"]
    assert isinstance(sources, dict)
    source_total = sum(sources.values())
    wakeups = float(result["wakeups_per_s"])  # type: ignore[arg-type]
    return "\n".join(
        [
            "## Footprint: `reapkit run --dry-run`, idle",
            "",
            "The daemon with the embedded default policy, in dry run (nothing can be signalled),"
            f" measured over {seconds:.0f} s after a {WARMUP:.0f} s warm-up on an otherwise idle"
            " machine. One window, so no min-max: CPU and wakeups are totals over the"
            " window. Wakeups: voluntary + nonvoluntary context switches summed over the"
            " threads alive at each snapshot (`/proc/<pid>/task/*/status`); threads that ended"
            " inside the window are not counted. Event-source wakeups: the same default policy"
            " run through `open_reaper` (dry run) in the benchmark's process over the same"
            " window, each source's own wakeup counter. Targets: RSS ≤ 40 MiB; no wakeups from"
            " the event sources while idle.",
            "",
            "| measurement | value | target | verdict |",
            "|---|---:|---|---|",
            f"| VmRSS | {rss_mib:.1f} MiB | ≤ 40 MiB |"
            f" {'met' if rss_mib <= 40 else f'missed by {rss_mib - 40:.1f} MiB'} |",
            f"| &nbsp;&nbsp;RssAnon (heap, stacks) | {last['anon_kib'] / 1024:.1f} MiB | | |",
            f"| &nbsp;&nbsp;RssFile (mapped files) | {last['file_kib'] / 1024:.1f} MiB | | |",
            f"| VmLck (mlockall) | {last['lck_kib'] / 1024:.1f} MiB | | |",
            f"| VmHWM (peak RSS) | {last['hwm_kib'] / 1024:.1f} MiB | | |",
            f"| threads | {last['threads']} | | |",
            f"| CPU time (utime + stime) | {cpu_ms:.0f} ms"
            f" ({cpu_ms / seconds / 10:.2f} % of one CPU) | | |",
            f"| wakeups, whole process | {wakeups:.2f} /s | | |",
            f"| wakeups, event sources (sum) | {source_total:.2f} /s | 0 |"
            f" {'met' if source_total == 0 else 'missed'} |",
            *(f"| &nbsp;&nbsp;{name} | {rate:.2f} /s | | |" for name, rate in sources.items()),
            *library,
        ]
    )


if __name__ == "__main__":
    print(run())

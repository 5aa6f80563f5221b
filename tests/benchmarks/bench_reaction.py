"""Reaction: a MemAvailable line crossed -> the SIGTERM the hog receives, reapkit vs earlyoom,
with 0, 1,000 and 10,000 sleeping processes in scope, on a quiet machine and beside a CPU load.

For each process count, one scope cgroup (memory, created here) holds the sleepers (``sleep``
processes, spawned from one Python parent inside ``<scope>/sleepers``) and, per run, the hog in
``<scope>/hog-<n>`` with a hard limit. reapkit's rule is scoped to the scope cgroup, so it ranks
the sleepers too; earlyoom always scans the whole machine, sleepers included.

The hog (comm ``rkbenchhog``, set with ``prctl(PR_SET_NAME)``) allocates private anonymous
memory in 1 MiB chunks as fast as it can fault them in, and after each chunk reads
``/proc/meminfo``: it is the only process moving MemAvailable, so the first reading below the
line is the crossing, within one chunk (~0.3 ms). It catches SIGTERM and records
``CLOCK_MONOTONIC`` in its handler: the receipt. Both times are the hog's own clock readings,
so the figure is timed the same way for both daemons. The line is MemAvailable at the start of
each run minus ``GAP``; the hog's size is ``GAP`` + 1 GiB and its cgroup limit that + 512 MiB.

reapkit: ``open_reaper`` with one rule ``mem_available < LINE``, scope = the scope cgroup,
``largest-rss``, ``terminate``. earlyoom 1.7: ``earlyoom -r 0 -M LINE,LINE-1GiB --prefer
'^rkbenchhog$' --avoid '.*'`` (SIGTERM at the line, SIGKILL 1 GiB below it; every other
process's badness lowered by 300), started for the measurement only and stopped through its own
Popen right after; its output must show that it signalled the hog's PID and nothing else, or
the benchmark stops. With the regular expressions earlyoom reads ``comm`` of every process
beside ``oom_score``; ``largest-rss`` reads ``stat`` of every candidate beside ``oom_score``:
two reads per process each.

The CPU load: one busy Python loop per CPU, in a sandbox cgroup of its own (not in either
daemon's reach: earlyoom's regular expressions lower them, reapkit's scope does not hold them),
started before a condition's runs and killed after them. Runs are interleaved: reapkit, then
earlyoom, repeated.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import trio

from reapkit._policy import PREPARE_RANKING, load_policy
from reapkit._reaper import open_reaper
from reapkit.cli._scenarios import MiB
from reapkit.testing import SandboxCgroup

GiB = 1024 * MiB
GAP = 2 * GiB
HOG_SIZE = GAP + GiB
#: Process counts in scope, and the interleaved runs per daemon at each (per condition).
SCALES = (0, 1_000, 10_000)
REPEATS = {0: 3, 1_000: 3, 10_000: 5}
CONDITIONS = ("quiet", "loaded")
SETTLE = 1.2  # the reaper (or earlyoom) runs this long before the hog starts, as in real life
TIMEOUT = 20.0
COMM = "rkbenchhog"
#: Memory the sleepers' cgroup may use (a ``sleep`` costs ~100 KiB of its own).
SLEEPERS_LIMIT = 4 * GiB
#: PIDs left free beside the sleepers (pid_max, threads-max).
PID_MARGIN = 2_000
#: ``[reaper] prepare_ranking`` for reapkit's policy; None: the default (``--prepare=0s``: off).
PREPARE: str | None = None
_SIGNALLED = re.compile(r"sending (SIG\w+) to process (\d+)")

#: Why runs were missed, for the report.
MISSED: list[str] = []
#: Filled by run(), for the plot: (processes, condition) -> daemon -> runs.
RESULTS: dict[tuple[int, str], dict[str, list[dict[str, float]]]] = {}

_HOG = r"""
import ctypes, json, mmap, os, signal, sys, time
ctypes.CDLL(None).prctl(15, b"@COMM@", 0, 0, 0)  # PR_SET_NAME
size, line = int(sys.argv[1]), int(sys.argv[2])

class Term(BaseException):
    pass

got = []

def on_term(signum, frame):
    got.append(time.monotonic())
    raise Term

signal.signal(signal.SIGTERM, on_term)
with open(os.path.join(sys.argv[3], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
meminfo = os.open("/proc/meminfo", os.O_RDONLY)

def available():
    data = os.pread(meminfo, 8192, 0)
    i = data.index(b"MemAvailable:")
    return int(data[i + 13 : data.index(b"kB", i)]) * 1024

print("joined", flush=True)
sys.stdin.readline()
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = b"\x5a" * (1 << 20)
crossed = done = None
start = above = time.monotonic()
try:
    for _ in range(size // len(chunk)):
        m.write(chunk)
        if crossed is None:
            if available() < line:
                crossed = time.monotonic()
            else:
                above = time.monotonic()
    done = time.monotonic()
    print(json.dumps({"done": done, "crossed": crossed}), flush=True)
    while True:
        time.sleep(3600)
except Term:
    pass
at_signal = available()
within = crossed is None and at_signal < line
if within:  # the signal came within the chunk that crossed: count from the chunk's start
    crossed = above
print(json.dumps({"start": start, "crossed": crossed, "signal": got[0], "done": done,
                  "available": at_signal, "within": within}), flush=True)
os._exit(0)
""".replace("@COMM@", COMM)

_SPAWNER = r"""
import os, signal, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
sleep = "/bin/sleep" if os.path.exists("/bin/sleep") else "/usr/bin/sleep"
kids = [os.posix_spawn(sleep, [sleep, "3600"], os.environ) for _ in range(int(sys.argv[2]))]
print("ready", flush=True)
sys.stdin.read()  # until the bench is done with them (or gone)
for pid in kids:  # our own children, not yet waited for: the PIDs are still theirs
    os.kill(pid, signal.SIGKILL)
for pid in kids:
    os.waitpid(pid, 0)
"""

_BUSY = r"""
import os, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
while True:
    pass
"""


def _mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        kib = int(next(line for line in f if line.startswith("MemAvailable")).split()[1])
    return kib * 1024


def _settled_available() -> int:
    """MemAvailable once it holds still (two readings 0.2 s apart within 32 MiB, for at most
    5 s): memory freed by the run before may take a moment to count as available again (here,
    free page reporting to the hypervisor holds freed pages for a while)."""
    deadline = time.monotonic() + 5
    last = _mem_available()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _mem_available()
        if abs(now - last) < 32 * MiB:
            return now
        last = now
    return last


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _free_pids() -> int:
    """PIDs (and threads) that may still be created on this machine."""
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
        pid_max = int(f.read())
    with open("/proc/sys/kernel/threads-max", encoding="ascii") as f:
        threads_max = int(f.read())
    with open("/proc/loadavg", encoding="ascii") as f:
        tasks = int(f.read().split()[3].split("/")[1])  # running/total scheduling entities
    return min(pid_max, threads_max) - tasks


@contextmanager
def _scope(sleepers: int) -> Iterator[SandboxCgroup]:
    """The scope cgroup, ``sleepers`` sleeping processes inside it; all gone afterwards."""
    with SandboxCgroup.create("memory", prefix="reapkit-bench") as scope:
        if not sleepers:
            yield scope
            return
        directory = os.path.join(scope.directory, "sleepers")
        os.mkdir(directory)
        _write(os.path.join(directory, "memory.limit_in_bytes"), str(SLEEPERS_LIMIT))
        # Their parent kills and reaps them itself when its stdin closes (PID 1 here may be
        # slow to reap orphans); remove() kills whatever is left, the sub-cgroups' too.
        spawner = subprocess.Popen(
            [sys.executable, "-c", _SPAWNER, directory, str(sleepers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert spawner.stdout is not None
            if spawner.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the sleepers' spawner failed ({spawner.wait()})")
            yield scope
        finally:
            assert spawner.stdin is not None and spawner.stdout is not None
            spawner.stdin.close()
            try:
                spawner.wait(120)
            except subprocess.TimeoutExpired:
                spawner.kill()
                spawner.wait()
            spawner.stdout.close()


@contextmanager
def _cpu_load(on: bool) -> Iterator[None]:
    """One busy loop per CPU, in a sandbox cgroup of its own, while the block runs."""
    if not on:
        yield
        return
    with SandboxCgroup.create("memory", prefix="reapkit-bench-load") as load:
        load.set_memory_limit(256 * MiB)
        busy = [
            subprocess.Popen([sys.executable, "-c", _BUSY, load.directory])
            for _ in range(os.cpu_count() or 1)
        ]
        try:
            deadline = time.monotonic() + 10
            while len(load.pids()) < len(busy) and time.monotonic() < deadline:
                time.sleep(0.05)
            yield
        finally:
            for proc in busy:  # through their own Popen, then the cgroup is removed
                proc.kill()
                proc.wait()


class _Run:
    """One measurement: the hog (paused until ``go``) in its cgroup below the scope."""

    serial = 0

    def __init__(self, scope: SandboxCgroup) -> None:
        _Run.serial += 1
        self.line = _settled_available() - GAP
        self.directory = os.path.join(scope.directory, f"hog-{_Run.serial}")
        self.hog: subprocess.Popen[str] | None = None
        self.pidfd = -1

    def __enter__(self) -> _Run:
        try:
            os.mkdir(self.directory)
            _write(os.path.join(self.directory, "memory.limit_in_bytes"), str(HOG_SIZE + 512 * MiB))
            self.hog = subprocess.Popen(
                [sys.executable, "-c", _HOG, str(HOG_SIZE), str(self.line), self.directory],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            self.pidfd = os.pidfd_open(self.hog.pid)
            assert self.hog.stdout is not None
            assert self.hog.stdout.readline().strip() == "joined"
        except BaseException:
            self.close()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.hog is not None
        return self.hog.pid

    def go(self) -> None:
        assert self.hog is not None and self.hog.stdin is not None
        self.hog.stdin.write("go\n")
        self.hog.stdin.flush()

    def report(self) -> dict[str, float] | None:
        """The hog's own account, once it ended after a SIGTERM (None: it never got one)."""
        assert self.hog is not None and self.hog.stdout is not None
        alive = self.hog.poll() is None
        lines = []
        while select.select([self.hog.stdout], [], [], 0)[0]:
            line = self.hog.stdout.readline().strip()
            if not line:
                break
            lines.append(json.loads(line))
        hog = lines[-1] if lines else {}
        if alive and "done" in hog and hog["crossed"] is None:
            raise _Early(f"the hog allocated all without crossing the line: {hog}")
        if alive:
            MISSED.append(f"the hog {self.pid} got no SIGTERM within {TIMEOUT:g} s")
            return None
        if "signal" not in hog:  # killed without a SIGTERM first (SIGKILL, a cgroup OOM)
            MISSED.append(f"the hog {self.pid} ended without a SIGTERM ({self.hog.returncode})")
            return None
        if hog["crossed"] is None:
            raise _Early(f"signalled before the hog's reading crossed the line: {hog}")
        return {
            "ms": (hog["signal"] - hog["crossed"]) * 1000,
            "past_line_mib": (self.line - hog["available"]) / MiB,
            "done_first": float(hog["done"] is not None),
            "within_chunk": float(hog["within"]),
            "crossing_s": hog["crossed"] - hog["start"],
            "crossed_at": hog["crossed"],
            "signal_at": hog["signal"],
        }

    def close(self) -> None:
        proc = self.hog
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        deadline = time.monotonic() + 10
        while os.path.isdir(self.directory):
            try:
                os.rmdir(self.directory)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Early(Exception):
    """MemAvailable moved without the hog (another process on the machine allocated or freed
    memory): a daemon reacted to that, not to the hog, or the hog could not cross the line.
    The run is discarded."""


def _wait_dead(pidfd: int, timeout: float) -> bool:
    return bool(select.select([pidfd], [], [], timeout)[0])


async def _reapkit_once(scope: SandboxCgroup) -> dict[str, float] | None:
    with _Run(scope) as run:
        reaper_table = f'[reaper]\nprepare_ranking = "{PREPARE}"\n\n' if PREPARE else ""
        policy = load_policy(
            text=(
                reaper_table + '[[rule]]\nname = "bench-reaction"\n'
                f'when = ["mem_available < {run.line}"]\n'
                f'scope = {{ cgroup = "{scope.directory}" }}\n'
                'select = ["largest-rss"]\nactions = ["terminate"]\n'
                'cooldown = "0s"\nvictim_timeout = "10s"\n'
            )
        )
        async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
            offset = time.monotonic() - trio.current_time()
            await trio.sleep(SETTLE)
            run.go()
            with trio.move_on_after(TIMEOUT):
                await trio.lowlevel.wait_readable(run.pidfd)
            record = None
            with trio.move_on_after(5):
                record = await records.receive()
        result = run.report()
        if result is None:
            return None
        if record is not None and record.timeline.signal_sent is not None:
            if record.victim is None or record.victim.pid != run.pid:
                raise RuntimeError(f"reapkit chose another victim than the hog: {record}")
            # reapkit's own account, on its timeline (the trio clock + offset: monotonic).
            t = record.timeline
            chosen = t.victim_chosen if t.victim_chosen is not None else t.signal_sent
            result["detect_ms"] = (t.trigger_seen + offset - result["crossed_at"]) * 1000
            result["choose_ms"] = (chosen - t.trigger_seen) * 1000
            result["act_ms"] = (t.signal_sent - chosen) * 1000
            result["delivery_ms"] = (result["signal_at"] - t.signal_sent - offset) * 1000
            result["prepared"] = float(any(s.selector == "prepared" for s in record.selectors))
        return result


def _earlyoom_once(binary: str, scope: SandboxCgroup) -> tuple[dict[str, float] | None, str]:
    with _Run(scope) as run, tempfile.TemporaryFile("w+") as out:
        kib = run.line // 1024
        earlyoom = subprocess.Popen(
            [binary, "-r", "0", "-M", f"{kib},{kib - GiB // 1024}",
             "--prefer", f"^{COMM}$", "--avoid", ".*"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            time.sleep(SETTLE)
            run.go()
            _wait_dead(run.pidfd, TIMEOUT)
        finally:
            earlyoom.terminate()  # right after the measurement, through its own Popen
            try:
                earlyoom.wait(5)
            except subprocess.TimeoutExpired:
                earlyoom.kill()
                earlyoom.wait()
        out.seek(0)
        text = out.read()
        signalled = {int(pid) for _sig, pid in _SIGNALLED.findall(text)}
        if signalled - {run.pid}:
            raise RuntimeError(
                f"earlyoom signalled {sorted(signalled)}, not only the hog {run.pid}: stopping.\n"
                f"{text}"
            )
        return run.report(), text


def _fmt(values: Sequence[float], digits: int = 0) -> str:
    if not values:
        return "not measured"
    return (
        f"{statistics.median(values):.{digits}f}"
        f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def _prepare_text() -> str:
    if PREPARE is None:
        return f"{PREPARE_RANKING:g}s (the default)"
    return PREPARE


def _count(runs: list[dict[str, float]], key: str) -> int:
    return int(sum(r[key] for r in runs))


def _ratio(reap: list[dict[str, float]], eo: list[dict[str, float]]) -> float | None:
    if not (reap and eo):
        return None
    return statistics.median(r["ms"] for r in reap) / statistics.median(r["ms"] for r in eo)


def measure(
    scales: Sequence[int] = SCALES,
    repeats: dict[int, int] | None = None,
    conditions: Sequence[str] = CONDITIONS,
) -> tuple[list[str], dict[str, int], str | None]:
    """Run the measurements into ``RESULTS``; (notes, misses, the earlyoom binary or None)."""
    repeats = repeats or REPEATS
    binary = shutil.which("earlyoom")
    notes: list[str] = []
    misses: dict[str, int] = {}
    for n in scales:
        if n + PID_MARGIN > _free_pids():
            notes.append(f"{n:,} processes: skipped, only {_free_pids():,} PIDs free (pid_max)")
            continue
        with _scope(n) as scope:
            for condition in conditions:
                runs: dict[str, list[dict[str, float]]] = {"reapkit": [], "earlyoom": []}
                RESULTS[(n, condition)] = runs
                with _cpu_load(condition == "loaded"):
                    for _ in range(repeats.get(n, 3)):  # interleaved: the same conditions
                        result = _discarding(
                            misses, "reapkit", lambda: trio.run(_reapkit_once, scope)
                        )
                        _keep(runs, misses, "reapkit", n, condition, result)
                        time.sleep(0.3)
                        if binary is not None:
                            eo_result = _discarding(
                                misses, "earlyoom", lambda: _earlyoom_once(binary, scope)[0]
                            )
                            _keep(runs, misses, "earlyoom", n, condition, eo_result)
                            time.sleep(0.3)
    notes.extend(f"missed: {why}" for why in MISSED)
    discarded = {n: misses.get(f"discarded {n}", 0) for n in ("reapkit", "earlyoom")}
    if any(discarded.values()):
        notes.append(
            f"Runs discarded and run again (reapkit {discarded['reapkit']}, earlyoom"
            f" {discarded['earlyoom']}): MemAvailable moved without"
            " the hog (other memory on the machine came or went), so a daemon signalled before"
            " the hog's own reading crossed the line, or the hog could not cross it."
        )
    return notes, misses, binary


def _discarding(
    misses: dict[str, int], name: str, once: Callable[[], dict[str, float] | None]
) -> dict[str, float] | None:
    """``once()``, run again (at most twice) when it was disturbed (:class:`_Early`); None
    (a miss) when it was disturbed every time."""
    for _attempt in range(3):
        try:
            return once()
        except _Early:
            misses[f"discarded {name}"] = misses.get(f"discarded {name}", 0) + 1
            time.sleep(0.3)
    return None


def _keep(
    runs: dict[str, list[dict[str, float]]],
    misses: dict[str, int],
    name: str,
    n: int,
    condition: str,
    result: dict[str, float] | None,
) -> None:
    if result is None:
        key = f"{name} {n:,} {condition}"
        misses[key] = misses.get(key, 0) + 1
    else:
        runs[name].append(result)


def run() -> str:
    if os.geteuid() != 0:
        return "## Reaction\n\nSkipped: needs root to create cgroups."
    notes, misses, binary = measure()
    return report(notes, misses, binary)


def report(notes: list[str], misses: dict[str, int], binary: str | None) -> str:
    missing = ""
    if binary is None:
        missing = (
            "**earlyoom was not measured: the `earlyoom` binary is not installed"
            " (`apt-get install earlyoom`). There is no ratio and the target is not checked.**"
        )
        print("bench_reaction: earlyoom is not installed: no comparison", file=sys.stderr)
    rows = []
    verdicts = []
    for (n, condition), runs in sorted(RESULTS.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        reap, eo = runs["reapkit"], runs["earlyoom"]
        ratio = _ratio(reap, eo)
        prepared = [r["prepared"] for r in reap if "prepared" in r]
        past = [_fmt([r["past_line_mib"] for r in rs]) for rs in (reap, eo)]
        rows.append(
            f"| {n:,} | {condition} | {_fmt([r['ms'] for r in reap], 1)}"
            f" | {_fmt([r['ms'] for r in eo], 1) if binary else 'not measured'}"
            f" | {'—' if ratio is None else f'**{ratio:.2f}**'}"
            f" | {int(sum(prepared))} of {len(prepared)}"
            f" | {past[0]} / {past[1]}"
            f" | {_count(reap, 'done_first')} / {_count(eo, 'done_first')}"
            f" | {misses.get(f'reapkit {n:,} {condition}', 0)}"
            f" / {misses.get(f'earlyoom {n:,} {condition}', 0)} |"
        )
        if n == max(SCALES) and ratio is not None:
            met = "met" if ratio <= 0.5 else "missed"
            verdicts.append(f"{condition}: {ratio:.2f}, {met}")
    target = (
        f"Target at {max(SCALES):,} processes, quiet and loaded: ≤ 0.5 —"
        f" {'; '.join(verdicts) if verdicts else 'not checked'}."
    )
    account = []
    for (n, condition), runs in sorted(RESULTS.items()):
        own = [r for r in runs["reapkit"] if "delivery_ms" in r]
        if own:
            keys = ("detect_ms", "choose_ms", "act_ms", "delivery_ms")
            cells = " | ".join(_fmt([r[key] for r in own], 1) for key in keys)
            account.append(f"| {n:,} | {condition} | {cells} |")
    return "\n".join(
        [
            "## Reaction: MemAvailable line crossed -> SIGTERM received {#reaction}",
            "",
            f"A hog (comm `{COMM}`) allocating {HOG_SIZE // MiB} MiB of anonymous memory in"
            " 1 MiB chunks as fast as it faults them in, in a memory cgroup limited to"
            f" {(HOG_SIZE + 512 * MiB) // MiB} MiB, beside N sleeping processes (`sleep`) in the"
            f" same scope cgroup. The line: MemAvailable at the start of each run minus"
            f" {GAP // MiB} MiB, so only the hog crosses it. The hog reads `/proc/meminfo` after"
            " each chunk (the first reading below the line is the crossing) and records"
            " `CLOCK_MONOTONIC` in its SIGTERM handler (the receipt): both times are the hog's"
            " own, the same for both daemons. reapkit: `open_reaper`, one rule"
            " `mem_available < LINE`, scope = the scope cgroup (the sleepers and the hog),"
            " `largest-rss` (reads `stat` of every candidate), `terminate`,"
            f" `prepare_ranking` {_prepare_text()}. earlyoom 1.7: `earlyoom -r 0 -M"
            f" LINE,LINE-1GiB --prefer '^{COMM}$' --avoid '.*'` (SIGTERM at the line; with"
            " the expressions it reads `comm` of every process beside `oom_score`), scanning"
            " the whole machine; its output showed it signalled the hog's PID and nothing"
            " else. Before each run MemAvailable is let settle (freed memory can take a moment"
            " to count again here). Both start"
            f" {SETTLE} s before the hog. *Loaded*: one busy loop per CPU"
            f" ({os.cpu_count()}) beside, in a cgroup of its own. Milliseconds from the"
            " crossing to the receipt, median (min-max), runs interleaved; the ratio is of the"
            " medians. *Prepared*: reapkit decisions that chose from a ranking prepared as the"
            " line approached. *Past the line*: how far below the line MemAvailable was at the"
            " receipt (MiB, reapkit / earlyoom). *Hog done first*: runs where the hog had"
            " finished allocating (1 GiB past the line) before the signal. Target: reapkit ≤"
            " 0.5x earlyoom at 10,000 processes, quiet and loaded.",
            *(["", missing] if missing else []),
            "",
            "| processes | condition | reapkit | earlyoom | reapkit / earlyoom | prepared |"
            " past the line, MiB | hog done first | missed |",
            "|---:|---|---|---|---:|---|---|---|---|",
            *rows,
            "",
            target,
            *(
                [
                    "",
                    "reapkit's own account (its KillRecord's timeline), ms: *detection*, the"
                    " hog's crossing to the trigger (the memory sampler's event); *choice*,"
                    " the trigger to the victim chosen; *to the signal*, the victim chosen to"
                    " `signal_sent` (the memory re-check, the pidfd, the guard); *delivery*,"
                    " `signal_sent` to the hog's receipt.",
                    "",
                    "| processes | condition | detection | choice | to the signal | delivery |",
                    "|---:|---|---|---|---|---|",
                    *account,
                ]
                if account
                else []
            ),
            *([""] + [f"- {note}" for note in notes] if notes else []),
            "",
            "![reaction vs process count](benchmarks/reaction.png)",
        ]
    )


if __name__ == "__main__":
    # python -m tests.benchmarks.bench_reaction [N[:REPEATS] ...] [--quiet-only|--loaded-only]
    #   [--prepare=DURATION] [--write]
    for arg in sys.argv[1:]:
        if arg.startswith("--prepare="):
            PREPARE = arg.split("=", 1)[1]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    chosen = {int(a.split(":")[0]): int(a.split(":")[1]) if ":" in a else 3 for a in args}
    which = [
        c for c in CONDITIONS if f"--{'loaded' if c == 'quiet' else 'quiet'}-only" not in sys.argv
    ]
    out = measure(tuple(chosen) or SCALES, chosen or None, which)
    text = report(*out)
    print(text)
    if "--write" in sys.argv:  # replace this section of docs/benchmarks.md, and the plot
        from . import run as bench_run

        old = bench_run.REPORT.read_text()
        head, rest = old.split("\n## Reaction", 1)
        tail = rest.split("\n## ", 1)[1]
        bench_run.REPORT.write_text(f"{head}\n{text.strip()}\n\n## {tail}")
        bench_run.bench_reaction.RESULTS.update(RESULTS)  # this module runs as __main__
        for path in bench_run.write_plots():
            print(f"wrote {path}", file=sys.stderr)

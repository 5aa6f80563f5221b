"""Reaction: a MemAvailable line truly crossed -> the signal, reapkit vs earlyoom.

A hog (comm ``rkbenchhog``, set with ``prctl(PR_SET_NAME)``) allocates private anonymous memory
as fast as one core can fault it in, inside a memory cgroup with a hard limit created here. The
line is MemAvailable at the start of each run minus ``GAP``; the hog's size is ``GAP`` + 1 GiB
and its cgroup limit that + 512 MiB, so only the hog can cross the line and never pushes the
machine further than its limit. An independent process reads ``/proc/meminfo`` every ~0.2 ms
and records when MemAvailable first fell below the line, and the MemAvailable it saw last
before the hog died (the headroom left).

reapkit: ``open_reaper`` with one rule ``mem_available < LINE``, scope = the hog's cgroup,
``largest-rss``, ``kill``. earlyoom: ``earlyoom -r 0 -M LINE,LINE --prefer '^rkbenchhog$'
--avoid '.*'`` (SIGKILL at the line; every other process's badness lowered by 300), started
for the measurement only and stopped through its own Popen right after; its output must show
that it signalled the hog's PID and nothing else, or the benchmark stops.

"The signal" is timed the same way for both: the hog's death (its pidfd becomes readable),
which includes the kernel's exit of a ~3 GiB process. For reapkit the KillRecord's
``signal_sent`` (trio clock converted to CLOCK_MONOTONIC) is shown too.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import trio

from reapkit._demo import MiB
from reapkit._policy import load_policy
from reapkit._reaper import open_reaper
from reapkit._sandbox import SandboxCgroup

GiB = 1024 * MiB
GAP = 2 * GiB
HOG_SIZE = GAP + GiB
REPEATS = 5
SETTLE = 1.2  # the reaper (or earlyoom) runs this long before the hog starts, as in real life
TIMEOUT = 20.0
COMM = "rkbenchhog"
_SIGNALLED = re.compile(r"sending SIG\w+ to process (\d+)")

#: Filled by run(), for the plots.
RESULTS: dict[str, list[dict[str, float]]] = {}

_HOG = r"""
import ctypes, mmap, os, sys, time
ctypes.CDLL(None).prctl(15, b"@COMM@", 0, 0, 0)  # PR_SET_NAME
size = int(sys.argv[1])
for d in sys.argv[2:]:
    with open(os.path.join(d, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
print("joined", flush=True)
sys.stdin.readline()
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = b"\x5a" * (1 << 20)
for _ in range(size // len(chunk)):
    m.write(chunk)
print(time.monotonic(), flush=True)
while True:
    time.sleep(3600)
""".replace("@COMM@", COMM)

_WATCHER = r"""
import os, select, sys, time
line = int(sys.argv[1])
fd = os.open("/proc/meminfo", os.O_RDONLY)
print("watching", flush=True)
crossed = None
samples = []
while True:
    data = os.pread(fd, 8192, 0)
    t = time.monotonic()
    i = data.index(b"MemAvailable:")
    avail = int(data[i + 13 : data.index(b"kB", i)]) * 1024
    samples.append((t, avail))
    if crossed is None and avail < line:
        crossed = t
    if select.select([sys.stdin], [], [], 0.0002)[0]:
        break
died = float(sys.stdin.readline())
low_t, low = min((s for s in samples if s[0] <= died), key=lambda s: s[1])
gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
print(crossed if crossed is not None else "nan", low, low_t,
      statistics.median(gaps) if gaps else "nan", flush=True)
""".replace("import os,", "import statistics, os,")


def _mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        kib = int(next(line for line in f if line.startswith("MemAvailable")).split()[1])
    return kib * 1024


class _Run:
    """One measurement: the sandbox, the hog (paused until ``go``) and the watcher."""

    def __init__(self) -> None:
        self.line = _mem_available() - GAP
        self.cgroup = SandboxCgroup.create("memory", prefix="reapkit-bench")
        self.hog: subprocess.Popen[str] | None = None
        self.watcher: subprocess.Popen[str] | None = None
        self.pidfd = -1

    def __enter__(self) -> _Run:
        try:
            self.cgroup.set_memory_limit(HOG_SIZE + 512 * MiB)
            self.hog = subprocess.Popen(
                [sys.executable, "-c", _HOG, str(HOG_SIZE), self.cgroup.directory],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            self.pidfd = os.pidfd_open(self.hog.pid)
            assert self.hog.stdout is not None
            assert self.hog.stdout.readline().strip() == "joined"
            self.watcher = subprocess.Popen(
                [sys.executable, "-c", _WATCHER, str(self.line)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert self.watcher.stdout is not None
            assert self.watcher.stdout.readline().strip() == "watching"
        except BaseException:
            self.close()
            raise
        return self

    def go(self) -> None:
        assert self.hog is not None and self.hog.stdin is not None
        self.hog.stdin.write("go\n")
        self.hog.stdin.flush()

    def finish(self, died: float) -> dict[str, float]:
        """Tell the watcher when the hog died; its crossing time and the headroom then."""
        assert self.watcher is not None and self.watcher.stdin is not None
        assert self.watcher.stdout is not None and self.hog is not None
        self.watcher.stdin.write(f"{died}\n")
        self.watcher.stdin.flush()
        values = [float(v) for v in self.watcher.stdout.readline().split()]
        crossed, avail, lowest_at, resolution = values
        grown = None
        assert self.hog.stdout is not None
        if select.select([self.hog.stdout], [], [], 0)[0]:
            text = self.hog.stdout.readline().strip()
            grown = float(text) if text else None
        return {
            "ms": (died - crossed) * 1000,
            "lowest_ms": (lowest_at - crossed) * 1000,
            "headroom_mib": (avail - self.line) / MiB,
            "available_mib": avail / MiB,
            "resolution_ms": resolution * 1000,
            "hog_done_first": float(grown is not None and grown < died),
        }

    def close(self) -> None:
        for proc in (self.hog, self.watcher):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.cgroup.remove()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_dead(pidfd: int, timeout: float) -> float | None:
    if select.select([pidfd], [], [], timeout)[0]:
        return time.monotonic()
    return None


async def _reapkit_once() -> dict[str, float] | None:
    with _Run() as run:
        policy = load_policy(
            text=(
                '[[rule]]\nname = "bench-reaction"\n'
                f'when = ["mem_available < {run.line}"]\n'
                f'scope = {{ cgroup = "{run.cgroup.directory}" }}\n'
                'select = ["largest-rss"]\nactions = ["kill"]\n'
                'cooldown = "0s"\nvictim_timeout = "10s"\n'
            )
        )
        async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
            offset = time.monotonic() - trio.current_time()
            await trio.sleep(SETTLE)
            run.go()
            with trio.move_on_after(TIMEOUT):
                await trio.lowlevel.wait_readable(run.pidfd)
            died = time.monotonic()
            if run.hog is None or run.hog.poll() is None:
                return None
            record = None
            with trio.move_on_after(5):
                record = await records.receive()
        result = run.finish(died)
        if record is not None and record.timeline.signal_sent is not None:
            assert record.victim is not None and record.victim.pid == run.hog.pid, record
            signal_at = record.timeline.signal_sent + offset
            result["signal_ms"] = result["ms"] - (died - signal_at) * 1000
        return result


def _earlyoom_once(binary: str) -> tuple[dict[str, float] | None, str]:
    with _Run() as run, tempfile.TemporaryFile("w+") as out:
        kib = run.line // 1024
        assert run.hog is not None
        earlyoom = subprocess.Popen(
            [binary, "-r", "0", "-M", f"{kib},{kib}",
             "--prefer", f"^{COMM}$", "--avoid", ".*"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            time.sleep(SETTLE)
            run.go()
            died = _wait_dead(run.pidfd, TIMEOUT)
        finally:
            earlyoom.terminate()  # right after the measurement, through its own Popen
            try:
                earlyoom.wait(5)
            except subprocess.TimeoutExpired:
                earlyoom.kill()
                earlyoom.wait()
        out.seek(0)
        text = out.read()
        signalled = {int(p) for p in _SIGNALLED.findall(text)}
        if signalled - {run.hog.pid}:
            raise RuntimeError(
                f"earlyoom signalled {sorted(signalled)}, not only the hog {run.hog.pid}:"
                f" stopping.\n{text}"
            )
        if died is None or run.hog.pid not in signalled:
            return None, text
        return run.finish(died), text


def _fmt(values: list[float], digits: int = 0) -> str:
    if not values:
        return "not measured"
    return (
        f"{statistics.median(values):.{digits}f}"
        f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def run() -> str:
    if os.geteuid() != 0:
        return "## Reaction\n\nSkipped: needs root to create cgroups."
    binary = shutil.which("earlyoom")
    reap: list[dict[str, float]] = []
    eo: list[dict[str, float]] = []
    misses = {"reapkit": 0, "earlyoom": 0}
    for _ in range(REPEATS):  # interleaved: the same conditions for both
        result = trio.run(_reapkit_once)
        if result is None:
            misses["reapkit"] += 1
        else:
            reap.append(result)
        time.sleep(0.5)
        if binary is not None:
            eo_result, _text = _earlyoom_once(binary)
            if eo_result is None:
                misses["earlyoom"] += 1
            else:
                eo.append(eo_result)
            time.sleep(0.5)
    RESULTS["reapkit"], RESULTS["earlyoom"] = reap, eo
    eo_note = "" if binary else " earlyoom: not measured (the `earlyoom` binary is not installed)."

    def ratio(key: str) -> str:
        if not (reap and eo):
            return "not measured"
        return (
            f"{statistics.median(r[key] for r in reap) / statistics.median(r[key] for r in eo):.2f}"
        )

    res = [r["resolution_ms"] for r in reap + eo]

    def row(name: str, rs: list[dict[str, Any]]) -> str:
        signal = [r["signal_ms"] for r in rs if "signal_ms" in r]
        return (
            f"| {name} | {_fmt([r['ms'] for r in rs])} | {_fmt([r['lowest_ms'] for r in rs])} |"
            f" {_fmt(signal) if signal else '—'} |"
            f" {_fmt([r['headroom_mib'] for r in rs])} |"
            f" {sum(int(r['hog_done_first']) for r in rs)} of {len(rs)} |"
            f" {misses[name]} |"
        )

    return "\n".join(
        [
            "## Reaction: MemAvailable line crossed -> signal",
            "",
            f"A hog (comm `{COMM}`) allocating {HOG_SIZE // MiB} MiB of anonymous memory as fast"
            " as one core faults it in, in a memory cgroup limited to"
            f" {(HOG_SIZE + 512 * MiB) // MiB} MiB. The line: MemAvailable at the start of each"
            f" run minus {GAP // MiB} MiB, so only the hog can cross it. An independent process"
            " reads `/proc/meminfo` every"
            f" {statistics.median(res) if res else float('nan'):.2f} ms (median gap) and records"
            " the first sample below the line. reapkit: one rule `mem_available < LINE`, scope ="
            " the hog's cgroup, `largest-rss`, `kill`; earlyoom v1.7:"
            f" `earlyoom -r 0 -M LINE,LINE --prefer '^{COMM}$' --avoid '.*'`, started only for"
            " the measurement; its output showed it signalled the hog's PID and nothing else."
            " Both start 1.2 s before the hog (settled into their idle sampling)."
            f" Milliseconds, median (min-max) of {REPEATS}, interleaved. *To death*: until the"
            " hog's pidfd is readable (includes the kernel's exit of the hog), timed the same way"
            " for both; *to lowest*: until the watcher's lowest MemAvailable sample (the hog"
            " stopped growing: about the signal, timed the same way for both; for reapkit it"
            " agrees with *to signal*); *to signal*: reapkit's KillRecord `signal_sent`."
            " Headroom: that lowest MemAvailable minus the line (negative: below the line)."
            " *Hog done first*: runs where the hog had finished allocating before it died."
            f" Target: reapkit's median ≤ 0.5x earlyoom's.{eo_note}",
            "",
            "| reaper | crossing -> death | crossing -> lowest | crossing -> signal |"
            " headroom left, MiB | hog done first | no kill within 20 s |",
            "|---|---|---|---|---|---|---|",
            row("reapkit", reap),
            row("earlyoom", eo) if binary else "| earlyoom | not measured | | | | | |",
            "",
            f"reapkit / earlyoom (medians): crossing -> death **{ratio('ms')}**,"
            f" crossing -> lowest **{ratio('lowest_ms')}**",
        ]
    )


if __name__ == "__main__":
    print(run())

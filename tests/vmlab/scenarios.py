"""Whole-machine shortages, run inside a guest kernel (``make bench-vm``; host side:
``tests/vmlab/bench.py``). The guest's memory is ours to exhaust: contenders kill for real.

For each scenario and contender, one at a time: start the contender and wait until it is
ready, start bystanders and a heartbeat, make the shortage, and watch from this (mlocked,
``oom_score_adj`` -1000) process: MemAvailable every 20 ms, who exits and by which signal,
the kernel's ``oom_kill`` count. Each run prints one ``RKBENCH {json}`` line::

    python -m tests.vmlab.scenarios [--repeats 3] [--scenarios leak,...] [--contenders ...]

Scenarios (the guest has ``G`` = MemTotal, 2 GiB in ``make bench-vm``):

``leak``
    one process allocates flat out, no swap. The right victim: it.
``zram``
    a slow leak that keeps touching all it holds, with zram swap (2:1 compressible pages):
    the machine thrashes long before the kernel's OOM killer acts.
``workers``
    six workers each grow to 0.15 G (0.9 G in all, beside what the machine holds already),
    no swap; any worker is a right victim.
``stuck``
    a process holding 0.45 G is stuck in state D (an O_DIRECT read from a suspended
    device-mapper device) when a second process pushes to 0.45 G; the right victim is the
    stuck one, whose memory comes back only if it is reaped.

Bystanders (two 64 MiB processes and the heartbeat) must survive every run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20
PAGE = 4096
ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
REAPKIT = str(Path(sys.executable).with_name("reapkit"))

#: Each contender's command line and the text its output shows once it watches memory
#: (reapkit's readiness is its sd_notify READY=1).
CONTENDERS: dict[str, tuple[list[str], str | None]] = {
    "kernel": ([], None),
    "earlyoom": (["earlyoom", "-r", "3600"], "mem avail:"),
    "nohang": (
        ["nohang", "--monitor", "--config", "/etc/nohang/nohang.conf"],
        "Monitoring has started",
    ),
    "reapkit-default": ([REAPKIT, "run"], None),
    "reapkit-earlyoom": ([REAPKIT, "run", str(ROOT / "examples/policies/earlyoom.toml")], None),
}
SCENARIOS = ("leak", "zram", "workers", "stuck")
#: How long a run may take before this runner ends the shortage itself: "not saved".
LIMIT = {"leak": 90.0, "zram": 100.0, "workers": 90.0, "stuck": 90.0}
STUCK_DEVICE = "rkbench-stuck"


# --- children: hogs, bystanders, the heartbeat -----------------------------------------


def _pattern(size: int) -> bytes:
    """``size`` bytes whose pages compress about 2:1 (half random, half zero): zram can
    take them, but not for free."""
    page = os.urandom(PAGE // 2) + bytes(PAGE // 2)
    return page * (size // PAGE)


def _filled(size: int) -> bytearray:
    """``size`` bytes of :func:`_pattern`, written 8 MiB at a time (no second copy)."""
    data = bytearray(size)
    block = _pattern(8 * MiB)
    for start in range(0, size, len(block)):
        piece = block[: size - start]
        data[start : start + len(piece)] = piece
    return data


def _child_grow(step_mib: int, interval: float, limit_mib: int, retouch: bool) -> None:
    """Grow by ``step_mib`` every ``interval`` up to ``limit_mib`` (0: no limit), then hold;
    with ``retouch``, write to every page held once per step (a working set, not a
    forgotten heap: under swap it thrashes)."""
    block = _pattern(step_mib * MiB)
    ones = b"\x01" * (step_mib * MiB // PAGE)
    chunks: list[bytearray] = []
    print("ready", flush=True)
    while True:
        if not limit_mib or len(chunks) * step_mib < limit_mib:
            chunks.append(bytearray(block))
        if retouch:
            for chunk in chunks:
                chunk[::PAGE] = ones
        time.sleep(interval)


def _child_keep(size_mib: int) -> None:
    """A bystander: holds ``size_mib`` and touches it once a second."""
    data = _filled(size_mib * MiB)
    ones = b"\x02" * (size_mib * MiB // PAGE)
    print("ready", flush=True)
    while True:
        data[::PAGE] = ones
        time.sleep(1.0)


def _child_stuck(size_mib: int, device: str) -> None:
    """Hold ``size_mib``, then block in state D on an O_DIRECT read of ``device`` (which is
    suspended: the read waits until it is resumed)."""
    data = _filled(size_mib * MiB)  # noqa: F841 (held, never read)
    buf = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT wants
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    print("ready", flush=True)
    os.preadv(fd, [buf], 0)
    time.sleep(3600)


def _child_heartbeat(nice: int) -> None:
    """Tick every 10 ms touching a little memory, as a program a user watches does: 4 MiB of
    its own (anonymous) and every page of a 32 MiB file it maps (its "code and data", in the
    page cache: what a shortage evicts first, and what makes a desktop freeze when it must be
    read back). On SIGUSR1 print every gap over 20 ms (monotonic end time and length, in
    seconds) as JSON, and exit. At a ``nice`` below 0 the CPU scheduler favours it over the
    hogs, so what stalls it is mostly memory."""
    os.nice(nice)
    buf = _filled(4 * MiB)
    ones = b"\x03" * (4 * MiB // PAGE)
    mapped = _mapped_file(32 * MiB)
    gaps: list[tuple[float, float]] = []
    stop = False

    def report(_signo: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGUSR1, report)
    print("ready", flush=True)
    last = time.monotonic()
    while not stop:
        time.sleep(0.01)
        buf[::PAGE] = ones
        mapped[::PAGE]  # reads one byte of every page: a page evicted meanwhile is read back
        now = time.monotonic()
        if now - last > 0.02 and len(gaps) < 20000:
            gaps.append((now, now - last - 0.01))
        last = now
    print(json.dumps(gaps), flush=True)


def _mapped_file(size: int) -> mmap.mmap:
    """``size`` bytes of a file on the guest's disk (``TMPDIR``, an ext4 scratch disk, not a
    tmpfs), written, synced and mapped read-only; the file is unlinked, the mapping stays."""
    fd, path = tempfile.mkstemp(prefix="heartbeat-")
    try:
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            os.write(fd, chunk)
        os.fsync(fd)
        return mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        os.unlink(path)


CHILDREN: dict[str, Callable[..., None]] = {
    "grow": lambda *a: _child_grow(int(a[0]), float(a[1]), int(a[2]), a[3] == "1"),
    "keep": lambda *a: _child_keep(int(a[0])),
    "stuck": lambda *a: _child_stuck(int(a[0]), a[1]),
    "heartbeat": lambda *a: _child_heartbeat(int(a[0])),
}


# --- the runner's side ------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            values[key.decode()] = int(rest.split()[0]) * 1024
    return values


class KernelLog:
    """What the kernel logs from now on (``/dev/kmsg``): the OOM killer's work is counted
    from it, because ``oom_kill`` in ``/proc/vmstat`` misses one path: a victim that is
    dying already (killed by a contender, stuck in D) is handed to the oom_reaper without
    being counted."""

    MARKS = (b"invoked oom-killer", b"oom_reaper: reaped process")

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def oom_events(self) -> int:
        count = 0
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # overwritten while we read: skip ahead
                continue
            if not record:
                break
            count += any(mark in record for mark in self.MARKS)
        os.close(self.fd)
        return count


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return "?"


def _protect_self() -> None:
    """This runner watches and cleans up: keep it out of every killer's reach and its
    pages in memory (the guest's root has CAP_SYS_RESOURCE and CAP_IPC_LOCK)."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(1 | 2) != 0:  # MCL_CURRENT | MCL_FUTURE
        print(f"mlockall failed: errno {ctypes.get_errno()}", file=sys.stderr)


def _killable() -> None:
    """In a child, before exec: undo the -1000 inherited from this runner (with every process
    unkillable, the kernel panics: "no killable processes")."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("0")


class Run:
    """One scenario under one contender: the processes it started, by role."""

    def __init__(self, scenario: str, contender: str, repeat: int, heartbeat_nice: int) -> None:
        self.scenario, self.contender, self.repeat = scenario, contender, repeat
        self.heartbeat_nice = heartbeat_nice  # 0, as a user's program runs
        self.roles: dict[int, str] = {}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.exits: dict[int, tuple[float, int]] = {}  # pid -> (when, signal or -status)
        self.samples: list[tuple[float, int]] = []
        self.total = _meminfo()["MemTotal"]

    def spawn(
        self, role: str, argv: list[str], *, ready: str | None = "ready", drain: bool = True
    ) -> int:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_killable,  # noqa: PLW1509 (this runner has no threads)
        )  # fmt: skip
        self.roles[proc.pid] = role
        self.procs[proc.pid] = proc
        if ready is not None:
            self._wait_for(proc, ready, 120.0, drain)
        return proc.pid

    def child(self, role: str, kind: str, *args: object) -> int:
        argv = [PYTHON, "-m", "tests.vmlab.scenarios", "child", kind, *map(str, args)]
        return self.spawn(role, argv, drain=kind != "heartbeat")  # it speaks once, at the end

    def _wait_for(
        self, proc: subprocess.Popen[bytes], text: str, timeout: float, drain: bool
    ) -> None:
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + timeout
        while text.encode() not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                with contextlib.suppress(OSError):
                    seen += os.read(proc.stdout.fileno(), 65536)
                raise RuntimeError(f"{proc.args!r} not ready: {seen[-600:]!r}")
            if select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    continue
                seen += chunk
        if not drain:
            return
        # From here on nobody reads it: drain to /dev/null so a chatty child cannot block.
        subprocess.Popen(
            ["cat"],
            stdin=proc.stdout,
            stdout=subprocess.DEVNULL,
            preexec_fn=_killable,  # noqa: PLW1509
        )

    def reap_children(self) -> None:
        now = time.monotonic()
        for pid, proc in self.procs.items():
            if pid not in self.exits and proc.poll() is not None:
                code = proc.returncode
                self.exits[pid] = (now, -code if code < 0 else 1000 + code)

    def end(self) -> None:
        """End whatever this run started, each by its own pid."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()  # this runner's end of the pipe (a drainer has its own)


def _start_contender(run: Run) -> int | None:
    argv, ready = CONTENDERS[run.contender]
    if not argv:
        return None
    if run.contender.startswith("reapkit"):
        return _start_reapkit(run, argv)
    return run.spawn("contender", argv, ready=ready)


def _start_reapkit(run: Run, argv: list[str]) -> int:
    """Start reapkit and wait for its sd_notify READY=1 (every fd open, the pipeline runs)."""
    path = f"/tmp/rkbench-notify-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        with open("/tmp/rkbench-reapkit.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [*argv, "--records", "/tmp/rkbench-records.jsonl"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "NOTIFY_SOCKET": path},
                preexec_fn=_killable,  # noqa: PLW1509 (this runner has no threads)
            )
        run.roles[proc.pid] = "contender"
        run.procs[proc.pid] = proc
        sock.settimeout(1.0)
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("reapkit did not get ready: see /tmp/rkbench-reapkit.log")
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in sock.recv(4096):
                    return proc.pid
    finally:
        sock.close()
        os.unlink(path)


def _dm(*args: str) -> None:
    subprocess.run(["dmsetup", *args], check=True, stdout=subprocess.DEVNULL)


def _setup_stuck_device() -> str:
    subprocess.run(["modprobe", "dm_mod"], check=False)
    with contextlib.suppress(subprocess.CalledProcessError):
        _dm("remove", "--noudevsync", STUCK_DEVICE)
    _dm("create", "--noudevsync", STUCK_DEVICE, "--table", "0 2048 zero")
    _dm("mknodes", STUCK_DEVICE)
    _dm("suspend", "--noudevsync", STUCK_DEVICE)
    return f"/dev/mapper/{STUCK_DEVICE}"


def _teardown_stuck_device() -> None:
    with contextlib.suppress(subprocess.CalledProcessError):
        _dm("resume", "--noudevsync", STUCK_DEVICE)
    time.sleep(0.5)
    with contextlib.suppress(subprocess.CalledProcessError):
        _dm("remove", "--noudevsync", STUCK_DEVICE)


def _swap(on: bool) -> None:
    if not Path("/dev/zram0").exists():
        if on:
            raise RuntimeError("no /dev/zram0: boot the guest with --zram")
        return
    swapped = "/dev/zram0" in Path("/proc/swaps").read_text()
    if on and not swapped:
        subprocess.run(["swapon", "/dev/zram0"], check=True)
    if not on and swapped:
        subprocess.run(["swapoff", "/dev/zram0"], check=True)


def _settle() -> None:
    """Between runs: caches dropped, memory quiet again."""
    subprocess.run(["sync"], check=False)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    time.sleep(2.0)


def _start_shortage(run: Run) -> None:
    g = run.total // MiB
    if run.scenario == "leak":
        run.child("victim", "grow", 32, 0.0, 0, 0)
    elif run.scenario == "zram":
        run.child("victim", "grow", 8, 0.1, 0, 1)
    elif run.scenario == "workers":
        for i in range(6):
            run.child(f"victim-{i}", "grow", 8, 0.05, int(0.15 * g) + 8 * i, 0)
    elif run.scenario == "stuck":
        size = int(0.45 * g)
        victim = run.child("victim", "stuck", size, f"/dev/mapper/{STUCK_DEVICE}")
        deadline = time.monotonic() + 60
        while _state(victim) != "D":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stuck victim is in state {_state(victim)}, not D")
            time.sleep(0.05)
        run.child("pusher", "grow", 16, 0.02, size, 0)


def run_one(scenario: str, contender: str, repeat: int, heartbeat_nice: int) -> dict[str, Any]:
    run = Run(scenario, contender, repeat, heartbeat_nice)
    _swap(scenario == "zram")
    if scenario == "stuck":
        _setup_stuck_device()
    try:
        _settle()
        _start_contender(run)
        for i in range(2):
            run.child(f"bystander-{i}", "keep", 64)
        heartbeat = run.child("heartbeat", "heartbeat", run.heartbeat_nice)
        time.sleep(1.0)
        kernel = KernelLog()
        started = time.monotonic()
        _start_shortage(run)
        return _watch(run, started, kernel, heartbeat)
    finally:
        if scenario == "stuck":
            _teardown_stuck_device()
        run.end()
        _swap(False)


def _watch(run: Run, started: float, kernel: KernelLog, heartbeat: int) -> dict[str, Any]:
    """Sample until the machine has its memory back, or the scenario's limit; then collect
    what happened. A victim stuck in D exits only once its device is resumed: who was
    killed shows then (a signal left pending on a bystander shows the same way)."""
    low, back = 0.10 * run.total, 0.15 * run.total
    onset = recovered = None
    limit = LIMIT[run.scenario]
    while True:
        now = time.monotonic()
        available = _meminfo()["MemAvailable"]
        run.samples.append((now, available))
        run.reap_children()
        if onset is None and available < low:
            onset = now
        if onset is not None and recovered is None and available >= back:
            recovered = now
        if recovered is not None and now - recovered > 2.0:
            break
        if now - started > limit:
            break
        time.sleep(0.02)
    saved = recovered is not None
    ended = time.monotonic()
    stalls = _heartbeat_gaps(run, heartbeat)
    window = [gap for end, gap in stalls if started <= end <= ended]
    if run.scenario == "stuck":
        _teardown_stuck_device()
        time.sleep(2.0)
    run.reap_children()
    died = {run.roles[p]: sig for p, (_t, sig) in run.exits.items() if run.roles[p] != "heartbeat"}
    victims = sorted(r for r in died if r.startswith("victim"))
    bystanders = sorted(r for r in died if not r.startswith("victim"))
    first_death = min(
        (t for p, (t, _s) in run.exits.items() if run.roles[p] != "heartbeat"), default=None
    )
    return {
        "scenario": run.scenario,
        "contender": run.contender,
        "heartbeat_nice": run.heartbeat_nice,
        "repeat": run.repeat,
        "saved": saved,
        "died": victims + bystanders,
        "signals": {r: died[r] for r in died},
        "right_victim": bool(victims) and not bystanders,
        "bystanders_intact": not bystanders,
        "onset_to_back_ms": round((recovered - onset) * 1000, 1) if saved and onset else None,
        "onset_to_first_death_ms": round((first_death - onset) * 1000, 1)
        if first_death and onset
        else None,
        "worst_stall_ms": round(max(window, default=0.0) * 1000, 1),
        "kernel_oom_kills": kernel.oom_events(),
        "lowest_available_mib": round(min(a for _t, a in run.samples) / MiB, 1),
        "duration_s": round(ended - started, 1),
    }


def _heartbeat_gaps(run: Run, pid: int) -> list[tuple[float, float]]:
    proc = run.procs[pid]
    if proc.poll() is not None:
        return []
    os.kill(pid, signal.SIGUSR1)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        return []
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("[")]
    return [tuple(g) for g in json.loads(lines[-1])] if lines else []  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["child"]:
        CHILDREN[args[1]](*args[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.vmlab.scenarios")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--heartbeat-nice", type=int, default=0)
    opts = parser.parse_args(args)
    if os.environ.get("REAPKIT_IN_GUEST") != "1":
        print("refusing: these scenarios exhaust the machine's memory; run them in the guest "
              "(make bench-vm)", file=sys.stderr)  # fmt: skip
        return 2
    _protect_self()
    info = _meminfo()
    print("RKBENCH " + json.dumps({
        "type": "guest", "kernel": os.uname().release, "mem_total_mib": info["MemTotal"] // MiB,
        "cpus": os.cpu_count(), "zram": Path("/dev/zram0").exists(),
    }), flush=True)  # fmt: skip
    for repeat in range(opts.repeats):  # interleaved: a drift hits every contender alike
        for scenario in opts.scenarios.split(","):
            for contender in opts.contenders.split(","):
                try:
                    result = run_one(scenario, contender, repeat, opts.heartbeat_nice)
                except Exception as exc:  # one broken run is reported, not fatal
                    result = {"scenario": scenario, "contender": contender, "repeat": repeat,
                              "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
                print("RKBENCH " + json.dumps({"type": "run", **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

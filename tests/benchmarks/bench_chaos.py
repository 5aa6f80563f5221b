"""The chaos soak: hundreds of kill cycles while plugins, reloads and the disk misbehave.

The real daemon (``reapkit run``, with the fault-injecting plugins of ``_chaos_daemon``) guards
a memory cgroup created here. Each cycle starts a victim that allocates past the rule's line
and waits for the daemon to end it. Meanwhile, at random (seeded): the selector raises, exits,
hangs, returns junk or smuggles the protected bystander in; the action and the observer raise,
exit or hang; the policy file is replaced by a valid or a broken one and SIGHUP sent (also in
the middle of a decision); the records file system (a small tmpfs) is filled and emptied.

What must hold: the daemon never exits; the protected bystander in the cgroup and a process
outside it are never signalled; every victim is ended; the daemon's fd count and RSS stay
flat. Only processes started here are signalled; everything is removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from reapkit.testing import SandboxCgroup

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
LIMIT = 256 * MiB
VICTIM = 96 * MiB  # the line is at 25 % of LIMIT: 64 MiB
CYCLES = 500
#: Seconds a victim may live before the cycle counts as missed (and the soak ends it).
VICTIM_DEADLINE = 15.0

_VICTIM = r"""
import mmap, os, sys, time
with open(sys.argv[1] + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
m = mmap.mmap(-1, int(sys.argv[2]))
for i in range(0, len(m), 4096):
    m[i] = 1
time.sleep(3600)
"""

_POLICY = """\
[reaper.reap]
threads = 1

[[rule]]
name = "chaos"
cgroup = "{cgroup}"
when = ["cgroup_usage > 25%"]
scope = {{ cgroup = "{cgroup}" }}
select = [{{ name = "protect", comm = ["^rkprotected$"] }}, "chaos-select", "largest-rss"]
actions = ["chaos-act", {signal}, "reap"]
cooldown = "0s"
victim_timeout = "2s"
max_kills = 10000
kill_window = "1s"
plugin_deadline = "500ms"
action_deadline = "3s"

[[observer]]
name = "chaos-observer"
"""
_VALID = ('"kill"', '{ name = "terminate", grace = "300ms" }')


def _broken(valid: str) -> list[bytes]:
    """Policies that must be refused, each in another way; the running one stays."""
    text = valid.encode()
    return [
        b"\xff\xfe\x00 not a policy",
        text + "# µ".encode()[:-1],  # cut inside a two-byte character
        text.replace(b'plugin_deadline = "500ms"', b"plugin_deadline = nan"),
        text.replace(b'victim_timeout = "2s"', b"victim_timeout = inf"),
        text.replace(b'cooldown = "0s"', b'cooldown = "-5s"'),
        text.replace(b"threads = 1", b"threads = 1\ncpus = 5"),
        text.replace(b"^rkprotected$", b"(a)\\\\1"),  # a backreference: not linear-time
        text.replace(b'"chaos-act"', b'"no-such-action"'),
        b"x = " + b"[" * 5000,
    ]


@attrs.define
class Soak:
    cycles: int = 0
    ended: int = 0
    missed: int = 0
    daemon_exits: int = 0
    protected_killed: int = 0
    outsider_killed: int = 0
    reloads_valid: int = 0
    reloads_broken: int = 0
    disk_fills: int = 0
    fds: list[int] = attrs.field(factory=list)
    rss_kib: list[int] = attrs.field(factory=list)
    records: dict[str, int] = attrs.field(factory=dict)
    torn_records: int = 0
    log_lines: dict[str, int] = attrs.field(factory=dict)
    seconds: float = 0.0
    exit_status: int | None = None

    @property
    def kills_without_record(self) -> int:
        """Victims the daemon ended that no "killed" record tells of."""
        return self.ended - self.records.get("killed", 0)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fill(directory: Path) -> None:
    """Fill the records file system to the last byte."""
    with contextlib.suppress(OSError), open(directory / "filler", "ab") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def soak(cycles: int = CYCLES, *, seed: int = 1, keep_log: Path | None = None) -> Soak:
    rng = random.Random(seed)
    result = Soak()
    work = Path(tempfile.mkdtemp(prefix="reapkit-chaos-"))
    records_dir = work / "records"
    records_dir.mkdir()
    mounted = False
    started: list[subprocess.Popen[Any]] = []
    cgroup = SandboxCgroup.create("memory", prefix="reapkit-chaos")
    try:
        cgroup.set_memory_limit(LIMIT)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(records_dir)],
            check=True,
        )
        mounted = True
        shutil.copy("/bin/sleep", work / "rkprotected")

        def start(argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
            started.append(p)
            return p

        bystander = start([str(work / "rkprotected"), "3600"])
        cgroup.add(bystander.pid)
        outsider = start(["sleep", "3600"])
        valid = [_POLICY.format(cgroup=cgroup.directory, signal=s) for s in _VALID]
        broken = _broken(valid[0])
        policy = work / "policy.toml"
        policy.write_text(valid[0])
        log = open(work / "daemon.log", "wb")  # noqa: SIM115 - closed in finally
        daemon = start(
            [sys.executable, "-m", "tests.benchmarks._chaos_daemon", "run", str(policy),
             "--records", str(records_dir / "records.jsonl"), "--stop-timeout", "5"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, "CHAOS_SEED": str(seed), "CHAOS_BYSTANDER": str(bystander.pid)},
        )  # fmt: skip
        _wait_running(work / "daemon.log", daemon)
        begin = time.monotonic()
        for cycle in range(cycles):
            victim = start(
                [sys.executable, "-I", "-S", "-c", _VICTIM, cgroup.directory, str(VICTIM)]
            )
            if rng.random() < 0.12:  # a reload, racing the decision this victim causes
                if rng.random() < 0.6:
                    policy.write_text(rng.choice(valid))
                    result.reloads_valid += 1
                else:
                    policy.write_bytes(rng.choice(broken))
                    result.reloads_broken += 1
                daemon.send_signal(signal.SIGHUP)
            if rng.random() < 0.04:
                _fill(records_dir)
                result.disk_fills += 1
            elif rng.random() < 0.08:
                (records_dir / "filler").unlink(missing_ok=True)
            try:
                victim.wait(VICTIM_DEADLINE)
                result.ended += 1
            except subprocess.TimeoutExpired:
                result.missed += 1
                victim.kill()
                victim.wait()
            started.remove(victim)
            result.cycles += 1
            if daemon.poll() is not None:
                result.daemon_exits += 1
                break
            if bystander.poll() is not None:
                result.protected_killed += 1
                break
            if outsider.poll() is not None:
                result.outsider_killed += 1
                break
            if cycle % max(1, cycles // 10) == 0 or cycle == cycles - 1:
                result.fds.append(_fd_count(daemon.pid))
                result.rss_kib.append(_rss_kib(daemon.pid))
        result.seconds = time.monotonic() - begin
        (records_dir / "filler").unlink(missing_ok=True)  # what waits is written at the stop
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        result.exit_status = daemon.returncode
        log.close()
        _read_records(records_dir / "records.jsonl", result)
        _read_log(work / "daemon.log", result)
        if keep_log is not None:
            shutil.copy(work / "daemon.log", keep_log)
        return result
    finally:
        for p in started:  # only our own children, by their Popen
            if p.poll() is None:
                p.kill()
                p.wait()
        cgroup.remove()
        if mounted:
            subprocess.run(["umount", str(records_dir)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def _wait_running(log: Path, daemon: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"running:" in log.read_bytes():
            return
        if daemon.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the daemon did not start:\n{log.read_text(errors='replace')}")


def _read_records(path: Path, result: Soak) -> None:
    if not path.exists():
        return
    for line in path.read_bytes().splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            result.torn_records += 1
            continue
        key = data.get("outcome") or data.get("type") or "?"
        result.records[key] = result.records.get(key, 0) + 1


_LOG_MARKS = {
    "keeping the current policy": "reloads refused",
    "reloaded": "reloads done",
    "switched off": "plugins switched off",
    "selector chaos-select": "selector faults isolated",
    "action chaos-act": "action faults isolated",
    "observer chaos-observer": "observer faults isolated",
    "records": "records-file warnings",
}


def _read_log(path: Path, result: Soak) -> None:
    for line in path.read_text(errors="replace").splitlines():
        for mark, label in _LOG_MARKS.items():
            if mark in line:
                result.log_lines[label] = result.log_lines.get(label, 0) + 1


def report(result: Soak, cycles: int, seed: int) -> str:
    fds = " → ".join(map(str, result.fds))
    rss = " → ".join(f"{k / 1024:.1f}" for k in result.rss_kib)
    lines = [
        "## Chaos soak",
        "",
        f"`python -m tests.benchmarks.bench_chaos {cycles} {seed}` (also part of `make bench`):"
        f" {result.cycles} kill cycles in {result.seconds:.0f} s against the real daemon, with"
        " fault-injecting selector, action and observer plugins, SIGHUPs with valid and broken"
        " policies, and a records file system filled and emptied at random.",
        "",
        "| what | count |",
        "|---|---|",
        f"| kill cycles | {result.cycles} |",
        f"| victims ended by the daemon | {result.ended} |",
        f"| victims missed (ended by the soak after {VICTIM_DEADLINE:g} s) | {result.missed} |",
        f"| kills without a record | {result.kills_without_record} |",
        f"| daemon exits | {result.daemon_exits} (exit status at SIGTERM: {result.exit_status}) |",
        f"| protected bystander killed | {result.protected_killed} |",
        f"| out-of-scope process killed | {result.outsider_killed} |",
        f"| SIGHUP, valid policy / broken policy | {result.reloads_valid} /"
        f" {result.reloads_broken} |",
        f"| records file system filled | {result.disk_fills} times |",
        f"| torn records lines | {result.torn_records} |",
        f"| daemon fds, every {max(1, cycles // 10)} cycles | {fds} |",
        f"| daemon VmRSS MiB, every {max(1, cycles // 10)} cycles | {rss} |",
    ]
    lines += [f"| records: {k} | {n} |" for k, n in sorted(result.records.items())]
    lines += [f"| log: {k} | {n} |" for k, n in sorted(result.log_lines.items())]
    return "\n".join(lines) + "\n"


def run() -> str:
    return report(soak(CYCLES, seed=1), CYCLES, 1)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else CYCLES
    s = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    kept = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    print(report(soak(n, seed=s, keep_log=kept), n, s))

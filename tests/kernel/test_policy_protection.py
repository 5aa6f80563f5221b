"""Policy matching on the real kernel: regexes in linear time, and protection that a process
cannot claim by choosing its own name (issue 11). Every process here is started by the test in
a sandbox cgroup, and the policies run in dry-run: nothing is signalled."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from reapkit import CgroupScope, load_policy, open_reaper
from reapkit._sandbox import SandboxCgroup

from ..conftest import MiB, Spawn

pytestmark = pytest.mark.kernel

_RULE = """
[[rule]]
name = "t"
scope = "system"
select = [{{ name = "protect", cmdline = ["^(a+)+$"] }}, "largest-rss"]
actions = ["kill"]
"""


def _wait_for(path: str, prefix: bytes) -> None:
    deadline = time.monotonic() + 30
    while not Path(path).read_bytes().startswith(prefix):
        assert time.monotonic() < deadline, Path(path).read_bytes()
        time.sleep(0.005)


async def test_a_backtracking_pattern_decides_at_once(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    # 30 'a's and a '!': 14 s per decision with Python's re (issue 11); RE2 is linear.
    name = "a" * 30 + "!"
    victim = spawn(["bash", "-c", f"exec -a {name} sleep 600"], cgroups=[memory_cgroup])
    _wait_for(f"/proc/{victim.pid}/cmdline", name.encode())
    policy = load_policy(
        text=_RULE.format(),
        dry_run=True,
        scope=CgroupScope.from_directory(memory_cgroup.directory),
        when=[],
    )
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        with trio.fail_after(5):  # generous: a decision takes milliseconds
            await reaper.trigger("test")
            record = await records.receive()
    assert record.victim is not None and record.victim.pid == victim.pid
    assert record.outcome == "dry-run"


# Names itself (prctl PR_SET_NAME), holds argv[2] MiB, drops to uid/gid argv[3], says ready.
_NAMED = """\
import ctypes, os, sys, time
ctypes.CDLL(None, use_errno=True).prctl(15, sys.argv[1].encode(), 0, 0, 0)
held = b"x" * (int(sys.argv[2]) << 20)
os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[3]))
print("ready", flush=True)
time.sleep(600)
"""


async def test_a_hog_named_sshd_is_not_protected_by_the_default_policy(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    hog = spawn(
        [sys.executable, "-c", _NAMED, "sshd", "64", "65534"],
        cgroups=[memory_cgroup],
        stdout=subprocess.PIPE,
    )
    assert hog.stdout is not None and hog.stdout.readline() == b"ready\n"
    innocent = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    assert Path(f"/proc/{hog.pid}/comm").read_text() == "sshd\n"
    policy = load_policy(
        dry_run=True, scope=CgroupScope.from_directory(memory_cgroup.directory), when=[]
    )
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        with trio.fail_after(30):
            await reaper.trigger("test")
            record = await records.receive()
    # The default's first rule: its protect selectors spared nobody; the hog has the top score.
    assert record.rule == "low-memory" and record.outcome == "dry-run", record
    assert record.victim is not None and record.victim.pid == hog.pid
    assert record.victim.rss >= 60 * MiB
    assert "none of 2 protected" in record.selectors[0].reason
    assert innocent.poll() is None and hog.poll() is None

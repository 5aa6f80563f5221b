"""Policy matching on the real kernel: regexes in linear time, and protection that a process
cannot claim by choosing its own name (issue 11). Every process here is started by the test in
a sandbox cgroup, and the policies run in dry-run: nothing is signalled."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from reapkit import CgroupScope, load_policy, open_reaper
from reapkit.testing import SandboxCgroup

from ..conftest import MiB, Spawn

pytestmark = pytest.mark.kernel

_RULE = """
[[rule]]
name = "t"
scope = "system"
select = [{{ name = "protect", {protect} }}, "largest-rss"]
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
        text=_RULE.format(protect='cmdline = ["^(a+)+$"]'),
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


_SLEEP = os.path.realpath(shutil.which("sleep") or "/bin/sleep")


@pytest.fixture
def hog_file() -> Iterator[str]:
    """A copy of ``sleep`` that uid 65534 may run: another file than the genuine one."""
    directory = tempfile.mkdtemp(prefix="reapkit-exe-")
    try:
        os.chmod(directory, 0o755)
        path = shutil.copy(_SLEEP, os.path.join(directory, "hog"))
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(directory)


_AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _wearing(
    path: str, hog_file: str, spawn: Spawn, cgroup: SandboxCgroup
) -> subprocess.Popen[bytes]:
    """uid 65534 runs ``hog_file`` bind-mounted over ``path`` in a user namespace of its own."""
    probe = subprocess.run([*_AS_NOBODY, "unshare", "-Urm", "true"], check=False)
    if probe.returncode != 0:
        pytest.skip("unprivileged user namespaces are disabled here: exe cannot be spoofed")
    wear = f'mount --bind "$0" {path} && exec {path} 600'
    spoof = spawn([*_AS_NOBODY, "unshare", "-Urm", "sh", "-c", wear, hog_file], cgroups=[cgroup])
    deadline = time.monotonic() + 30
    while os.readlink(f"/proc/{spoof.pid}/exe") != path:  # what root reads: the disguise
        assert spoof.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    assert not os.path.samestat(os.stat(f"/proc/{spoof.pid}/exe"), os.stat(path))
    return spoof


async def test_an_exe_bind_mounted_in_a_user_namespace_is_not_identity(
    spawn: Spawn, memory_cgroup: SandboxCgroup, hog_file: str
) -> None:
    spoof = _wearing(_SLEEP, hog_file, spawn, memory_cgroup)
    genuine = spawn([_SLEEP, "600"], cgroups=[memory_cgroup])
    policy = load_policy(
        text=_RULE.format(protect=f"exe = ['^{re.escape(_SLEEP)}$']"),
        dry_run=True,
        scope=CgroupScope.from_directory(memory_cgroup.directory),
        when=[],
    )
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        with trio.fail_after(30):
            await reaper.trigger("test")
            record = await records.receive()
    assert record.victim is not None and record.victim.pid == spoof.pid, record
    assert f"protected 1 of 2: pid {genuine.pid} 'sleep'" in record.selectors[0].reason
    assert spoof.poll() is None and genuine.poll() is None

"""Kept-open ``oom_score`` files and lazy candidates against the real kernel.

Every process here is a ``sleep`` this test started (``spawn``), in a sandbox memory cgroup;
nothing is signalled except through its own ``Popen``.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from reapkit._engine import Engine
from reapkit._policy import Policy, load_policy
from reapkit._procfs import KeptScoreFiles
from reapkit._reaper import open_reaper
from reapkit.lowlevel import ProcFS
from reapkit.testing import SandboxCgroup

from ..conftest import PID_REUSE, Spawn, run_in_pid_namespace

pytestmark = pytest.mark.kernel


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def three(spawn: Spawn, memory_cgroup: SandboxCgroup) -> list[subprocess.Popen[bytes]]:
    return [spawn(cgroups=[memory_cgroup]) for _ in range(3)]


def test_kept_files_read_what_a_fresh_read_reads(three: list[subprocess.Popen[bytes]]) -> None:
    procfs = ProcFS()
    pids = [p.pid for p in three]
    before = _open_fds()
    kept = KeptScoreFiles(procfs, limit=100)
    try:
        first = kept.read(pids)
        assert first == [(pid, procfs.oom_score(pid)) for pid in pids]
        assert len(kept) == 3 and _open_fds() == before + 3
        assert kept.read(pids) == first  # the second read: pread on the same files
        assert _open_fds() == before + 3

        three[0].kill()
        three[0].wait()
        # The exited process's file reads ESRCH: it is closed and the process left out.
        assert [pid for pid, _ in kept.read(pids)] == pids[1:]
        assert len(kept) == 2

        kept.retain({pids[1]})
        assert len(kept) == 1 and _open_fds() == before + 1
    finally:
        kept.close()
    assert len(kept) == 0 and _open_fds() == before


def test_past_its_limit_the_rest_is_read_the_plain_way(
    three: list[subprocess.Popen[bytes]],
) -> None:
    procfs = ProcFS()
    pids = [p.pid for p in three]
    kept = KeptScoreFiles(procfs, limit=1)
    try:
        assert [pid for pid, _ in kept.read(pids)] == pids
        assert len(kept) == 1
    finally:
        kept.close()


async def test_an_engine_keeps_the_files_of_its_scope_and_closes_them(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    big = spawn([sys.executable, "-c", "b = b'x' * (64 << 20); import time; time.sleep(600)"],
                cgroups=[memory_cgroup])  # fmt: skip
    small = [spawn(cgroups=[memory_cgroup]) for _ in range(3)]
    policy = load_policy(
        text=(
            "[reaper]\nkeep_score_files = 100\n[[rule]]\nname = 'r'\n"
            f"scope = {{ cgroup = '{memory_cgroup.directory}' }}\nselect = ['oom-score']\n"
            "actions = ['kill']\n"
        ),
        dry_run=True,
    )
    assert policy.keep_score_files == 100
    before = _open_fds()

    async def ignore(_record: object) -> None:
        return None

    engine = Engine(policy.rules, emit=ignore, keep_score_files=policy.keep_score_files)
    try:
        chosen, ranked, _steps = await engine.preview(policy.rules[0])
        assert chosen is not None and chosen.candidate.pid == big.pid
        assert {r.candidate.pid for r in ranked} == {big.pid, *(p.pid for p in small)}
        assert _open_fds() == before + 4
        small[0].kill()
        small[0].wait()
        await engine.preview(policy.rules[0])  # the exited one's file is closed
        assert _open_fds() == before + 3
    finally:
        engine.close()
    assert _open_fds() == before


# In a private PID namespace, ns_last_pid makes the next fork reuse a PID on demand.
_REUSE = (
    PID_REUSE
    + r"""
import json, os, subprocess, time
from reapkit._engine import _boot_tick
from reapkit._plugins import Candidate
from reapkit._procfs import KeptScoreFiles
from reapkit.lowlevel import ProcFS

procfs = ProcFS()
first = subprocess.Popen(["sleep", "600"])
pid = first.pid
kept = KeptScoreFiles(procfs, limit=10)
scanned_from = _boot_tick()                # taken before the score is read, as the engine does
kept.read([pid])
old_fd = kept._fds[pid]
second = take_pid_of(first, settle=SETTLE)
result = {"reused": second.pid == pid}
try:
    os.pread(old_fd, 64, 0)
    result["old_file"] = "read"
except ProcessLookupError:
    result["old_file"] = "ESRCH"
result["kept_read"] = [p for p, _ in kept.read([pid])] == [pid]
result["closed"] = pid not in kept._fds
kept.read([pid])
result["reopened"] = pid in kept._fds
result["lazy_state"] = Candidate.lazy(pid, 666, procfs, born_from=scanned_from).state
result["fresh_comm"] = Candidate.lazy(pid, 666, procfs, born_from=10**12).comm
kept.close()
second.kill()
second.wait()
print(json.dumps(result))
"""
)


@pytest.mark.parametrize("settle", [0.05, 0.0], ids=["next-tick", "same-tick"])
def test_after_pid_reuse_a_kept_file_and_a_lazy_candidate_never_read_the_newcomer(
    settle: float,
) -> None:
    assert run_in_pid_namespace(_REUSE.replace("SETTLE", repr(settle))) == {
        "reused": True,
        # The file opened for the first process fails once it is gone, also after reuse.
        "old_file": "ESRCH",
        # KeptScoreFiles closes it and reads the PID afresh: the newcomer, as itself; its
        # own file is kept from the next read on.
        "kept_read": True,
        "closed": True,
        "reopened": True,
        # A stat read after the reuse shows a start in or after the tick taken before the
        # score was read (the same tick, when the PID changed hands at once): not the one
        # scored.
        "lazy_state": "X",
        "fresh_comm": "sleep",
    }


def _keeping_policy(cgroup: SandboxCgroup) -> Policy:
    """Dry run, kept files, one rule scoped to ``cgroup`` that waits for memory to run out."""
    return load_policy(
        text=(
            "[reaper]\nkeep_score_files = 100\n[[rule]]\nname = 'r'\n"
            f"scope = {{ cgroup = '{cgroup.directory}' }}\n"
            "when = ['mem_available < 1%']\nselect = ['oom-score']\nactions = ['kill']\n"
        ),
        dry_run=True,
    )


async def test_a_reaper_opens_the_kept_files_at_start_and_closes_them_at_exit(
    three: list[subprocess.Popen[bytes]], memory_cgroup: SandboxCgroup
) -> None:
    policy = _keeping_policy(memory_cgroup)
    before = _open_fds()
    async with open_reaper(policy) as reaper:
        kept = reaper._engine._kept
        assert kept is not None
        assert len(kept) == len(three)  # opened before the reaper reported started
    assert len(kept) == 0
    assert _open_fds() == before


async def test_a_reaper_raises_its_file_limit_to_fit_and_gives_it_back(
    three: list[subprocess.Popen[bytes]], memory_cgroup: SandboxCgroup
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = _open_fds() + 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        async with open_reaper(_keeping_policy(memory_cgroup)):
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= low + 100
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_reaper_that_fails_to_start_closes_its_kept_files(
    three: list[subprocess.Popen[bytes]],
    memory_cgroup: SandboxCgroup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def sources_fail(*args: object, task_status: object) -> None:
        raise RuntimeError("a source failed to start")

    monkeypatch.setattr("reapkit._reaper._run_sources", sources_fail)
    policy = _keeping_policy(memory_cgroup)
    before = _open_fds()
    with pytest.RaisesGroup(
        pytest.RaisesExc(RuntimeError, match="failed to start"), flatten_subgroups=True
    ):
        async with open_reaper(policy):
            raise AssertionError("started")
    assert _open_fds() == before

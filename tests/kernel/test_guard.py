"""The kill guard, one test per refusal, on the real kernel wherever it can be shown there.

Dangerous targets (PID 1, kernel threads, the test process itself) are only ever offered
signal 0: if the guard had a bug, nothing would happen to them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import attrs
import pytest

from reapkit import (
    CgroupScope,
    InvalidValue,
    KillGuard,
    KillRefused,
    ProcessRef,
    RefusalReason,
    SignalOutcome,
    SubtreeScope,
    SystemScope,
)
from reapkit.lowlevel import CgroupMount, Probe, ProcFS
from reapkit.testing import FakeProc, SandboxCgroup

from ..conftest import Spawn, need, run_in_pid_namespace

pytestmark = pytest.mark.kernel


def _alive(child: subprocess.Popen[bytes]) -> bool:
    return child.poll() is None


def test_an_out_of_scope_kill_is_impossible(
    spawn: Spawn, memory_cgroup: SandboxCgroup, other_memory_cgroup: SandboxCgroup
) -> None:
    victim = spawn(cgroups=[memory_cgroup])
    bystander = spawn(cgroups=[other_memory_cgroup])
    guard = KillGuard(CgroupScope.from_directory(memory_cgroup.directory))

    with ProcessRef.open(bystander.pid) as ref:
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
            with pytest.raises(KillRefused) as info:
                guard.send_signal(ref, sig)
            assert info.value.refusal.reason is RefusalReason.OUT_OF_SCOPE
            assert other_memory_cgroup.directory.rsplit("/", 1)[1] in info.value.refusal.detail
    assert _alive(bystander)
    assert guard.statistics().refusals == {"out-of-scope": 3}

    with ProcessRef.open(victim.pid) as ref:
        assert guard.send_signal(ref, signal.SIGKILL) is SignalOutcome.SENT
    assert victim.wait(10) == -signal.SIGKILL
    assert _alive(bystander)
    assert guard.statistics().signals_sent == 1


def test_cgroup_scope_includes_child_cgroups(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    nested = Path(memory_cgroup.directory, "nested")
    nested.mkdir()
    try:
        child = spawn()
        (nested / "cgroup.procs").write_text(str(child.pid))
        guard = KillGuard(CgroupScope.from_directory(memory_cgroup.directory))
        assert guard.check(child.pid, None) is None
        child.kill()
        child.wait(10)
    finally:
        nested.rmdir()


def test_subtree_scope(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    # In a sandbox, so the grandchild is killed at teardown even if the test fails.
    parent = spawn(
        ["sh", "-c", "sleep 600 & echo $!; wait"], cgroups=[memory_cgroup], stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    grandchild = int(parent.stdout.readline())
    stranger = spawn()
    with ProcessRef.open(parent.pid) as root:
        guard = KillGuard(SubtreeScope.of(root))
    assert guard.check(parent.pid, None) is None
    assert guard.check(grandchild, None) is None
    refusal = guard.check(stranger.pid, None)
    assert refusal is not None and refusal.reason is RefusalReason.OUT_OF_SCOPE
    with ProcessRef.open(grandchild) as ref:
        guard.send_signal(ref, signal.SIGKILL)
    assert parent.wait(10) == 0  # POSIX: `wait` with no operands exits 0


def test_pid_1_is_refused() -> None:
    guard = KillGuard(SystemScope())
    with ProcessRef.open(1) as init, pytest.raises(KillRefused) as info:
        guard.send_signal(init, 0)
    assert info.value.refusal.reason is RefusalReason.PID_ONE
    assert guard.check(0, None).reason is RefusalReason.INVALID_PID  # type: ignore[union-attr]


def test_the_reaper_itself_and_its_threads_are_refused() -> None:
    guard = KillGuard(SystemScope())
    with ProcessRef.open(os.getpid()) as me, pytest.raises(KillRefused) as info:
        guard.send_signal(me, 0)
    assert info.value.refusal.reason is RefusalReason.REAPER_ITSELF

    tids: list[int] = []
    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=lambda: (tids.append(threading.get_native_id()), ready.set(), done.wait())
    )
    thread.start()
    try:
        ready.wait()
        refusal = guard.check(tids[0], None)
        assert refusal is not None and refusal.reason is RefusalReason.REAPER_ITSELF
    finally:
        done.set()
        thread.join()


def test_kernel_threads_are_refused() -> None:
    guard = KillGuard(SystemScope())
    procfs = ProcFS()
    kthreads = [pid for pid in procfs.pids() if pid > 2 and _kthread(procfs, pid)][:5]
    assert kthreads, "a running kernel has kernel threads"
    for pid in [2, *kthreads]:
        with ProcessRef.open(pid) as ref, pytest.raises(KillRefused) as info:
            guard.send_signal(ref, 0)
        assert info.value.refusal.reason is RefusalReason.KERNEL_THREAD


#: Run as PID 1 of a new PID namespace: PID 2 is a shell, PID 3 its child; what the guard
#: says of each, scoped to the shell's sub-tree.
PID_2_IN_A_NAMESPACE = r"""
import json, os, subprocess, time
from reapkit import KillGuard, ProcessRef, SubtreeScope
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write("1")
shell = subprocess.Popen(["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE)
child = int(shell.stdout.readline())
with ProcessRef.open(shell.pid) as root:
    guard = KillGuard(SubtreeScope.of(root))
stat = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()
out = {"shell": shell.pid, "child": child, "child_ppid": int(stat[1])}
for name, pid in [("shell", shell.pid), ("child", child), ("init", 1)]:
    refusal = guard.check(pid, None)
    out[name + "_refusal"] = refusal and refusal.reason.value
os.kill(child, 9)
shell.kill()
shell.wait()
print(json.dumps(out))
"""


def test_in_a_pid_namespace_pid_2_and_its_children_are_ordinary_processes() -> None:
    seen = run_in_pid_namespace(PID_2_IN_A_NAMESPACE)
    assert (seen["shell"], seen["child_ppid"]) == (2, 2)
    assert seen["shell_refusal"] is None
    assert seen["child_refusal"] is None
    assert seen["init_refusal"] == "pid-1"  # the namespace's init: its death ends them all


#: Run as PID 1 of a new PID namespace whose /proc is still the host's: the reaper's PID there
#: is not its getpid(), so nothing /proc says names what a pidfd would reach.
FOREIGN_PROC = r"""
import json, os
from reapkit import KillGuard, SystemScope
me = int(os.readlink("/proc/self"))
refusal = KillGuard(SystemScope()).check(me, None)
print(json.dumps({"getpid": os.getpid(), "me": me, "refusal": refusal and refusal.reason.value}))
"""


def test_a_proc_of_another_pid_namespace_refuses_everything() -> None:
    seen = run_in_pid_namespace(FOREIGN_PROC, mount_proc=False)
    assert seen["getpid"] == 1 and seen["me"] != 1
    assert seen["refusal"] == "foreign-pid-namespace"


def _kthread(procfs: ProcFS, pid: int) -> bool:
    try:
        return procfs.stat(pid).is_kernel_thread
    except ProcessLookupError:
        return False


def test_identity_change_and_gone(spawn: Spawn) -> None:
    child = spawn()
    guard = KillGuard(SystemScope())
    start = ProcFS().stat(child.pid).start_time
    refusal = guard.check(child.pid, start + 1)
    assert refusal is not None and refusal.reason is RefusalReason.IDENTITY_CHANGED
    child.kill()
    child.wait(10)
    refusal = guard.check(child.pid, start)
    assert refusal is not None and refusal.reason is RefusalReason.GONE


def test_dry_run_signals_nothing(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    victim = spawn(cgroups=[memory_cgroup])
    guard = KillGuard(CgroupScope.from_directory(memory_cgroup.directory), dry_run=True)
    with ProcessRef.open(victim.pid) as ref:
        assert guard.send_signal(ref, signal.SIGKILL) is SignalOutcome.DRY_RUN
    assert guard.kill_cgroup(memory_cgroup.directory) is SignalOutcome.DRY_RUN
    assert _alive(victim)


def test_oom_score_adj_min_on_the_real_kernel(spawn: Spawn, kernel: Probe) -> None:
    if not kernel.capabilities["CAP_SYS_RESOURCE"]:
        need("CAP_SYS_RESOURCE to give a process oom_score_adj -1000")
    child = spawn()
    Path(f"/proc/{child.pid}/oom_score_adj").write_text("-1000")
    guard = KillGuard(SystemScope())
    with ProcessRef.open(child.pid) as ref, pytest.raises(KillRefused) as info:
        guard.send_signal(ref, signal.SIGKILL)
    assert info.value.refusal.reason is RefusalReason.OOM_SCORE_ADJ_MIN
    assert _alive(child)


def test_oom_score_adj_min_on_a_fake_tree(tmp_path: Path) -> None:
    # Runs everywhere, including hosts without CAP_SYS_RESOURCE (the test above skips there).
    fake = FakeProc(tmp_path)
    fake.add_process(999_001, comm="sshd", oom_score_adj=-1000, cgroup="/sandbox")
    fake.add_process(999_002, comm="hog", oom_score_adj=0, cgroup="/sandbox")
    scope = CgroupScope(CgroupMount("/sys/fs/cgroup", 2, ()), "/sandbox")
    guard = KillGuard(scope, procfs=ProcFS(tmp_path))
    refusal = guard.check(999_001, 1000)
    assert refusal is not None and refusal.reason is RefusalReason.OOM_SCORE_ADJ_MIN
    assert guard.check(999_002, 1000) is None
    explicit = KillGuard(scope, procfs=ProcFS(tmp_path), allow_oom_score_adj_min=True)
    assert explicit.check(999_001, 1000) is None


def test_scopes_on_a_fake_tree(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add_process(999_010, ppid=1, start_time=50, cgroup="/sandbox/a")
    fake.add_process(999_011, ppid=999_010, cgroup="/sandbox-other")
    fake.add_process(999_012, ppid=999_011, cgroup="/elsewhere")
    fake.add_process(999_013, ppid=1, cgroup="/sandbox")
    procfs = ProcFS(tmp_path)
    cg = CgroupScope(CgroupMount("/sys/fs/cgroup", 2, ()), "/sandbox")
    assert cg.excludes(999_010, procfs) is None
    assert cg.excludes(999_013, procfs) is None
    assert cg.excludes(999_011, procfs) is not None  # a prefix, not a parent: /sandbox-other
    tree = SubtreeScope(999_010, 50)
    assert tree.excludes(999_012, procfs) is None
    assert tree.excludes(999_013, procfs) is not None
    assert SubtreeScope(999_010, 51).excludes(999_012, procfs) is not None  # root was reused


def test_refusals_are_logged_with_their_reason(caplog: pytest.LogCaptureFixture) -> None:
    guard = KillGuard(SystemScope())
    with caplog.at_level(logging.WARNING, logger="reapkit.guard"):
        guard.check(1, None)  # a question: not logged above debug, not counted
        assert caplog.text == ""
        with ProcessRef.open(1) as init, pytest.raises(KillRefused):
            guard.send_signal(init, 0)
    assert "pid-1" in caplog.text and "process 1" in caplog.text
    assert guard.statistics().refusals == {"pid-1": 1}


def test_a_guard_on_a_fake_proc_never_signals(spawn: Spawn, tmp_path: Path) -> None:
    # A fake tree could approve a PID that, on the real system, is somebody else.
    child = spawn()
    fake = FakeProc(tmp_path)
    start = ProcFS().stat(child.pid).start_time
    fake.add_process(child.pid, comm="sleep", start_time=start, cgroup="/sandbox")
    guard = KillGuard(SystemScope(), procfs=ProcFS(tmp_path))
    assert not guard.signals_enabled
    with ProcessRef.open(child.pid) as ref:
        assert guard.send_signal(ref, signal.SIGKILL) is SignalOutcome.DRY_RUN
    assert _alive(child)


def test_a_hand_built_ref_cannot_point_elsewhere(spawn: Spawn) -> None:
    victim, other = spawn(), spawn()
    guard = KillGuard(SystemScope())
    with ProcessRef.open(other.pid) as real:
        forged = ProcessRef(
            victim.pid, ProcFS().stat(victim.pid).start_time, real.fileno(), ProcFS()
        )
        with pytest.raises(ValueError, match=f"names process {other.pid}, not {victim.pid}"):
            guard.send_signal(forged, signal.SIGKILL)
        forged._pidfd = -1  # type: ignore[attr-defined]  # the fd belongs to `real`
        with pytest.raises(attrs.exceptions.FrozenAttributeError):
            real.pid = victim.pid  # type: ignore[misc]
    assert _alive(victim) and _alive(other)


def test_guard_settings_are_frozen() -> None:
    guard = KillGuard(SubtreeScope(os.getpid(), 0), dry_run=True)
    with pytest.raises(attrs.exceptions.FrozenAttributeError):
        guard.dry_run = False  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenAttributeError):
        guard.scope = SystemScope()  # type: ignore[misc]


def test_a_cgroup_scope_at_the_root_must_be_said_as_system_scope() -> None:
    with pytest.raises(InvalidValue, match="SystemScope"):
        CgroupScope(CgroupMount("/sys/fs/cgroup", 2, ()), "/")


def test_unreadable_and_exiting_on_a_fake_tree(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add_process(999_020, comm="garbled", cgroup="/sandbox")
    fake.write("999020/oom_score_adj", "lots\n")
    fake.add_process(999_021, comm="zombie", state="Z", cgroup="/sandbox")
    fake.add_process(999_022, comm="exiting", flags=0x4, cgroup="/sandbox")
    guard = KillGuard(SystemScope(), procfs=ProcFS(tmp_path))
    assert guard.check(999_020, None).reason is RefusalReason.UNREADABLE  # type: ignore[union-attr]
    assert guard.check(999_021, None).reason is RefusalReason.GONE  # type: ignore[union-attr]
    assert guard.check(999_022, None).reason is RefusalReason.GONE  # type: ignore[union-attr]


def test_kill_cgroup_v2(spawn: Spawn, v2_cgroup: SandboxCgroup) -> None:
    members = [spawn(cgroups=[v2_cgroup]) for _ in range(2)]
    guard = KillGuard(CgroupScope.from_directory(v2_cgroup.directory))
    assert guard.kill_cgroup(v2_cgroup.directory) is SignalOutcome.SENT
    assert [m.wait(10) for m in members] == [-signal.SIGKILL] * 2


def test_kill_cgroup_v2_under_a_subtree_scope_goes_member_by_member(
    spawn: Spawn, v2_cgroup: SandboxCgroup
) -> None:
    # cgroup.kill would reach whoever joins the cgroup after the check; a subtree scope cannot
    # vouch for that, so each member is checked and signalled through its own pidfd.
    member = spawn(cgroups=[v2_cgroup])
    stranger = spawn()
    with ProcessRef.open(member.pid) as root:
        guard = KillGuard(SubtreeScope.of(root))
    assert guard.kill_cgroup(v2_cgroup.directory) is SignalOutcome.SENT
    assert member.wait(10) == -signal.SIGKILL
    assert _alive(stranger)


def test_kill_cgroup_v1_through_pidfds(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    members = [spawn(cgroups=[memory_cgroup]) for _ in range(2)]
    guard = KillGuard(CgroupScope.from_directory(memory_cgroup.directory))
    assert guard.kill_cgroup(memory_cgroup.directory) is SignalOutcome.SENT
    assert [m.wait(10) for m in members] == [-signal.SIGKILL] * 2


def test_kill_cgroup_outside_scope_is_refused_whole(
    spawn: Spawn, memory_cgroup: SandboxCgroup, other_memory_cgroup: SandboxCgroup
) -> None:
    bystanders = [spawn(cgroups=[other_memory_cgroup]) for _ in range(2)]
    guard = KillGuard(CgroupScope.from_directory(memory_cgroup.directory))
    with pytest.raises(KillRefused) as info:
        guard.kill_cgroup(other_memory_cgroup.directory)
    assert info.value.refusal.reason is RefusalReason.OUT_OF_SCOPE
    assert all(_alive(b) for b in bystanders)


def test_a_hog_subprocess_never_escapes_its_cgroup_limit(memory_cgroup: SandboxCgroup) -> None:
    # The sandbox rule itself: a hog larger than the limit is killed inside its cgroup.
    memory_cgroup.set_memory_limit(64 << 20)
    done = subprocess.run(
        [sys.executable, "-m", "reapkit._testing._hog", str(256 << 20), memory_cgroup.directory],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL

"""The kernel layer against the real kernel, on processes and cgroups the tests create."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading

import pytest

from reapkit import NotDying, ProcessRef, Unsupported
from reapkit._kernel._syscalls import release_free_heap
from reapkit.cli._scenarios import stuck_victim
from reapkit.lowlevel import (
    MreleaseOutcome,
    Probe,
    ProcFS,
    cgroup_kill,
    pidfd_open,
    pidfd_send_signal,
    process_mrelease,
    set_oom_score_adj,
)
from reapkit.testing import SandboxCgroup

from ..conftest import DOCTOR_JSON_KEYS, MiB, Spawn, need

pytestmark = pytest.mark.kernel


@pytest.fixture
def mrelease(kernel: Probe) -> None:
    if not kernel.process_mrelease:
        need("process_mrelease (Linux 5.15, allowed by seccomp)")


def test_pidfd_open_errors() -> None:
    with pytest.raises(ProcessLookupError):
        pidfd_open(2**22 + 1)  # above any pid_max: cannot exist
    tid: list[int] = []
    ready, done = threading.Event(), threading.Event()

    def thread() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        done.wait()

    t = threading.Thread(target=thread)
    t.start()
    try:
        ready.wait()
        with pytest.raises(ValueError, match="is a thread"):
            pidfd_open(tid[0])
    finally:
        done.set()
        t.join()


def test_pidfd_signal_reaches_the_process_then_esrch_after_wait(spawn: Spawn) -> None:
    child = spawn()
    fd = pidfd_open(child.pid)
    try:
        pidfd_send_signal(fd, signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            pidfd_send_signal(fd, 0)  # reaped: the pidfd no longer names a process
    finally:
        os.close(fd)


_HANDLES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: None)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.mark.usefixtures("mrelease")
def test_mrelease_after_sigterm_alone_is_not_dying(
    spawn: Spawn, freezer_cgroup: SandboxCgroup
) -> None:
    # A victim that handles SIGTERM (a graceful shutdown) has no fatal signal pending: the
    # kernel refuses to reap it. (At SIGTERM's *default* disposition the kernel sometimes
    # turns it into a group exit at delivery and then allows the reap, depending on whether
    # a thread "wants" the signal at that moment: only SIGKILL makes a victim reapable.)
    child = spawn([sys.executable, "-c", _HANDLES_SIGTERM], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    freezer_cgroup.add(child.pid)
    freezer_cgroup.freeze()  # so the handler cannot run and the process cannot exit
    with ProcessRef.open(child.pid) as ref:
        ref.send_signal(signal.SIGTERM)
        with pytest.raises(NotDying, match="not dying"):
            process_mrelease(ref.fileno(), pid=child.pid)
        ref.send_signal(signal.SIGKILL)
        assert process_mrelease(ref.fileno()) is MreleaseOutcome.REAPED
    freezer_cgroup.thaw()
    assert child.wait(10) == -signal.SIGKILL


@pytest.mark.usefixtures("mrelease")
def test_mrelease_of_a_reaped_process_is_already_freed(spawn: Spawn) -> None:
    child = spawn()
    with ProcessRef.open(child.pid) as ref:
        ref.send_signal(signal.SIGKILL)
        child.wait(10)
        assert process_mrelease(ref.fileno()) is MreleaseOutcome.ALREADY_FREED


@pytest.mark.usefixtures("mrelease")
def test_mrelease_frees_a_frozen_victim_and_the_kill_alone_does_not(
    memory_cgroup: SandboxCgroup, freezer_cgroup: SandboxCgroup
) -> None:
    memory_cgroup.set_memory_limit(256 * MiB)
    size = 128 * MiB
    kw = {"size": size, "bound": 1.0, "memory": memory_cgroup, "freezer": freezer_cgroup}
    alone = stuck_victim("kill-only", procfs=ProcFS(), **kw)  # type: ignore[arg-type]
    reaped = stuck_victim("mrelease", procfs=ProcFS(), **kw)  # type: ignore[arg-type]

    assert alone.victim_state == reaped.victim_state == "D"
    assert alone.ms_to_memory_back is None
    assert alone.freed_bytes is not None and alone.freed_bytes < size // 10
    assert alone.ms_after_thaw is not None  # it was stuck, not leaking: thawing frees it

    assert reaped.ms_to_memory_back is not None and reaped.ms_to_memory_back < 1000
    assert reaped.freed_bytes is not None and reaped.freed_bytes >= size * 0.9
    assert memory_cgroup.pids() == [] and freezer_cgroup.pids() == []


def test_mrelease_bad_fd_is_an_oserror() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="process_mrelease") as info:
            process_mrelease(r)
        assert not isinstance(info.value, (NotDying, Unsupported))
    finally:
        os.close(r)
        os.close(w)


def _in_child(code: str) -> str:
    """Run ``code`` in a fresh interpreter (mlockall and oom_score_adj change the process)."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def test_mlockall_locks_and_munlockall_unlocks() -> None:
    out = _in_child(
        "from reapkit.lowlevel import mlockall, munlockall\n"
        "def vmlck():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status')"
        " if l.startswith('VmLck'))\n"
        "on_fault = mlockall()\n"
        "locked = vmlck()\n"
        "munlockall()\n"
        "print(on_fault, locked > 0, vmlck())\n"
    )
    assert out == "True True 0"


def test_oom_score_adj_raise_and_lower(kernel: Probe) -> None:
    out = _in_child(
        "from reapkit import AccessDenied\n"
        "from reapkit.lowlevel import set_oom_score_adj\n"
        "set_oom_score_adj(500)\n"
        "print(open('/proc/self/oom_score_adj').read().strip())\n"
        "try:\n"
        "    set_oom_score_adj(-1000)\n"
        "    print('lowered')\n"
        "except AccessDenied as e:\n"
        "    print('denied:', e)\n"
    )
    first, second = out.splitlines()
    assert first == "500"
    if kernel.capabilities["CAP_SYS_RESOURCE"]:
        assert second == "lowered"
    else:
        assert second.startswith("denied:") and "CAP_SYS_RESOURCE" in second
    with pytest.raises(ValueError, match=r"-1000\.\.1000"):
        set_oom_score_adj(1001)


def test_cgroup_kill_on_v2_kills_every_member(spawn: Spawn, v2_cgroup: SandboxCgroup) -> None:
    children = [spawn(cgroups=[v2_cgroup]) for _ in range(3)]
    cgroup_kill(v2_cgroup.directory)
    assert [c.wait(10) for c in children] == [-signal.SIGKILL] * 3


def test_cgroup_kill_on_v1_is_unsupported(memory_cgroup: SandboxCgroup) -> None:
    if memory_cgroup.mount.version != 1:
        need("a cgroup v1 memory hierarchy to show the v1 case")
    with pytest.raises(Unsupported, match=r"cgroup\.kill"):
        cgroup_kill(memory_cgroup.directory)


def test_probe_matches_this_host(kernel: Probe) -> None:
    doc = kernel.as_json()
    assert set(doc) >= DOCTOR_JSON_KEYS
    assert kernel.pidfd is True  # the suite already used pidfds to get here
    if kernel.psi_triggers:
        assert os.path.exists("/proc/pressure/memory")
    if kernel.psi_unprivileged_only:
        assert not kernel.capabilities["CAP_SYS_RESOURCE"]
    with open("/proc/self/mounts", encoding="ascii") as f:
        mounts = [line.split() for line in f]
    mounted_v1 = {m[3].split(",")[-1] for m in mounts if m[2] == "cgroup"}
    assert mounted_v1 <= set(kernel.cgroup_v1_controllers) | {"rw"}


def test_release_free_heap_gives_freed_memory_back() -> None:
    if platform.libc_ver()[0] != "glibc":
        need("glibc (malloc_trim)")
    junk = [bytes(2048) for _ in range(20_000)]  # 40 MiB in malloc'd blocks, not pymalloc's
    pin = [bytes(2048) for _ in range(10)]  # above them: free() alone cannot trim the top
    del junk
    assert release_free_heap() is True  # pages in the middle of the heap went back
    del pin

"""The reap stage on the real kernel: pinned, prioritised threads really calling
``process_mrelease`` on processes the tests start, inside cgroups they create."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from reapkit import ProcessRef, Unsupported
from reapkit._reap_stage import THREAD_NAME_PREFIX, ReapSettings, ReapStage
from reapkit.lowlevel import Probe, effective_capabilities
from reapkit.testing import SandboxCgroup, start_hog

from ..conftest import MiB, Spawn, need, require_root

pytestmark = pytest.mark.kernel

GiB = 1 << 30


@pytest.fixture
def mrelease(kernel: Probe) -> None:
    if not kernel.process_mrelease:
        need("process_mrelease (Linux 5.15, allowed by seccomp)")


def cap_sys_nice() -> None:
    require_root()
    if not effective_capabilities().get("CAP_SYS_NICE", False):
        need("CAP_SYS_NICE", "a negative nice value or a real-time policy")


def reaper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME_PREFIX)]


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


_HANDLES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: None)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.mark.usefixtures("mrelease")
async def test_each_thread_pins_itself_and_reaps_on_its_cpu(
    spawn: Spawn, freezer_cgroup: SandboxCgroup
) -> None:
    cap_sys_nice()
    cpu = max(os.sched_getaffinity(0))
    main = (os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0))
    child = spawn(cgroups=[freezer_cgroup])
    freezer_cgroup.freeze()
    async with trio.open_nursery() as nursery:
        settings = ReapSettings(threads=2, cpus={cpu}, nice=-5)
        stage = await nursery.start(ReapStage(settings).serve)
        info = stage.thread_info()
        with ProcessRef.open(child.pid) as ref:
            ref.send_signal(signal.SIGKILL)
            result = await stage.reap(ref)
        nursery.cancel_scope.cancel()
    assert [(t.cpus, t.nice, t.policy) for t in info] == [({cpu}, -5, "other")] * 2
    assert result.outcome == "reaped" and result.error is None
    assert result.cpu == cpu and result.thread.startswith(THREAD_NAME_PREFIX)
    # Per thread: the process and its trio thread kept their own settings.
    assert (
        os.sched_getaffinity(0),
        os.getpriority(os.PRIO_PROCESS, 0),
        os.sched_getscheduler(0),
    ) == main
    freezer_cgroup.thaw()
    assert child.wait(10) == -signal.SIGKILL


@pytest.mark.parametrize(
    ("policy", "priority", "nice"),
    [("batch", 0, 5), ("idle", 0, None), ("fifo", 1, None), ("rr", 2, None), ("other", 0, 19)],
)
async def test_scheduling_policies_are_applied_per_thread(
    policy: str, priority: int, nice: int | None
) -> None:
    if policy in ("fifo", "rr"):
        cap_sys_nice()
    settings = ReapSettings(threads=2, policy=policy, priority=priority, nice=nice)  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            stage = await nursery.start(ReapStage(settings).serve)
            info = stage.thread_info()
            nursery.cancel_scope.cancel()
    except* PermissionError as group:  # e.g. no real-time runtime in this cpu cgroup
        need(f"SCHED_{policy.upper()}", str(group.exceptions[0]))
    assert [(t.policy, t.priority) for t in info] == [(policy, priority)] * 2
    if nice is not None:
        assert [t.nice for t in info] == [nice] * 2
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert reaper_threads() == []


_WITHOUT_CAP_SYS_NICE = """
import ctypes, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_CAPBSET_DROP, CAP_SYS_NICE = 24, 23
if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0) != 0:
    sys.exit(f"prctl: {os.strerror(ctypes.get_errno())}")
# No rlimit escape hatch either:
resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
# Root's capabilities are recomputed at exec from the bounding set: CAP_SYS_NICE is gone.
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""

_TRY_SETTINGS = """
import threading, trio
from reapkit import AccessDenied
from reapkit.lowlevel import effective_capabilities
from reapkit._reap_stage import ReapSettings, ReapStage

assert not effective_capabilities().get("CAP_SYS_NICE", False)

async def main():
    for settings in (ReapSettings(nice=-5), ReapSettings(policy="fifo", priority=10),
                     ReapSettings(nice=5)):
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(ReapStage(settings).serve)
            except AccessDenied as exc:
                print("denied:", exc)
            else:
                print("started")
                nursery.cancel_scope.cancel()
    print("threads:", [t.name for t in threading.enumerate() if t.name != "MainThread"])

trio.run(main)
"""


def test_missing_cap_sys_nice_is_named() -> None:
    require_root()
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CAP_SYS_NICE, _TRY_SETTINGS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4, done.stdout
    assert lines[0].startswith("denied: permission denied: nice=-5 ")
    assert "CAP_SYS_NICE" in lines[0]
    assert lines[1].startswith("denied: permission denied: policy='fifo' priority=10 ")
    assert "CAP_SYS_NICE" in lines[1]
    assert lines[2] == "started"  # raising the nice value needs nothing
    assert lines[3] == "threads: []"


@pytest.mark.usefixtures("mrelease")
async def test_already_freed_and_not_dying(spawn: Spawn, freezer_cgroup: SandboxCgroup) -> None:
    gone = spawn()
    stubborn = spawn([sys.executable, "-c", _HANDLES_SIGTERM], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    untouched = spawn()
    for child in (stubborn, untouched):
        freezer_cgroup.add(child.pid)
    freezer_cgroup.freeze()
    async with trio.open_nursery() as nursery:
        stage = await nursery.start(ReapStage().serve)
        with ProcessRef.open(gone.pid) as ref:
            ref.send_signal(signal.SIGKILL)
            gone.wait(10)  # reaped by us: its memory is long gone
            freed = await stage.reap(ref)
        with ProcessRef.open(stubborn.pid) as ref:
            ref.send_signal(signal.SIGTERM)  # handled, and it cannot even run: not dying
            term = await stage.reap(ref)
        with ProcessRef.open(untouched.pid) as ref:
            nothing = await stage.reap(ref)
            ref.send_signal(signal.SIGKILL)
            killed = await stage.reap(ref)
        stats = stage.statistics()
        nursery.cancel_scope.cancel()
    assert (freed.outcome, freed.error) == ("already-freed", None)
    assert term.outcome == nothing.outcome == "not-dying"
    assert term.error is not None and "not dying" in term.error
    assert killed.outcome == "reaped"
    assert (stats.already_freed, stats.not_dying, stats.reaped, stats.failed) == (1, 2, 1, 0)
    assert all(r.attempts == 1 for r in (freed, term, nothing, killed))


@pytest.fixture
def big_sandbox() -> Iterator[tuple[SandboxCgroup, SandboxCgroup]]:
    """A memory cgroup limited to 1 GiB + 200 MiB, and a v1 freezer cgroup.

    (Not the ``memory_cgroup`` fixture: on cgroup v1 its 256 MiB limit also set
    ``memory.memsw.limit_in_bytes``, and ``memory.limit_in_bytes`` cannot be raised above that,
    which ``SandboxCgroup.set_memory_limit`` writes second.)
    """
    require_root()
    try:
        memory = SandboxCgroup.create("memory", prefix="reapkit-test")
    except Unsupported as exc:
        need(exc.feature)
    try:
        memory.set_memory_limit(GiB + 200 * MiB)
        try:
            freezer = SandboxCgroup.create("freezer", prefix="reapkit-test")
        except Unsupported as exc:
            need(exc.feature)
        try:
            yield memory, freezer
        finally:
            freezer.remove()
    finally:
        memory.remove()


@pytest.mark.slow
@pytest.mark.usefixtures("mrelease")
async def test_a_frozen_1gib_victim_is_reaped_while_the_loop_keeps_ticking(
    big_sandbox: tuple[SandboxCgroup, SandboxCgroup],
) -> None:
    size = GiB
    memory_cgroup, freezer_cgroup = big_sandbox
    fds = open_fds()
    ticks: list[float] = []

    async def heartbeat(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            ticks.append(time.perf_counter())
            await trio.sleep(0.001)

    with start_hog(size, [memory_cgroup.directory, freezer_cgroup.directory]) as hog:
        try:
            with ProcessRef.open(hog.pid) as ref:
                freezer_cgroup.freeze()
                with open(f"/proc/{hog.pid}/stat") as f:
                    assert f.read().rsplit(")", 1)[1].split()[0] == "D"
                before = memory_cgroup.memory_usage()
                assert before >= size
                async with trio.open_nursery() as nursery:
                    stage = await nursery.start(ReapStage(ReapSettings(threads=2)).serve)
                    await nursery.start(heartbeat)
                    await trio.sleep(0.05)
                    ref.send_signal(signal.SIGKILL)
                    t0 = time.perf_counter()
                    result = await stage.reap(ref)
                    t1 = time.perf_counter()
                    freed_at_result = before - memory_cgroup.memory_usage()
                    await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
                # Memory back: within a short bound of the result (uncharging may lag a bit).
                deadline = time.monotonic() + 2
                while before - memory_cgroup.memory_usage() < 0.9 * size:
                    assert time.monotonic() < deadline, "memory did not come back"
                    await trio.sleep(0.001)
                freed = before - memory_cgroup.memory_usage()
        finally:
            freezer_cgroup.thaw()
    during = [b - a for a, b in itertools.pairwise(ticks) if b >= t0 and a <= t1]
    max_gap = max(during, default=0.0)
    print(
        f"\nreap of a frozen {size / GiB:.0f} GiB victim: {result.duration * 1000:.1f} ms"
        f" in the thread, {(t1 - t0) * 1000:.1f} ms awaited; freed at the result"
        f" {freed_at_result / MiB:.0f} MiB, then {freed / MiB:.0f} MiB; heartbeat: {len(during)}"
        f" gaps during the reap, the largest {max_gap * 1000:.2f} ms"
    )
    assert result.outcome == "reaped" and result.attempts == 1
    assert result.thread.startswith(THREAD_NAME_PREFIX)
    assert freed >= 0.9 * size
    # Blocked for the reap, the loop would tick at most once or twice in it; free, about once
    # per millisecond (timer slack and the other core's load make it less).
    assert len(during) >= result.duration / 0.004, "the heartbeat stalled during the reap"
    assert max_gap < 0.1, f"the trio loop stalled for {max_gap * 1000:.1f} ms during the reap"
    assert reaper_threads() == []
    assert open_fds() == fds
    assert memory_cgroup.pids() == []

"""cgroup v2 on the real kernel: memory lines on memory.current/memory.max, memory.events
wake-ups, per-cgroup pressure triggers, cgroup.kill and cgroup.freeze, and the user.oomd_*
xattrs that cgroup-victims honours.

These need the cgroup v2 memory controller: they run in the guest-kernel lab (``make
test-vm``) and on any v2-only host; this project's hosts (v1 memory) skip them.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from reapkit import Candidate, ManualTrigger, Ranked, Situation, load_policy, open_reaper
from reapkit._procfs import ProcFS
from reapkit._sources.memory import MemoryEvent, MemoryThreshold, MemoryThresholdSource
from reapkit._sources.psi import PressureEvent, PsiTriggerSource
from reapkit._testing._hog import disk_backed_tmp, make_thrash_file, start_hog, start_thrasher
from reapkit._units import parse_psi, parse_size
from reapkit.builtin.selectors import CgroupVictims, CgroupVictimsOptions
from reapkit.testing import SandboxCgroup

from ..conftest import MiB, Spawn, need

#: Seconds a hog may take to start: a guest under software emulation is slow.
SLOW = 300.0

pytestmark = [pytest.mark.kernel, pytest.mark.vm, pytest.mark.timeout(5 * SLOW)]


def _v2(cgroup: SandboxCgroup) -> SandboxCgroup:
    if cgroup.mount.version != 2:
        need("the cgroup v2 memory controller", f"memory cgroups here are v{cgroup.mount.version}")
    return cgroup


@pytest.fixture
def v2_memory(memory_cgroup: SandboxCgroup) -> SandboxCgroup:
    return _v2(memory_cgroup)


@pytest.fixture
def v2_other(other_memory_cgroup: SandboxCgroup) -> SandboxCgroup:
    return _v2(other_memory_cgroup)


@pytest.fixture
def thrash_file() -> Iterator[str]:
    directory = disk_backed_tmp()
    if directory is None:
        need("a disk-backed directory (/tmp and /var/tmp are tmpfs)")
    path = Path(directory, f"reapkit-thrash-{os.getpid()}")
    try:
        make_thrash_file(str(path), 128 * MiB)
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


def _events(cgroup: SandboxCgroup) -> dict[str, int]:
    text = Path(cgroup.directory, "memory.events").read_text()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def test_the_sandbox_limits_memory_and_the_kernel_enforces_it(v2_memory: SandboxCgroup) -> None:
    v2_memory.set_memory_limit(64 * MiB)
    assert Path(v2_memory.directory, "memory.max").read_text().strip() == str(64 * MiB)
    swap_max = Path(v2_memory.directory, "memory.swap.max")
    if swap_max.exists():
        assert swap_max.read_text().strip() == "0"
    with start_hog(32 * MiB, [v2_memory.directory], timeout=SLOW):
        assert v2_memory.memory_usage() >= 32 * MiB
    with pytest.raises(RuntimeError, match="failed to start"):
        start_hog(96 * MiB, [v2_memory.directory], timeout=SLOW)  # past memory.max: OOM-killed
    assert _events(v2_memory)["oom_kill"] >= 1


async def test_a_usage_line_on_memory_current_crosses_and_recovers(
    v2_memory: SandboxCgroup,
) -> None:
    v2_memory.set_memory_limit(128 * MiB)
    threshold = MemoryThreshold("cgroup_usage", parse_size("50%"), cgroup=v2_memory.directory)
    source = MemoryThresholdSource([threshold])
    send, receive = trio.open_memory_channel[MemoryEvent](16)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        with trio.fail_after(2 * SLOW):
            hog = await trio.to_thread.run_sync(
                functools.partial(start_hog, 80 * MiB, [v2_memory.directory], timeout=SLOW)
            )
            with hog:
                crossed = await receive.receive()
            recovered = await receive.receive()
            while recovered.state == "still-crossed":
                recovered = await receive.receive()
        nursery.cancel_scope.cancel()
    assert crossed.state == "crossed" and crossed.value >= 64 * MiB
    assert crossed.total == 128 * MiB  # memory.max, not MemTotal
    assert recovered.state == "recovered"


async def test_memory_events_wake_the_sampler(v2_memory: SandboxCgroup) -> None:
    v2_memory.set_memory_limit(32 * MiB)
    # A line far away: the sampler sleeps long, so a wake-up can only come from memory.events.
    threshold = MemoryThreshold("cgroup_usage", parse_size("99%"), cgroup=v2_memory.directory)
    source = MemoryThresholdSource([threshold])
    send, _receive = trio.open_memory_channel[MemoryEvent](16)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        with trio.fail_after(2 * SLOW):
            with pytest.raises(RuntimeError, match="failed to start"):  # past memory.max
                await trio.to_thread.run_sync(
                    functools.partial(start_hog, 48 * MiB, [v2_memory.directory], timeout=SLOW)
                )
            while source.statistics().notifications == 0:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert _events(v2_memory)["max"] > 0


async def test_a_cgroup_pressure_trigger_fires_on_its_own_cgroup(
    v2_memory: SandboxCgroup, thrash_file: str
) -> None:
    v2_memory.set_memory_limit(48 * MiB)
    spec = parse_psi("memory some 50ms/1s", cgroup=v2_memory.directory)  # 1 s: CAP_SYS_RESOURCE
    source = PsiTriggerSource(spec)
    send, receive = trio.open_memory_channel[object](16)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        with trio.fail_after(2 * SLOW):
            thrasher = await trio.to_thread.run_sync(
                functools.partial(start_thrasher, thrash_file, [v2_memory.directory], timeout=SLOW)
            )
            with thrasher:
                event = await receive.receive()
        nursery.cancel_scope.cancel()
    assert isinstance(event, PressureEvent) and event.spec == spec


def test_cgroup_freeze_holds_and_sigkill_still_ends_the_member(
    v2_memory: SandboxCgroup, spawn: Spawn
) -> None:
    child = spawn(cgroups=[v2_memory])
    v2_memory.freeze()
    assert v2_memory.frozen
    # The v2 freezer is not the v1 one: a fatal signal wakes a frozen task and it exits
    # (a stuck victim in state D needs the v1 freezer, or a hung file system).
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(60) == -signal.SIGKILL


def test_cgroup_victims_honours_oomd_xattrs_and_pressure(
    v2_memory: SandboxCgroup, v2_other: SandboxCgroup, thrash_file: str
) -> None:
    procfs = ProcFS()
    v2_memory.set_memory_limit(48 * MiB)
    with (
        start_hog(64 * MiB, [v2_other.directory], timeout=SLOW) as big,
        start_thrasher(thrash_file, [v2_memory.directory], timeout=SLOW) as thrasher,
    ):
        candidates = [
            Ranked(Candidate.from_info(procfs.process_info(p.pid))) for p in (big, thrasher)
        ]

        def choose(**options: object) -> int:
            situation = Situation("v2", ManualTrigger(0.0, "test"), procfs.meminfo(), procfs, 0)
            chosen = CgroupVictims(CgroupVictimsOptions(**options)).select(situation, candidates)
            return chosen[0].candidate.pid

        assert choose(by="usage") == big.pid
        os.setxattr(v2_memory.directory, "user.oomd_prefer", b"1")
        assert choose(by="usage") == thrasher.pid
        os.removexattr(v2_memory.directory, "user.oomd_prefer")
        os.setxattr(v2_memory.directory, "user.oomd_omit", b"1")
        assert choose(by="usage") == big.pid  # the thrasher's cgroup is never chosen
        os.removexattr(v2_memory.directory, "user.oomd_omit")
        end = time.monotonic() + 60
        while choose(by="pressure") != thrasher.pid:  # avg10 needs a few seconds of stalls
            assert time.monotonic() < end, "the thrashing cgroup never showed more pressure"
            time.sleep(0.5)


def test_the_demo_runs_on_pure_cgroup_v2(v2_memory: SandboxCgroup) -> None:
    """The pipeline show runs on v2 (memory.max, cgroup pressure); the stuck-victim show says
    why it cannot: the v2 freezer lets SIGKILL through, so no victim stays in state D."""
    del v2_memory  # only to know that memory cgroups here are v2
    done = subprocess.run(
        [sys.executable, "-m", "reapkit.cli", "demo", "--json", "--size-mib", "96",
         "--timeout", "900"],
        capture_output=True, text=True, timeout=4 * SLOW, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pipeline, alone, reaped = json.loads(done.stdout)
    (record,) = pipeline["records"]
    assert record["outcome"] == "killed" and record["timeline_ms"]["memory_back"] is not None
    for show in (alone, reaped):
        assert show["skipped"] and "freezer" in show["skipped"]


async def test_a_rule_on_its_cgroups_own_pressure_ends_the_thrasher(
    v2_memory: SandboxCgroup, thrash_file: str
) -> None:
    """``pressure_cgroup``: the rule's PSI condition watches the cgroup's own memory.pressure,
    and the real pipeline ends the process that makes it."""
    v2_memory.set_memory_limit(48 * MiB)
    policy = load_policy(
        text=f"""
[[rule]]
name = "v2"
pressure_cgroup = "{v2_memory.directory}"
when = ["memory some 50ms/1s"]
scope = {{ cgroup = "{v2_memory.directory}" }}
actions = ["kill"]
"""
    )
    with trio.fail_after(2 * SLOW):
        async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
            thrasher = await trio.to_thread.run_sync(
                functools.partial(start_thrasher, thrash_file, [v2_memory.directory], timeout=SLOW)
            )
            with thrasher:
                record = await records.receive()
                assert thrasher.process.wait(SLOW) == -signal.SIGKILL
    assert record.outcome == "killed" and record.victim is not None
    assert record.victim.pid == thrasher.pid
    assert str(v2_memory.directory) in record.condition

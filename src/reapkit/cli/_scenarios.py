"""The stuck-victim demonstration: why a reaper wants ``process_mrelease``.

A victim frozen by the cgroup v1 freezer sits in uninterruptible sleep (state ``D``), like a
process stuck on a dead NFS server or a slow disk. SIGKILL is delivered but the victim cannot
run to its exit, so it never frees its memory. ``process_mrelease`` frees that memory from the
killer's side. Both scenarios run in sandbox cgroups created here (a memory cgroup with a hard
limit and a freezer cgroup) and removed afterwards, also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import attrs
import trio

from .._errors import Unsupported
from .._guard import CgroupScope, KillGuard
from .._interrupts import deferred_interrupts
from .._kernel._cgroups import cgroup_mounts, mount_for
from .._kernel._syscalls import process_mrelease
from .._policy import load_policy
from .._process import ProcessRef
from .._procfs import ProcFS
from .._reaper import open_reaper
from .._testing._hog import (
    disk_backed_tmp,
    make_thrash_file,
    start_grower,
    start_hog,
    start_thrasher,
)
from .._testing._sandbox import SandboxCgroup

MiB: Final = 1 << 20
#: Memory counts as back when the sandbox's usage fell by this share of what the victim touched.
BACK_FRACTION: Final = 0.9
_POLL: Final = 0.0005


@attrs.frozen
class ScenarioResult:
    """One scenario of the demo. ``ms_to_memory_back`` is ``None`` when not within the bound."""

    scenario: str
    victim_rss_bytes: int | None
    freed_bytes: int | None
    ms_to_memory_back: float | None
    bound_ms: float
    #: The victim's state when it was killed (``D``: uninterruptible sleep).
    victim_state: str | None = None
    #: kill-only: how long after the thaw the memory came back.
    ms_after_thaw: float | None = None
    #: mrelease: how long the ``process_mrelease`` call itself took.
    mrelease_call_ms: float | None = None
    skipped: str | None = None
    #: The pipeline scenario: its KillRecords (``KillRecord.as_json()``).
    records: list[dict[str, Any]] | None = None

    def as_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        if self.records is None:
            del data["records"]
        return data


def _wait_freed(
    usage: Callable[[], int], before: int, target: int, bound: float, start: float
) -> tuple[float | None, int]:
    """Poll the sandbox's usage until ``target`` bytes are freed or ``bound`` s have passed
    since ``start``. Returns (ms from start or None, bytes freed at the end)."""
    while True:
        freed = before - usage()
        now = time.monotonic()
        if freed >= target:
            return (now - start) * 1000, freed
        if now - start > bound:
            return None, freed
        time.sleep(_POLL)


def stuck_victim(
    scenario: str,
    *,
    size: int,
    bound: float,
    memory: SandboxCgroup,
    freezer: SandboxCgroup,
    procfs: ProcFS,
) -> ScenarioResult:
    """Run one scenario: ``"kill-only"`` or ``"mrelease"``."""
    guard = KillGuard(CgroupScope.from_directory(memory.directory), procfs=procfs)
    with start_hog(size, [memory.directory, freezer.directory]) as hog:
        try:
            rss = procfs.stat(hog.pid).rss
            with ProcessRef.open(hog.pid, procfs=procfs) as ref:  # before any signal
                freezer.freeze()
                state = procfs.stat(hog.pid).state
                before = memory.memory_usage()
                target = int(size * BACK_FRACTION)
                start = time.monotonic()
                guard.send_signal(ref, signal.SIGKILL)
                call_ms = None
                if scenario == "mrelease":
                    process_mrelease(ref.fileno(), pid=ref.pid)
                    call_ms = (time.monotonic() - start) * 1000
                back_ms, freed = _wait_freed(memory.memory_usage, before, target, bound, start)
                after_thaw = None
                freezer.thaw()
                if back_ms is None:
                    thawed = time.monotonic()
                    # freed stays what came back within the bound; this only times the thaw.
                    after_thaw, _ = _wait_freed(memory.memory_usage, before, target, 10, thawed)
        finally:
            # A frozen victim cannot die: thaw before the hog is stopped, also on Ctrl-C.
            with deferred_interrupts():
                freezer.thaw()
    return ScenarioResult(
        scenario,
        rss,
        freed,
        None if back_ms is None else round(back_ms, 1),
        bound * 1000,
        state,
        None if after_thaw is None else round(after_thaw, 1),
        None if call_ms is None else round(call_ms, 1),
    )


@contextlib.contextmanager
def stuck_victim_sandbox(size: int) -> Iterator[tuple[SandboxCgroup, SandboxCgroup]]:
    """A memory cgroup limited to ``size`` + 128 MiB and a v1 freezer cgroup, removed on exit."""
    with SandboxCgroup.create("memory", prefix=SANDBOX_PREFIX) as memory:
        memory.set_memory_limit(size + 128 * MiB)
        with SandboxCgroup.create("freezer", prefix=SANDBOX_PREFIX) as freezer:
            yield memory, freezer


def run_stuck_victim_demo(
    *,
    size: int = 512 * MiB,
    bound: float = 2.0,
    mrelease_available: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[ScenarioResult]:
    """Both scenarios, kill-only first. Raises :class:`Unsupported` when a cgroup the demo
    needs cannot be had (the caller reports it and skips)."""
    procfs = ProcFS()
    results: list[ScenarioResult] = []
    with stuck_victim_sandbox(size) as (memory, freezer):
        for scenario in ("kill-only", "mrelease"):
            if scenario == "mrelease" and not mrelease_available:
                results.append(
                    ScenarioResult(
                        scenario, None, None, None, bound * 1000,
                        skipped="process_mrelease is not available (Linux 5.15, seccomp)",
                    )
                )  # fmt: skip
                continue
            if progress:
                progress(scenario)
            results.append(
                stuck_victim(
                    scenario,
                    size=size,
                    bound=bound,
                    memory=memory,
                    freezer=freezer,
                    procfs=procfs,
                )
            )
    return results


def skipped_results(reason: str, bound: float = 2.0) -> list[ScenarioResult]:
    return [
        ScenarioResult(s, None, None, None, bound * 1000, skipped=reason)
        for s in ("kill-only", "mrelease")
    ]


SANDBOX_PREFIX: Final = "reapkit-demo"


def check_can_run() -> None:
    """Raise :class:`Unsupported` (with what to do) if the demo cannot run at all here, before
    anything is created; remove sandboxes that an earlier, killed demo left behind."""
    if os.geteuid() != 0:
        raise Unsupported(
            "root",
            "the demo creates cgroups under /sys/fs/cgroup; run it as root (sudo)",
            errno.EPERM,
        )
    mounts = cgroup_mounts()
    if mount_for("memory", mounts) is None:
        raise Unsupported(
            "the cgroup memory controller", "the demo's victims need a hard memory limit"
        )
    SandboxCgroup.remove_stale(SANDBOX_PREFIX, mounts=mounts)


def stuck_victim_unsupported() -> str | None:
    """Why the stuck-victim comparison cannot run here, or ``None`` if it can."""
    freezer = mount_for("freezer", cgroup_mounts())
    if freezer is None or freezer.version != 1:
        return (
            "it needs the cgroup v1 freezer to hold a victim in state D, and this host has"
            " none (cgroup v2's freezer lets SIGKILL through)"
        )
    return None


# -- the pipeline scenario ----------------------------------------------------------------------

PIPELINE_LIMIT: Final = 512 * MiB
PIPELINE_TIMEOUT: Final = 60.0
PIPELINE_LINE: Final = "60%"


def pipeline_policy(scope: str, *, with_pressure: bool) -> str:
    """The demo's policy: a leak in ``scope`` under real memory pressure is ended and reaped;
    ``sleep`` processes are protected."""
    when = '"memory some 100ms/2s", ' if with_pressure else ""
    return f"""
[reaper.reap]
threads = 1

[[rule]]
name = "demo"
cgroup = "{scope}"
when = [{when}"cgroup_usage > {PIPELINE_LINE}"]
scope = {{ cgroup = "{scope}" }}
select = [{{ name = "protect", comm = ["^sleep$"] }}, "largest-rss"]
actions = ["kill", "reap"]
victim_timeout = "5s"
"""


async def run_pipeline_scenario(
    *,
    with_pressure: bool,
    progress: Callable[[str], None] | None = None,
    start_timeout: float = 30.0,
) -> ScenarioResult:
    """A leak grows in a limited cgroup while page-cache thrashing (in a second small cgroup)
    makes real memory pressure; the real pipeline ends it and reaps it; a protected ``sleep``
    in the same cgroup survives. Everything is created here and removed afterwards; the
    caller bounds it with a cancel scope."""
    with contextlib.ExitStack() as stack:
        scope = stack.enter_context(SandboxCgroup.create("memory", prefix=SANDBOX_PREFIX))
        scope.set_memory_limit(PIPELINE_LIMIT)
        bystander = await trio.to_thread.run_sync(subprocess.Popen, ["sleep", "3600"])
        stack.callback(_end_child, bystander)
        scope.add(bystander.pid)
        if with_pressure:
            pressure = stack.enter_context(SandboxCgroup.create("memory", prefix=SANDBOX_PREFIX))
            pressure.set_memory_limit(96 * MiB)
            workdir = stack.enter_context(tempfile.TemporaryDirectory(dir=disk_backed_tmp()))
            thrash = os.path.join(workdir, "thrash")
            await trio.to_thread.run_sync(make_thrash_file, thrash, 256 * MiB)
        policy = load_policy(text=pipeline_policy(scope.directory, with_pressure=with_pressure))
        async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
            if with_pressure:
                stack.enter_context(
                    start_thrasher(thrash, [pressure.directory], timeout=start_timeout)
                )
            grower = stack.enter_context(
                start_grower(
                    32 * MiB,
                    0.1,
                    PIPELINE_LIMIT - 64 * MiB,
                    [scope.directory],
                    timeout=start_timeout,
                )
            )
            if progress:
                progress("waiting for the conditions to hold")
            record = await records.receive()
            survived = bystander.poll() is None  # before our own cleanup ends it
            del grower
    return ScenarioResult(
        "pipeline",
        record.victim.rss if record.victim else None,
        record.bytes_freed,
        record.timeline.ms_from_trigger()["memory_back"],
        PIPELINE_TIMEOUT * 1000,
        skipped=None if survived else "the protected bystander did not survive",
        records=[record.as_json()],
    )


def _end_child(child: subprocess.Popen[bytes]) -> None:
    with deferred_interrupts():
        if child.poll() is None:
            child.kill()
        child.wait()

"""pidfd exit waits on the real kernel."""

from __future__ import annotations

import resource
import signal
import subprocess

import pytest
import trio

from reapkit import ProcessRef
from reapkit._sources.pidfd import wait_exit
from reapkit.testing import SandboxCgroup

from ..conftest import Spawn

pytestmark = pytest.mark.kernel


async def test_wait_exit_with_a_timeout(spawn: Spawn) -> None:
    child = spawn()
    with ProcessRef.open(child.pid) as ref:
        assert await wait_exit(ref, timeout=0.1) is False
        ref.send_signal(signal.SIGKILL)
        assert await wait_exit(ref, timeout=10) is True
    child.wait(10)


@pytest.mark.slow
async def test_a_thousand_waits_cost_nothing_while_idle(memory_cgroup: SandboxCgroup) -> None:
    n = 1000
    # One shell starts them all inside the sandbox (much faster than 1000 Popens); the
    # sandbox's remove() kills whatever is left, by pidfd, even if the test fails.
    starter = subprocess.Popen(
        ["sh", "-c", f"echo $$ > {memory_cgroup.directory}/cgroup.procs;"
         f" for i in $(seq {n}); do sleep 600 & done"],
    )  # fmt: skip
    assert starter.wait(60) == 0
    with trio.fail_after(30):
        while len(memory_cgroup.pids()) < n:
            await trio.sleep(0.05)
    refs = [ProcessRef.open(pid) for pid in memory_cgroup.pids()]
    exited = 0
    try:

        async def waiter(ref: ProcessRef) -> None:
            nonlocal exited
            if await wait_exit(ref, timeout=60):
                exited += 1

        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(waiter, ref)
            await trio.sleep(0.2)
            before = resource.getrusage(resource.RUSAGE_SELF)
            await trio.sleep(2)
            after = resource.getrusage(resource.RUSAGE_SELF)
            idle_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            await trio.to_thread.run_sync(memory_cgroup.kill_members)
    finally:
        for ref in refs:
            ref.close()
    assert exited == len(refs) == n
    assert idle_cpu < 0.1, f"{idle_cpu:.3f} s of CPU for {n} idle waits over 2 s"

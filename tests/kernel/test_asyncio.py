"""A reaper inside an asyncio program (trio guest mode), on a sandbox policy."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

import reapkit.asyncio
from reapkit import KillRecord, Unsupported, load_policy
from reapkit.testing import SandboxCgroup

from ..conftest import Spawn

pytestmark = pytest.mark.kernel


def _policy_text(cgroup: SandboxCgroup) -> str:
    return (
        f'[[rule]]\nname = "sandbox"\nscope = {{ cgroup = "{cgroup.directory}" }}\n'
        'select = ["largest-rss"]\nactions = ["kill"]\nvictim_timeout = "3s"\n'
    )


def test_an_asyncio_program_embeds_the_reaper(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    victim = spawn(cgroups=[memory_cgroup])
    policy = load_policy(text=_policy_text(memory_cgroup))
    fds = set(os.listdir("/proc/self/fd"))

    async def main() -> KillRecord:
        async with reapkit.asyncio.open_reaper(policy, live_table=False) as reaper:
            records = reaper.records()
            await reaper.trigger("the asyncio side asks")
            record = await asyncio.wait_for(anext(records), 10)
            assert reaper.statistics().engine.kills == 1
            await records.aclose()
            return record

    record = asyncio.run(main())
    assert record.outcome == "killed" and record.victim is not None
    assert record.victim.pid == victim.pid
    assert victim.wait(10) == -signal.SIGKILL
    assert set(os.listdir("/proc/self/fd")) == fds
    assert not [t for t in threading.enumerate() if t.name.startswith("reapkit-reaper")]


def test_cancelling_the_asyncio_side_stops_the_reaper(memory_cgroup: SandboxCgroup) -> None:
    policy = load_policy(text=_policy_text(memory_cgroup))

    async def main() -> None:
        async def serve() -> None:
            async with reapkit.asyncio.open_reaper(policy, live_table=False):
                await asyncio.sleep(3600)

        task = asyncio.create_task(serve())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_reaper_that_cannot_start_raises_on_the_asyncio_side(tmp_path: object) -> None:
    # A PSI trigger on a pressure file that does not exist: the trio side fails to start.
    text = (
        '[[rule]]\nname = "x"\nwhen = ["memory some 100ms/2s"]\nscope = "system"\n'
        'actions = ["kill"]\n'
    )
    policy = load_policy(text=text, dry_run=True)
    broken = policy.rules[0].when[0].spec  # type: ignore[union-attr]
    object.__setattr__(broken, "path", "/nonexistent/memory.pressure")

    async def main() -> None:
        async with reapkit.asyncio.open_reaper(policy, live_table=False):
            raise AssertionError("should not start")

    with pytest.raises(BaseExceptionGroup) as info:
        asyncio.run(main())
    assert info.group_contains(Unsupported, match="does not exist")

"""Prepared rankings on the real kernel: a real leak's approach is seen by the sampler and the
crossing uses the ranking prepared for it; a victim that exited after the preparation is passed
over for the next, which really gets the signal. Every policy is scoped to a sandbox cgroup and
every process signalled was started here, inside it."""

from __future__ import annotations

import pytest
import trio

from reapkit._conditions import MemoryCondition
from reapkit._engine import Engine, ManualTrigger
from reapkit._policy import load_policy
from reapkit._reaper import open_reaper
from reapkit._records import KillRecord
from reapkit._sources.memory import MemoryEvent
from reapkit.testing import SandboxCgroup, start_grower, start_hog

from ..conftest import MiB

pytestmark = pytest.mark.kernel


def _policy(cgroup: SandboxCgroup, *, line: str, prepare: str) -> str:
    return f"""
[reaper]
prepare_ranking = "{prepare}"

[[rule]]
name = "sandbox"
cgroup = "{cgroup.directory}"
when = ["cgroup_usage > {line}"]
scope = {{ cgroup = "{cgroup.directory}" }}
select = ["largest-rss"]
actions = ["kill"]
victim_timeout = "3s"
"""


async def test_a_real_leak_is_ranked_before_it_crosses_and_killed_from_that_ranking(
    memory_cgroup: SandboxCgroup,
) -> None:
    memory_cgroup.set_memory_limit(256 * MiB)
    # 200 MiB/s toward a line 120 MiB up: announced as approaching as soon as two samples show
    # the growth, prepared, crossed some 0.5 s later. The bound (2 s) leaves room for a slow
    # machine; the statistics, not a clock, say what happened.
    policy = load_policy(text=_policy(memory_cgroup, line="120MiB", prepare="2s"))
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        grower = await trio.to_thread.run_sync(
            start_grower, 4 * MiB, 0.02, 200 * MiB, [memory_cgroup.directory]
        )
        with grower, trio.fail_after(30):
            record = await records.receive()
            stats = reaper.statistics().engine
    assert record.outcome == "killed"
    assert record.victim is not None and record.victim.pid == grower.pid
    assert grower.process.returncode == -9
    assert "prepared" in [s.selector for s in record.selectors]
    assert stats.prepared >= 1 and stats.prepared_used == 1


async def test_a_victim_gone_since_the_preparation_is_passed_over_for_the_next(
    memory_cgroup: SandboxCgroup,
) -> None:
    memory_cgroup.set_memory_limit(256 * MiB)
    policy = load_policy(text=_policy(memory_cgroup, line="1MiB", prepare="10s"))
    (rule,) = policy.rules
    condition = rule.when[0]
    assert isinstance(condition, MemoryCondition)
    records: list[KillRecord] = []

    async def emit(record: KillRecord) -> None:
        records.append(record)

    engine = Engine(policy.rules, emit=emit, prepare_ranking=policy.prepare_ranking)
    big = await trio.to_thread.run_sync(start_hog, 64 * MiB, [memory_cgroup.directory])
    with (
        big,
        await trio.to_thread.run_sync(start_hog, 16 * MiB, [memory_cgroup.directory]) as small,
    ):
        async with trio.open_nursery() as nursery:
            approaching = MemoryEvent(
                trio.current_time(), condition.threshold, "approaching", 0, MiB, 256 * MiB
            )
            await engine.handle(approaching, nursery)
            with trio.fail_after(10):
                while engine.statistics().prepared < 1:
                    await trio.sleep(0.01)
            big.stop()  # exits and is reaped: its PID is free for anyone now
            await engine.handle(ManualTrigger(trio.current_time(), "test"), nursery)
            with trio.fail_after(10):
                await trio.to_thread.run_sync(small.process.wait)
                while not records:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    (record,) = records
    assert record.outcome == "killed"
    assert record.victim is not None and record.victim.pid == small.pid
    assert small.process.returncode == -9
    prepared = next(s for s in record.selectors if s.selector == "prepared")
    # (its PID taken by a newcomer within these milliseconds would read as "another process")
    assert f"{big.pid} exited" in prepared.reason or f"{big.pid} is another" in prepared.reason
    assert engine.statistics().prepared_used == 1

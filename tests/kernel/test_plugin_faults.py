"""Failed actions never cost the kill, and a SIGTERM always ends in SIGKILL (issue 11), on real
processes the test started in a sandbox cgroup the policy is scoped to."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import pytest
import trio

from reapkit._plugins import Action, PluginRegistry, Ranked, Selector, Situation
from reapkit._policy import Policy, load_policy
from reapkit._reaper import open_reaper
from reapkit._records import KillRecord
from reapkit.builtin import register_builtins
from reapkit.builtin.actions import Terminate, TerminateOptions
from reapkit.testing import SandboxCgroup

from ..conftest import Spawn
from .test_pipeline import _next_record, _policy, _stubborn_and_other

pytestmark = pytest.mark.kernel


class CannotStart(Action):
    """Stands for a prekill hook that cannot start (no such user, EPERM, the pids limit)."""

    name: ClassVar[str] = "test-cannot-start"

    async def act(self, context: Any) -> str:
        raise PermissionError(1, "Operation not permitted")


class TermThenHang(Action):
    """A third-party signalling action cut by its deadline after SIGTERM."""

    name: ClassVar[str] = "test-term-then-hang"
    signals: ClassVar[bool] = True

    async def act(self, context: Any) -> str:
        context.send_signal(signal.SIGTERM)
        await trio.sleep_forever()
        raise AssertionError


class TermThenRaise(Action):
    """A third-party signalling action that fails after SIGTERM."""

    name: ClassVar[str] = "test-term-then-raise"
    signals: ClassVar[bool] = True

    async def act(self, context: Any) -> str:
        context.send_signal(signal.SIGTERM)
        raise RuntimeError("bug after SIGTERM")


class TermOnly(Action):
    """A third-party signalling action that sends SIGTERM and is done."""

    name: ClassVar[str] = "test-term-only"
    signals: ClassVar[bool] = True

    async def act(self, context: Any) -> str:
        return str(context.send_signal(signal.SIGTERM).value)


class SparesSleep(Selector):
    """A third-party protective selector (not named 'protect'): spares every ``sleep``."""

    name: ClassVar[str] = "test-spares-sleep"
    protective: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        return [r for r in candidates if r.candidate.comm != "sleep"]


def _load(
    cgroup: SandboxCgroup, actions: str, extra: str = "", select: str = '"largest-rss"'
) -> Policy:
    registry = PluginRegistry()
    register_builtins(registry)
    for plugin in (CannotStart, TermThenHang, TermThenRaise, TermOnly, SparesSleep):
        registry.register(plugin)
    text = _policy(cgroup, when="", select=select, actions=actions, extra=extra)
    return load_policy(text=text, registry=registry)


async def _one_record(policy: Policy) -> KillRecord:
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("test")
        return await _next_record(records, 20)


async def test_a_failed_action_before_the_signal_does_not_cancel_the_kill(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    record = await _one_record(_load(memory_cgroup, '"test-cannot-start", "kill"'))
    assert record.outcome == "killed", record
    assert [(a.action, a.outcome) for a in record.actions] == [
        ("test-cannot-start", "failed"),
        ("kill", "ok"),
    ]
    assert victim.wait(10) == -signal.SIGKILL


async def test_terminate_with_a_grace_longer_than_its_deadline_still_sigkills(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    stubborn, other = _stubborn_and_other(spawn, memory_cgroup)
    policy = _load(memory_cgroup, '"kill"', extra='action_deadline = "500ms"')
    # Built past the loader (which may refuse a grace longer than the deadline): the engine
    # must hold even so.
    rule = attrs.evolve(policy.rules[0], actions=(Terminate(TerminateOptions(grace=5.0)),))
    record = await _one_record(attrs.evolve(policy, rules=(rule,)))
    assert record.victim is not None and record.victim.pid == stubborn.pid
    assert stubborn.wait(10) == -signal.SIGKILL
    assert record.outcome == "killed", record
    assert "sent SIGKILL" in " ".join(a.detail for a in record.actions)
    assert other.poll() is None


@pytest.mark.parametrize("action", ["test-term-then-hang", "test-term-then-raise"])
async def test_a_chain_cut_after_sigterm_ends_in_sigkill(
    spawn: Spawn, memory_cgroup: SandboxCgroup, action: str
) -> None:
    stubborn, other = _stubborn_and_other(spawn, memory_cgroup)
    policy = _load(memory_cgroup, f'"{action}"', extra='action_deadline = "500ms"')
    record = await _one_record(policy)
    assert stubborn.wait(10) == -signal.SIGKILL
    assert record.outcome == "killed", record
    (cut, net) = record.actions
    assert (cut.action, cut.outcome) == (action, "failed")
    assert (net.action, net.outcome) == ("sigkill-after-cut", "ok")
    assert "SIGKILL sent" in net.detail
    assert other.poll() is None


async def test_a_chain_that_ran_to_its_end_gets_no_sigkill_it_did_not_send(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    stubborn, other = _stubborn_and_other(spawn, memory_cgroup)
    policy = _load(memory_cgroup, '"test-term-only"')
    record = await _one_record(policy)
    assert record.victim is not None and record.victim.pid == stubborn.pid
    assert [(a.action, a.outcome) for a in record.actions] == [("test-term-only", "ok")]
    assert stubborn.poll() is None and other.poll() is None  # SIGTERM only, as the action chose


#: Says when it gets SIGTERM, and stays.
_TELLS_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: print('term', flush=True))\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


async def test_stopping_during_terminates_grace_still_records_the_kill(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    victim = spawn(
        [sys.executable, "-c", _TELLS_SIGTERM], cgroups=[memory_cgroup], stdout=subprocess.PIPE
    )
    assert victim.stdout is not None and victim.stdout.readline() == b"ready\n"
    policy = _load(
        memory_cgroup, '{ name = "terminate", grace = "60s" }', extra='action_deadline = "90s"'
    )
    async with open_reaper(policy, live_table=False) as reaper:
        records = reaper.records()
        await reaper.trigger("test")
        with trio.fail_after(20):
            assert await trio.to_thread.run_sync(victim.stdout.readline) == b"term\n"
    got = [r async for r in records]  # the channel ends with the reaper
    assert victim.wait(10) == -signal.SIGKILL  # the safety net
    (record,) = got
    assert record.outcome == "killed" and "stopped during the action chain" in record.reason
    assert [(a.action, a.outcome) for a in record.actions] == [("sigkill-after-cut", "ok")]


async def test_cgroup_kill_honours_every_protective_selector(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    target = spawn([sys.executable, "-c", "import time; time.sleep(600)"], cgroups=[memory_cgroup])
    spared = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    policy = _load(memory_cgroup, '"cgroup-kill"', select='"test-spares-sleep", "largest-rss"')
    record = await _one_record(policy)
    assert record.victim is not None and record.victim.pid == target.pid
    assert record.outcome == "refused" and "protected" in (record.refusal or ""), record
    assert target.poll() is None and spared.poll() is None

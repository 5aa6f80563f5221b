"""Failed actions never cost the kill, and a SIGTERM always ends in SIGKILL (issue 11), on real
processes the test started in a sandbox cgroup the policy is scoped to."""

from __future__ import annotations

import signal
from typing import Any, ClassVar

import attrs
import pytest
import trio

from reapkit._plugins import Action, PluginRegistry
from reapkit._policy import Policy, load_policy
from reapkit._reaper import open_reaper
from reapkit._records import KillRecord
from reapkit._sandbox import SandboxCgroup
from reapkit.builtin import register_builtins
from reapkit.builtin.actions import Terminate, TerminateOptions

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


def _load(cgroup: SandboxCgroup, actions: str, extra: str = "") -> Policy:
    registry = PluginRegistry()
    register_builtins(registry)
    for action in (CannotStart, TermThenHang, TermThenRaise):
        registry.register(action)
    text = _policy(cgroup, when="", select='"largest-rss"', actions=actions, extra=extra)
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

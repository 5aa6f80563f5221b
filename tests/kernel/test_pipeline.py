"""The whole pipeline on the real kernel, in sandbox cgroups: trigger -> rule -> candidates ->
selectors -> actions -> reap stage -> KillRecord. Every policy here is scoped to a cgroup the
test created; every process it may signal was started by the test inside that cgroup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from reapkit import Action, ActionContext
from reapkit._engine import ManualTrigger
from reapkit._plugins import Observer, PluginRegistry, Ranked, Selector, Situation, Trigger
from reapkit._policy import load_policy
from reapkit._reaper import open_reaper
from reapkit._records import KillRecord, KillWarning
from reapkit.builtin import register_builtins
from reapkit.lowlevel import Probe
from reapkit.testing import SandboxCgroup, make_thrash_file, start_hog, start_thrasher

from ..conftest import MiB, Spawn

pytestmark = pytest.mark.kernel


def _policy(cgroup: SandboxCgroup, *, when: str, select: str, actions: str, extra: str = "") -> str:
    return f"""
[reaper.reap]
threads = 1

[[rule]]
name = "sandbox"
cgroup = "{cgroup.directory}"
when = [{when}]
scope = {{ cgroup = "{cgroup.directory}" }}
select = [{select}]
actions = [{actions}]
victim_timeout = "3s"
cooldown = "1s"
{extra}
"""


async def _next_record(
    records: trio.MemoryReceiveChannel[KillRecord], timeout: float
) -> KillRecord:
    with trio.fail_after(timeout):
        return await records.receive()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.slow
async def test_a_hog_under_pressure_is_chosen_killed_and_reaped(
    kernel: Probe,
    spawn: Spawn,
    memory_cgroup: SandboxCgroup,
    other_memory_cgroup: SandboxCgroup,
    tmp_path: Path,
) -> None:
    if not kernel.psi_triggers:
        pytest.skip("needs PSI triggers")
    memory_cgroup.set_memory_limit(512 * MiB)
    protected = spawn(["sleep", "600"], cgroups=[memory_cgroup])  # in scope, protected
    bystander = spawn(["sleep", "600"], cgroups=[other_memory_cgroup])  # out of scope
    policy = load_policy(
        text=_policy(
            memory_cgroup,
            when='"memory some 100ms/2s", "cgroup_usage > 50%"',
            select='{ name = "protect", comm = ["^sleep$"] }, "largest-rss"',
            actions='"kill", "reap"',
        )
    )
    # Pressure comes from page-cache thrashing in a third, small cgroup; the hog pushes the
    # scope's usage over its line. Both conditions must hold.
    thrash_file = tmp_path / "thrash"
    make_thrash_file(str(thrash_file), 256 * MiB)
    other_memory_cgroup.set_memory_limit(96 * MiB)
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        hog = await trio.to_thread.run_sync(start_hog, 320 * MiB, [memory_cgroup.directory])
        with hog, start_thrasher(str(thrash_file), [other_memory_cgroup.directory]):
            record = await _next_record(records, 60)
            assert hog.process.wait(10) == -signal.SIGKILL
    assert record.outcome == "killed", record
    assert record.victim is not None and record.victim.pid == hog.pid
    assert "memory some 100ms/2s" in record.condition and "usage" in record.condition
    names = [s.selector for s in record.selectors]
    assert names[:2] == ["protect", "largest-rss"]
    assert [a.action for a in record.actions] == ["kill", "reap"]
    # A running victim may free its memory itself before the reaper gets to it (ESRCH):
    # both are success. (The stuck-victim test below forces the reaper to do the work.)
    assert record.actions[1].detail.startswith(("reaped", "already-freed"))
    t = record.timeline
    assert None not in (
        t.victim_chosen,
        t.signal_sent,
        t.reap_started,
        t.reap_finished,
        t.memory_back,
        t.exit_seen,
    )
    assert t.trigger_seen <= t.victim_chosen <= t.signal_sent <= t.reap_started  # type: ignore[operator]
    assert record.bytes_freed is not None and record.bytes_freed >= 300 * MiB
    assert protected.poll() is None and bystander.poll() is None
    line = record.to_json_line()
    assert "\n" not in line and '"outcome":"killed"' in line


async def test_a_stuck_victims_memory_comes_back_through_the_reap_stage(
    memory_cgroup: SandboxCgroup, freezer_cgroup: SandboxCgroup
) -> None:
    memory_cgroup.set_memory_limit(768 * MiB)
    policy = load_policy(
        text=_policy(memory_cgroup, when="", select='"largest-rss"', actions='"kill", "reap"')
    )
    hog = await trio.to_thread.run_sync(
        start_hog, 512 * MiB, [memory_cgroup.directory, freezer_cgroup.directory]
    )
    with hog:
        try:
            freezer_cgroup.freeze()  # state D: the kill alone would not bring memory back
            async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
                await reaper.trigger("test: stuck victim")
                record = await _next_record(records, 20)
        finally:
            freezer_cgroup.thaw()
    assert record.outcome == "killed"
    assert record.victim is not None and record.victim.pid == hog.pid
    t = record.timeline
    assert t.reap_finished is not None and t.memory_back is not None
    assert t.exit_seen is None  # frozen: it could not exit until thawed
    assert record.bytes_freed is not None and record.bytes_freed >= 0.9 * 512 * MiB
    assert "exit_seen" in record.reason
    assert reaper.statistics().reap.reaped == 1


_IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def _stubborn_and_other(
    spawn: Spawn, cgroup: SandboxCgroup
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A process that ignores SIGTERM (and is the largest), and a plain one beside it."""
    stubborn = spawn(
        [sys.executable, "-c", _IGNORES_SIGTERM], cgroups=[cgroup], stdout=subprocess.PIPE
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    return stubborn, spawn(["sleep", "600"], cgroups=[cgroup])


async def test_a_victim_ignoring_sigterm_gets_sigkill_once_and_no_second_victim(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    stubborn, other = _stubborn_and_other(spawn, memory_cgroup)
    policy = load_policy(
        text=_policy(
            memory_cgroup,
            when="",
            select='"largest-rss"',
            actions='{ name = "terminate", grace = "1s" }',
            extra="max_kills = 5",
        ).replace('cooldown = "1s"', 'cooldown = "0s"')
    )
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        for _ in range(5):  # keep asking during the grace period: the rule is busy
            await reaper.trigger("test")
            await trio.sleep(0.2)
        record = await _next_record(records, 10)
        with pytest.raises(trio.WouldBlock):
            records.receive_nowait()
        stats = reaper.statistics().engine
    assert record.victim is not None and record.victim.pid == stubborn.pid
    assert record.actions[0].detail == "no exit within 1 s of SIGTERM: sent SIGKILL"
    assert stubborn.wait(10) == -signal.SIGKILL
    assert other.poll() is None  # no second victim while the first was dying
    assert stats.kills == 1 and stats.skipped_busy >= 3


class Raising(Selector):
    name: ClassVar[str] = "test-raising"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        raise RuntimeError("plugin bug")


class Hanging(Selector):
    name: ClassVar[str] = "test-hanging"

    async def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        await trio.sleep_forever()
        raise AssertionError


@pytest.mark.parametrize("broken", ["test-raising", "test-hanging"])
async def test_broken_plugins_do_not_stop_the_reaper(
    spawn: Spawn, memory_cgroup: SandboxCgroup, broken: str
) -> None:
    registry = PluginRegistry()
    register_builtins(registry)
    registry.register(Raising)
    registry.register(Hanging)
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    policy = load_policy(
        text=_policy(
            memory_cgroup,
            when="",
            select=f'"{broken}"',
            actions='"kill"',
            extra='plugin_deadline = "300ms"',
        ),
        registry=registry,
    )
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("test")
        record = await _next_record(records, 10)
    assert record.outcome == "killed"
    assert record.victim is not None and record.victim.pid == victim.pid
    assert record.selectors[0].error is not None
    assert record.selectors[-1].selector == "fallback-oom-score"
    assert victim.wait(10) == -signal.SIGKILL


async def test_cancelling_leaves_no_fd_thread_or_child(memory_cgroup: SandboxCgroup) -> None:
    # A subtree scope (this test process's own children) needs the live process table, so
    # every kind of resource is open: PSI trigger + epoll, the netlink socket, reaper threads.
    # The conditions cannot hold (the sandbox is empty): nothing is ever signalled.
    text = _policy(
        memory_cgroup,
        when='"memory some 100ms/2s", "cgroup_usage > 90%"',
        select='"oom-score"',
        actions='"kill", "reap"',
    ).replace(
        f'scope = {{ cgroup = "{memory_cgroup.directory}" }}',
        f"scope = {{ subtree = {os.getpid()} }}",
    )
    policy = load_policy(text=text)
    fds, threads, children = _fds(), {t.name for t in threading.enumerate()}, _children()
    async with open_reaper(policy) as reaper:
        assert len(_fds()) > len(fds)  # PSI trigger, epoll, netlink socket...
        assert any(t.name.startswith("reapkit-reaper") for t in threading.enumerate())
        stats = reaper.statistics()
        assert stats.table is not None and {s.name.split()[0] for s in stats.sources} == {
            "psi",
            "memory",
        }
    assert _fds() == fds
    assert {t.name for t in threading.enumerate()} == threads
    assert _children() == children


def _children() -> set[int]:
    """This process's children, from every thread's ``children`` list."""
    found: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
            found.update(int(p) for p in f.read().split())
    return found


async def test_reload_swaps_the_rules_between_decisions(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    first = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    dry = load_policy(
        text=_policy(memory_cgroup, when="", select='"oom-score"', actions='"kill"'), dry_run=True
    )
    real = load_policy(text=_policy(memory_cgroup, when="", select='"oom-score"', actions='"kill"'))
    async with open_reaper(dry, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("dry")
        assert (await _next_record(records, 10)).outcome == "dry-run"
        assert first.poll() is None
        await reaper.reload(real)
        await trio.sleep(1.1)  # the cooldown of the first decision
        await reaper.trigger("real")
        assert (await _next_record(records, 10)).outcome == "killed"
    assert first.wait(10) == -signal.SIGKILL


class Recorder(Observer):
    name: ClassVar[str] = "test-recorder"
    seen: ClassVar[list[object]] = []

    def on_record(self, record: object) -> None:
        self.seen.append(record)

    async def on_warning(self, warning: object) -> None:
        self.seen.append(warning)


class Broken(Observer):
    name: ClassVar[str] = "test-broken"

    def on_record(self, record: object) -> None:
        raise RuntimeError("observer bug")


async def test_observers_hear_warnings_and_records_and_a_broken_one_is_isolated(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    registry = PluginRegistry()
    register_builtins(registry)
    registry.register(Recorder)
    registry.register(Broken)
    Recorder.seen = []
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    text = _policy(
        memory_cgroup,
        when="",
        select='"largest-rss"',
        actions='{ name = "warn", message = "ending {name} ({pid})" }, "kill"',
    )
    text += '\n[[observer]]\nname = "test-broken"\n\n[[observer]]\nname = "test-recorder"\n'
    policy = load_policy(text=text, registry=registry)
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("test")
        record = await _next_record(records, 10)
    failures = reaper.statistics().observer_failures  # once stopped: the observers had it all
    warning, recorded = Recorder.seen
    assert isinstance(warning, KillWarning) and warning.message == f"ending sleep ({victim.pid})"
    assert recorded is record and record.outcome == "killed"
    assert failures == 1
    assert victim.wait(10) == -signal.SIGKILL


class AfterOneTick(Trigger):
    """A plugin trigger: asks once, shortly after it starts."""

    name: ClassVar[str] = "test-after-one-tick"

    async def run(self, send: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with send:
            task_status.started()
            await trio.sleep(0.1)
            await send.send(ManualTrigger(trio.current_time(), "a plugin says so"))
            await trio.sleep_forever()


async def test_a_trigger_plugin_from_the_policy_makes_the_reaper_act(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    registry = PluginRegistry()
    register_builtins(registry)
    registry.register(AfterOneTick)
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    text = _policy(memory_cgroup, when="", select='"largest-rss"', actions='"kill"')
    policy = load_policy(
        text=text + '\n[[trigger]]\nname = "test-after-one-tick"\n', registry=registry
    )
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        record = await _next_record(records, 10)
    assert record.outcome == "killed" and "a plugin says so" in record.condition
    assert victim.wait(10) == -signal.SIGKILL


async def test_the_kill_cap_holds(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    victims = [spawn(["sleep", "600"], cgroups=[memory_cgroup]) for _ in range(4)]
    text = _policy(
        memory_cgroup, when="", select='"newest"', actions='"kill"', extra="max_kills = 2"
    )
    policy = load_policy(text=text.replace('cooldown = "1s"', 'cooldown = "0s"'))
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        for _ in range(2):
            await reaper.trigger("test")
            await _next_record(records, 10)
        for _ in range(3):
            await reaper.trigger("test")
            await trio.sleep(0.2)
        with pytest.raises(trio.WouldBlock):
            records.receive_nowait()
        stats = reaper.statistics().engine
    assert sum(v.poll() is None for v in victims) == 2
    assert stats.kills == 2 and stats.skipped_cap == 3


_HOOK = r"""
import os, sys
out = sys.argv[1]
with open(out, "w") as f:
    f.write(" ".join([
        os.environ.get("REAPKIT_PID", ""), os.environ.get("REAPKIT_NAME", ""),
        os.environ.get("REAPKIT_DRY_RUN", ""), str(len(os.environ)),
        open("/proc/self/oom_score_adj").read().strip(), str(os.getsid(0)),
        str(os.getpriority(os.PRIO_PROCESS, 0)),
    ]))
"""


async def test_the_prekill_hook_runs_contained(
    spawn: Spawn, memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    out = tmp_path / "hook.out"
    command = f'["{sys.executable}", "-c", {_toml(_HOOK)}, "{out}"]'
    # A generous timeout (a fresh interpreter can be slow to start on a loaded machine), within
    # the rule's action_deadline (30 s by default), as a policy must have it.
    hook = f'{{ name = "prekill-hook", command = {command}, timeout = "25s" }}'
    policy = load_policy(
        text=_policy(memory_cgroup, when="", select='"largest-rss"', actions=f'{hook}, "kill"')
    )
    # Like the daemon, run at a raised priority: the hook must not inherit it.
    os.setpriority(os.PRIO_PROCESS, 0, -5)
    try:
        async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
            await reaper.trigger("test")
            record = await _next_record(records, 10)
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    assert record.actions[0].detail == "hook exited with 0", record
    pid, name, dry, n_env, adj, session, nice = out.read_text().split()
    assert (int(pid), name, dry) == (victim.pid, "sleep", "0")
    assert int(n_env) <= 8  # a minimal environment, not the daemon's
    # A session of its own (led by the shell that kills it if the daemon dies).
    assert adj == "0" and int(session) != os.getsid(0) and nice == "0"
    assert record.actions[0].detail == "hook exited with 0"


async def test_the_prekill_hook_is_skipped_in_dry_run_and_its_group_killed_on_timeout(
    spawn: Spawn, memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    spawn(["sleep", "600"], cgroups=[memory_cgroup])
    marker = tmp_path / "grandchild.pid"
    script = f"sleep 600 & echo $! > {marker}; wait"
    slow = (
        f'{{ name = "prekill-hook", command = ["/bin/sh", "-c", "{script}"], timeout = "300ms" }}'
    )
    dry = load_policy(
        text=_policy(memory_cgroup, when="", select='"largest-rss"', actions=f'{slow}, "kill"'),
        dry_run=True,
    )
    async with open_reaper(dry, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("test")
        assert (await _next_record(records, 10)).actions[0].detail == "dry-run: hook not run"
    assert not marker.exists()
    real = load_policy(text=_policy(memory_cgroup, when="", select='"largest-rss"', actions=slow))
    async with open_reaper(real, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("test")
        record = await _next_record(records, 10)
    assert record.actions[0].detail == "hook killed after 0.3 s"
    grandchild = int(marker.read_text())
    with trio.fail_after(5):
        while os.path.exists(f"/proc/{grandchild}"):
            await trio.sleep(0.01)  # its whole process group went with it


def _toml(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


async def test_a_cgroup_kill_refuses_when_a_member_is_protected(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    target = spawn([sys.executable, "-c", "import time; time.sleep(600)"], cgroups=[memory_cgroup])
    protected = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    policy = load_policy(
        text=_policy(
            memory_cgroup,
            when="",
            select='{ name = "protect", comm = ["^sleep$"] }, "largest-rss"',
            actions='"cgroup-kill"',
        )
    )  # fmt: skip
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("test")
        record = await _next_record(records, 10)
    assert record.outcome == "refused" and "protected" in (record.refusal or "")
    assert target.poll() is None and protected.poll() is None


async def test_stopping_mid_confirmation_still_records_the_kill(
    memory_cgroup: SandboxCgroup, freezer_cgroup: SandboxCgroup
) -> None:
    memory_cgroup.set_memory_limit(512 * MiB)
    text = _policy(memory_cgroup, when="", select='"largest-rss"', actions='"kill"')
    policy = load_policy(text=text.replace('victim_timeout = "3s"', 'victim_timeout = "60s"'))
    hog = await trio.to_thread.run_sync(
        start_hog, 128 * MiB, [memory_cgroup.directory, freezer_cgroup.directory]
    )
    with hog:
        try:
            freezer_cgroup.freeze()  # killed but stuck: the confirmation would wait 60 s
            async with open_reaper(policy, live_table=False) as reaper:
                records = reaper.records()
                await reaper.trigger("test")
                await trio.sleep(0.5)
            got = [r async for r in records]  # the channel ends with the reaper
        finally:
            freezer_cgroup.thaw()
    (record,) = got
    assert record.outcome == "killed" and "stopped before the victim was confirmed" in record.reason


async def test_a_victim_exiting_in_the_grace_period_is_not_sigkilled(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    policy = load_policy(
        text=_policy(
            memory_cgroup,
            when="",
            select='"largest-rss"',
            actions='{ name = "terminate", grace = "5s" }',
        )
    )
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("test")
        record = await _next_record(records, 10)
    assert record.actions[0].detail == "exited after SIGTERM"
    assert victim.wait(10) == -signal.SIGTERM
    assert record.timeline.exit_seen is not None


async def test_two_rules_take_no_second_victim_while_the_first_is_dying(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    stubborn, other = _stubborn_and_other(spawn, memory_cgroup)
    first = _policy(
        memory_cgroup,
        when="",
        select='"largest-rss"',
        actions='{ name = "terminate", grace = "2s" }',
    )
    second = (
        first.split("[[rule]]")[1]
        .replace('name = "sandbox"', 'name = "second"')
        .replace('{ name = "terminate", grace = "2s" }', '"kill"')
        .replace('"largest-rss"', '"newest"')
    )
    policy = load_policy(text=first + "\n[[rule]]" + second)
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        for _ in range(6):  # during the first victim's grace period
            await reaper.trigger("test")
            await trio.sleep(0.3)
        record = await _next_record(records, 10)
        stats = reaper.statistics().engine
    assert (
        record.rule == "sandbox" and record.victim is not None and record.victim.pid == stubborn.pid
    )
    assert stubborn.wait(10) == -signal.SIGKILL
    assert other.poll() is None  # the second rule did not take it meanwhile
    assert stats.kills == 1 and stats.skipped_busy >= 3


async def test_open_reaper_lets_the_callers_own_exception_through(
    memory_cgroup: SandboxCgroup,
) -> None:
    policy = load_policy(
        text=_policy(memory_cgroup, when="", select='"largest-rss"', actions='"kill"')
    )
    with pytest.raises(LookupError, match="the caller's"):
        async with open_reaper(policy, live_table=False):
            raise LookupError("the caller's")


class Strip(Action):
    """A third-party action that reaps: it asks for a reap stage, as ``reap`` does."""

    name: ClassVar[str] = "test-strip"
    needs_reap_stage: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        if not context.can_reap:
            return "no reap stage"
        result = await context.reap()
        return "every reaper busy" if result is None else f"stripped: {result.outcome}"


async def test_a_third_party_reaping_action_gets_a_reap_stage(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    registry = PluginRegistry()
    register_builtins(registry)
    registry.register(Strip)
    text = _policy(memory_cgroup, when="", select='"newest"', actions='"kill", "test-strip"')
    policy = load_policy(text=text, registry=registry)
    assert policy.needs_reap_stage  # asked of the action, not of its name
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        await reaper.trigger("test: a third-party reaping action")
        record = await _next_record(records, 20)
        reap = reaper.statistics().reap
    assert victim.wait(10) == -signal.SIGKILL
    assert record.outcome == "killed"
    assert [(a.action, a.detail.split(":")[0]) for a in record.actions] == [
        ("kill", "SIGKILL sent"),
        ("test-strip", "stripped"),
    ]
    assert reap is not None and reap.threads == 1

"""Plugins cannot stop the reaper (issue 11): a whole reaper on a fake /proc tree (its guard
never signals), with observers, triggers and selectors that raise anything (SystemExit too)
or block. Real clock: sync plugin code runs on worker threads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

import reapkit._reaper
from reapkit._engine import Engine, ManualTrigger
from reapkit._plugins import (
    OVERRUNS_TO_SWITCH_OFF,
    Observer,
    PluginCalls,
    PluginRegistry,
    Ranked,
    Selector,
    Situation,
    Trigger,
)
from reapkit._policy import Policy, load_policy
from reapkit._reaper import open_reaper
from reapkit._records import KillRecord
from reapkit.builtin import register_builtins
from reapkit.lowlevel import ProcFS
from reapkit.testing import FakeProc

from .test_engine import ticking

MiB = 1 << 20

#: Whatever a plugin raises: SystemExit(0) once ended the daemon silently with status 0.
ANYTHING = [SystemExit(0), SystemExit(3), BaseExceptionGroup("plugin", [SystemExit(1)])]
ANYTHING_IDS = ["exit-0", "exit-3", "group"]


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path)
    proc.set_meminfo(total=16 << 30, available=400 * MiB)
    proc.add_process(1, comm="init")
    proc.add_process(600, comm="browser", rss=3 << 30, oom_score=700, start_time=6000)
    proc.add_process(700, comm="editor", rss=500 * MiB, oom_score=120)
    return proc


class Raiser:
    """What the test plugins below raise (set per test)."""

    exc: ClassVar[BaseException] = SystemExit(0)


class RaisingObserver(Observer):
    name: ClassVar[str] = "test-raising-observer"

    def on_record(self, record: object) -> None:
        raise Raiser.exc


class RaisingAttach(Observer):
    name: ClassVar[str] = "test-raising-attach"

    def on_record(self, record: object) -> None:
        return None

    def attach(self, reaper: object) -> None:
        raise Raiser.exc


class RaisingSelector(Selector):
    name: ClassVar[str] = "test-raising-selector"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        raise Raiser.exc


class RaisingTrigger(Trigger):
    """Starts, asks once, then raises."""

    name: ClassVar[str] = "test-raising-trigger"

    async def run(self, send: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await send.send(ManualTrigger(trio.current_time(), "before raising"))
        raise Raiser.exc


class RaisingAtStart(Trigger):
    name: ClassVar[str] = "test-raising-at-start"

    async def run(self, send: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raise Raiser.exc


#: Released at the end of each test: no thread outlives it.
_release = threading.Event()


class Blocks(Observer):
    """A sync observer that blocks (``time.sleep(60)`` in on_record)."""

    name: ClassVar[str] = "test-blocking-observer"

    def on_record(self, record: object) -> None:
        _release.wait(30)


@pytest.fixture(autouse=True)
def _released() -> Iterator[None]:
    _release.clear()
    yield
    _release.set()


def _policy(fake: FakeProc, extra: str = "", select: str = '"oom-score"') -> Policy:
    registry = PluginRegistry()
    register_builtins(registry)
    for plugin in (RaisingObserver, RaisingAttach, RaisingSelector, RaisingTrigger, Blocks):
        registry.register(plugin)
    registry.register(RaisingAtStart)
    text = f"""
[[rule]]
name = "fake"
scope = "system"
select = [{select}]
actions = ["kill"]
cooldown = "0s"
{extra}
"""
    return load_policy(text=text, procfs=ProcFS(fake.root), when=[], registry=registry)


async def _ask(fake: FakeProc, policy: Policy, asks: int = 2) -> tuple[list[KillRecord], Any]:
    """Trigger ``asks`` decisions; their records and the reaper's statistics once it stopped
    (its observers then had every record)."""
    got = []
    with trio.fail_after(20):
        async with (
            open_reaper(policy, procfs=ProcFS(fake.root), live_table=False) as reaper,
            reaper.records() as records,
        ):
            for _ in range(asks):
                await reaper.trigger("test")
                got.append(await records.receive())
    return got, reaper.statistics()


async def _switched_off(reaper: Any) -> Any:
    """The reaper's statistics once an observer was switched off."""
    while reaper.statistics().observers_disabled == 0:
        await trio.sleep(0.05)
    return reaper.statistics()


@pytest.mark.parametrize("exc", ANYTHING, ids=ANYTHING_IDS)
async def test_an_observer_raising_anything_is_isolated(fake: FakeProc, exc: BaseException) -> None:
    Raiser.exc = exc
    policy = _policy(fake, '[[observer]]\nname = "test-raising-observer"')
    records, stats = await _ask(fake, policy)
    assert [r.outcome for r in records] == ["dry-run", "dry-run"]
    assert stats.observer_failures == 2


@pytest.mark.parametrize("exc", ANYTHING, ids=ANYTHING_IDS)
async def test_an_observer_attach_raising_anything_is_isolated(
    fake: FakeProc, exc: BaseException
) -> None:
    Raiser.exc = exc
    policy = _policy(fake, '[[observer]]\nname = "test-raising-attach"')
    records, stats = await _ask(fake, policy, asks=1)
    assert records[0].outcome == "dry-run" and stats.observer_failures == 1


@pytest.mark.parametrize("exc", ANYTHING, ids=ANYTHING_IDS)
async def test_a_selector_raising_anything_is_isolated(fake: FakeProc, exc: BaseException) -> None:
    Raiser.exc = exc
    records, stats = await _ask(fake, _policy(fake, select='"test-raising-selector"'))
    assert all(r.victim is not None and r.victim.pid == 600 for r in records)  # the fallback
    assert stats.engine.plugin_failures == 2 and stats.event_failures == 0


@pytest.mark.parametrize("trigger", ["test-raising-trigger", "test-raising-at-start"])
@pytest.mark.parametrize("exc", ANYTHING, ids=ANYTHING_IDS)
async def test_a_trigger_raising_anything_is_dropped(
    fake: FakeProc, exc: BaseException, trigger: str, caplog: pytest.LogCaptureFixture
) -> None:
    Raiser.exc = exc
    policy = _policy(fake, f'[[trigger]]\nname = "{trigger}"')
    with caplog.at_level(logging.WARNING, "reapkit"):
        records, _stats = await _ask(fake, policy, asks=2)
    assert len(records) == 2
    assert any(f"trigger plugin {trigger} failed" in r.getMessage() for r in caplog.records)


async def test_a_blocking_sync_observer_neither_stalls_the_loop_nor_stays_on(
    fake: FakeProc, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(reapkit._reaper, "OBSERVER_DEADLINE", 0.2)
    policy = _policy(fake, '[[observer]]\nname = "test-blocking-observer"')
    records = []
    with caplog.at_level(logging.ERROR, "reapkit"), trio.fail_after(20):
        async with (
            ticking() as ticks,
            open_reaper(policy, procfs=ProcFS(fake.root), live_table=False) as reaper,
            reaper.records() as channel,
        ):
            for _ in range(OVERRUNS_TO_SWITCH_OFF + 2):
                await reaper.trigger("test")
                records.append(await channel.receive())
            stats = await _switched_off(reaper)
    assert len(records) == OVERRUNS_TO_SWITCH_OFF + 2
    # The loop ran on while the observer blocked (in its worker thread) for its deadline.
    assert ticks[0] >= OVERRUNS_TO_SWITCH_OFF * 5
    assert stats.observer_failures == OVERRUNS_TO_SWITCH_OFF
    assert stats.observers_disabled == 1
    assert len([r for r in caplog.records if "switched off" in r.getMessage()]) == 1


async def test_the_decision_task_survives_anything(
    fake: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = Engine.handle
    first = True

    async def exits_once(self: Engine, event: object, nursery: trio.Nursery) -> None:
        nonlocal first
        if first:
            first = False
            raise SystemExit(0)
        await handle(self, event, nursery)

    monkeypatch.setattr(Engine, "handle", exits_once)
    with trio.fail_after(20):
        async with (
            open_reaper(_policy(fake), procfs=ProcFS(fake.root), live_table=False) as reaper,
            reaper.records() as records,
        ):
            await reaper.trigger("ends the daemon, once")
            await reaper.trigger("test")
            record = await records.receive()
            stats = reaper.statistics()
    assert record.condition == "manual: test" and stats.event_failures == 1


async def test_a_blocking_observer_at_the_shipped_deadline_costs_no_record(
    fake: FakeProc, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Review of issue 11: the record waited for the observers, under an outer limit equal to
    # OBSERVER_DEADLINE, which fired first: 5 decisions, 0 records, 0 failures counted.
    policy = _policy(fake, '[[observer]]\nname = "test-blocking-observer"')
    decisions = OVERRUNS_TO_SWITCH_OFF + 2
    with caplog.at_level(logging.ERROR, "reapkit"), trio.fail_after(60):
        async with (
            open_reaper(policy, procfs=ProcFS(fake.root), live_table=False) as reaper,
            reaper.records() as records,
        ):
            got = []
            for _ in range(decisions):
                await reaper.trigger("test")
                got.append(await records.receive())
            stats = await _switched_off(reaper)
    assert [r.outcome for r in got] == ["dry-run"] * decisions
    assert stats.records == decisions and stats.records_dropped == 0
    assert stats.observer_failures == OVERRUNS_TO_SWITCH_OFF
    assert len([r for r in caplog.records if "switched off" in r.getMessage()]) == 1


class SlowInline(Selector):
    """An inline selector that takes its time and says where it ran."""

    name: ClassVar[str] = "test-slow-inline"
    inline: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.threads: list[int] = []

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        self.threads.append(threading.get_ident())
        threading.Event().wait(0.2)  # blocks whatever thread it is on
        return list(candidates)


#: A selector's arguments, by name: no situation, no candidates.
_NOTHING = {"situation": None, "candidates": ()}


async def test_an_offloaded_inline_call_runs_on_its_thread_to_its_end() -> None:
    # A preparation's inline selectors: off the trio thread (the loop keeps running), and,
    # as on it, never cut by the deadline nor counted as an overrun.
    calls, sel = PluginCalls(), SlowInline()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        result = await calls.call(sel, "select", _NOTHING, deadline=0.05, offload=True)
        nursery.cancel_scope.cancel()
    assert result == () and sel.threads != [threading.get_ident()]
    assert ticks >= 5  # the loop ran meanwhile
    assert calls.is_on(sel) and calls.switched_off == 0
    await calls.call(sel, "select", _NOTHING, deadline=0.05)  # not offloaded: on this thread
    assert sel.threads[-1] == threading.get_ident()

"""The engine with fake events, fake /proc trees and the autojump clock.

A guard reading a fake tree never signals (forced dry-run), so these decisions run the whole
pipeline except the signal itself: how policy authors test a policy without killing anything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio
import trio.testing

from reapkit import KillGuard, SystemScope
from reapkit._conditions import parse_condition
from reapkit._engine import Engine, ManualTrigger, Rule
from reapkit._plugins import (
    OVERRUNS_TO_SWITCH_OFF,
    Action,
    Candidate,
    Ranked,
    Selector,
    Situation,
    isolated,
)
from reapkit._records import KillRecord
from reapkit._sources.memory import MemoryEvent
from reapkit._sources.psi import PressureEvent
from reapkit.builtin.selectors import Protect, Scope
from reapkit.lowlevel import ProcFS
from reapkit.testing import FakeProc

from ..kernel.test_plugin_faults import TermThenHang

GiB = 1 << 30
MiB = 1 << 20


class ByOomScore(Selector):
    name: ClassVar[str] = "test-oom-score"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        ranked = sorted(candidates, key=lambda r: -r.candidate.oom_score)
        return [
            Ranked(r.candidate, r.candidate.oom_score, f"oom_score {r.candidate.oom_score}")
            for r in ranked
        ]


class Raises(Selector):
    name: ClassVar[str] = "test-raises"
    inline: ClassVar[bool] = True  # under the autojump clock a worker thread "overruns"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        raise RuntimeError("plugin bug")


class Hangs(Selector):
    name: ClassVar[str] = "test-hangs"

    async def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        await trio.sleep_forever()
        raise AssertionError


class Smallest(Selector):
    name: ClassVar[str] = "test-smallest"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        return sorted(candidates, key=lambda r: r.candidate.rss)


class KillAction(Action):
    name: ClassVar[str] = "test-kill"

    async def act(self, context: Any) -> str:
        return str(context.send_signal(signal.SIGKILL).value)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path)
    proc.set_meminfo(total=16 * GiB, available=400 * MiB)  # below 5 %
    proc.add_process(1, comm="init")
    proc.add_process(2, comm="kthreadd", ppid=0, flags=0x00200000)
    proc.add_process(500, comm="sshd", rss=8 * MiB, oom_score=5)
    proc.add_process(600, comm="browser", rss=3 * GiB, oom_score=700, start_time=6000)
    proc.add_process(700, comm="editor", rss=500 * MiB, oom_score=120)
    proc.add_process(800, comm="protected", rss=6 * GiB, oom_score=0, oom_score_adj=-1000)
    return proc


def _rule(
    fake: FakeProc,
    *selectors: Selector,
    when: Sequence[str] = ("memory some 100ms/2s", "mem_available < 5%"),
    **kw: Any,
) -> Rule:
    return Rule(
        name="test",
        when=tuple(parse_condition(w) for w in when),
        guard=KillGuard(SystemScope(), procfs=ProcFS(fake.root)),
        selectors=selectors or (ByOomScore(),),
        actions=(KillAction(),),
        **kw,
    )


async def _run(
    fake: FakeProc, rules: Sequence[Rule], events: Sequence[Any]
) -> tuple[list[KillRecord], Engine]:
    records: list[KillRecord] = []

    async def emit(record: KillRecord) -> None:
        records.append(record)

    engine = Engine(tuple(rules), emit=emit, procfs=ProcFS(fake.root))
    async with trio.open_nursery() as nursery:
        for event in events:
            if isinstance(event, float | int):
                await trio.sleep(event)
            else:
                await engine.handle(event, nursery)
    return records, engine


def _pressure(spec_text: str = "memory some 100ms/2s") -> PressureEvent:
    return PressureEvent(trio.current_time(), parse_condition(spec_text).spec, None, "trigger")  # type: ignore[union-attr]


async def test_pressure_and_memory_together_choose_the_largest_oom_score(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    records, engine = await _run(fake, [_rule(fake)], [_pressure()])
    (record,) = records
    assert record.outcome == "dry-run"
    assert record.dry_run is True
    assert (
        record.victim is not None and record.victim.pid == 600 and record.victim.comm == "browser"
    )
    assert (
        record.selectors[0].selector == "test-oom-score"
        and record.selectors[0].reason == "oom_score 700"
    )
    # init, sshd, browser, editor, protected: the kernel thread is never a candidate.
    assert record.selectors[0].candidates_in == 5
    assert "memory some 100ms/2s" in record.condition and "mem_available" in record.condition
    assert record.actions[0].action == "test-kill" and record.actions[0].detail == "dry-run"
    assert record.timeline.victim_chosen is not None and record.timeline.signal_sent is not None
    assert (engine.statistics().kills, engine.statistics().dry_runs) == (0, 1)
    assert '"outcome":"dry-run"' in record.to_json_line()


async def test_pressure_alone_does_nothing_when_memory_is_plentiful(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    fake.set_meminfo(total=16 * GiB, available=12 * GiB)
    records, engine = await _run(fake, [_rule(fake)], [_pressure()])
    assert records == []
    assert engine.statistics().decisions == 0


async def test_a_filter_step_names_no_top_pid(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    # protect keeps the others in their incoming order, PID 1 first: that is no choice, and
    # the record must not read as if PID 1 had been chosen.
    records, _ = await _run(fake, [_rule(fake, Protect(), ByOomScore())], [_pressure()])
    (record,) = records
    protect, ranked = record.selectors[:2]
    assert (protect.selector, protect.top_pid) == ("protect", None)
    assert (protect.candidates_in, protect.candidates_out) == (5, 4)
    assert "protected 1 of 5" in protect.reason
    assert (ranked.selector, ranked.top_pid) == ("test-oom-score", 600)
    assert record.victim is not None and record.victim.pid == 600
    assert '"top_pid":null' in record.to_json_line()


async def test_memory_alone_waits_for_pressure_unless_the_rule_says_so(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    mem_event = ManualTrigger(0.0, "test")
    records, _ = await _run(fake, [_rule(fake, when=("mem_available < 5%",))], [mem_event])
    assert [r.outcome for r in records] == ["dry-run"]


async def test_the_guard_skips_protected_and_special_processes(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    # "protected" has the most RSS, but oom_score_adj -1000: a selector ranking by RSS puts it
    # first and the guard passes over it; init (pid 1) never becomes a victim either.
    class Largest(Selector):
        name: ClassVar[str] = "test-largest"
        inline: ClassVar[bool] = True

        def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
            return sorted(candidates, key=lambda r: -r.candidate.rss)

    records, _ = await _run(fake, [_rule(fake, Largest())], [_pressure()])
    (record,) = records
    assert record.victim is not None and record.victim.pid == 600
    guard_step = record.selectors[-1]
    assert guard_step.selector == "guard" and "800: oom-score-adj-min" in guard_step.reason


@pytest.mark.parametrize("broken", [Raises(), Hangs()], ids=["raises", "hangs"])
async def test_a_failing_selector_falls_back_to_the_largest_oom_score(
    fake: FakeProc, broken: Selector, autojump_clock: trio.testing.MockClock
) -> None:
    rule = _rule(fake, Smallest(), broken, plugin_deadline=0.5)
    records, engine = await _run(fake, [rule], [_pressure()])
    (record,) = records
    assert record.victim is not None and record.victim.pid == 600
    failed = next(s for s in record.selectors if s.error)
    assert failed.selector == broken.name
    assert (
        ("overran" in failed.error) if isinstance(broken, Hangs) else ("plugin bug" in failed.error)
    )  # type: ignore[operator]
    assert record.selectors[-1].selector == "fallback-oom-score"
    assert engine.statistics().plugin_failures == 1


async def test_memory_recovered_after_choosing_abandons_the_kill(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    class MemoryComesBack(Selector):
        name: ClassVar[str] = "test-recovers"
        inline: ClassVar[bool] = True

        def select(self, situation: Situation, candidates: Sequence[Ranked]) -> Sequence[Ranked]:
            fake.set_meminfo(total=16 * GiB, available=8 * GiB)
            return candidates

    records, engine = await _run(
        fake, [_rule(fake, ByOomScore(), MemoryComesBack())], [_pressure()]
    )
    (record,) = records
    assert record.outcome == "abandoned" and "no longer holds" in record.reason
    assert record.actions == () and record.timeline.signal_sent is None
    assert engine.statistics().abandoned == 1


async def test_cooldown(fake: FakeProc, autojump_clock: trio.testing.MockClock) -> None:
    # Dry-runs (every decision on a fake tree) rest for the cooldown but do not count against
    # the kill cap; the cap is tested with real kills in tests/kernel/test_pipeline.py.
    rule = _rule(fake, cooldown=5.0, max_kills=1)
    records: list[KillRecord] = []

    async def emit(record: KillRecord) -> None:
        records.append(record)

    engine = Engine((rule,), emit=emit, procfs=ProcFS(fake.root))
    async with trio.open_nursery() as nursery:
        for _ in range(20):  # pressure every second for 20 s
            await engine.handle(_pressure(), nursery)
            await trio.sleep(1.0)
    assert len(records) == 4  # at 0, 5, 10 and 15 s
    assert engine.statistics().skipped_cooldown == 16


async def test_no_candidate_in_scope_is_recorded(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    for pid in (500, 600, 700, 800):
        fake.remove_process(pid)
    records, engine = await _run(fake, [_rule(fake)], [_pressure()])
    assert [r.outcome for r in records] == ["no-candidate"]
    assert engine.statistics().no_candidate == 1


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[list[int]]:
    """Count the loop's 10 ms ticks while the block runs (in ``[0]``): a stalled loop counts
    none."""
    ticks = [0]

    async def heartbeat() -> None:
        while True:
            await trio.sleep(0.01)
            ticks[0] += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        yield ticks
        nursery.cancel_scope.cancel()


class BlocksSync(Selector):
    """A third-party sync selector that blocks: run on a worker thread, under the deadline."""

    name: ClassVar[str] = "test-blocks-sync"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        time.sleep(5)
        return list(candidates)


class BlocksInGenerator(Selector):
    """Blocks only once its result is iterated: that too happens on the worker thread."""

    name: ClassVar[str] = "test-blocks-in-generator"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> Any:
        time.sleep(5)
        yield from candidates


class _SlowIterable:
    def __init__(self, items: list[Ranked]) -> None:
        self.items = items

    def __iter__(self) -> Any:
        time.sleep(5)
        return iter(self.items)


class BlocksInIterable(Selector):
    """Returns an iterable (not an iterator) that blocks once iterated."""

    name: ClassVar[str] = "test-blocks-in-iterable"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> Any:
        return _SlowIterable(list(candidates))


def _slow_reason(ranked: Ranked, arg: int) -> str:
    time.sleep(5)
    return "slow"


class BlocksInReason(Selector):
    """Its reasons are functions that block (the top one is read for the record)."""

    name: ClassVar[str] = "test-blocks-in-reason"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> Any:
        return [Ranked.explained(r.candidate, 1.0, _slow_reason) for r in candidates]


@pytest.mark.parametrize(
    "blocking", [BlocksSync, BlocksInGenerator, BlocksInIterable, BlocksInReason]
)
async def test_a_blocking_sync_selector_cannot_stall_the_loop(
    fake: FakeProc, blocking: type[Selector]
) -> None:
    # Real clock (a worker thread is involved). The loop keeps ticking meanwhile.
    rule = _rule(fake, blocking(), plugin_deadline=0.3)
    async with ticking() as ticks:
        started = trio.current_time()
        records, engine = await _run(fake, [rule], [_pressure()])
        elapsed = trio.current_time() - started
    (record,) = records
    assert record.victim is not None and record.victim.pid == 600  # the fallback chose
    assert elapsed < 2 and ticks[0] >= 10
    assert engine.statistics().plugin_failures == 1


class DropsBrowser(Selector):
    """Stands for 'protect': a filter whose choice must survive a later failure."""

    name: ClassVar[str] = "test-drops-browser"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        return [r for r in candidates if r.candidate.comm != "browser"]


class WrongType(Selector):
    name: ClassVar[str] = "test-wrong-type"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Any]:
        return [r.candidate for r in candidates]  # Candidates, not Ranked


@pytest.mark.parametrize("broken", [Raises(), WrongType()], ids=["raises", "wrong-type"])
async def test_the_fallback_keeps_what_earlier_filters_dropped(
    fake: FakeProc, broken: Selector, autojump_clock: trio.testing.MockClock
) -> None:
    records, engine = await _run(fake, [_rule(fake, DropsBrowser(), broken)], [_pressure()])
    (record,) = records
    # browser (oom_score 700) was filtered out before the failure: never the fallback's pick.
    assert record.victim is not None and record.victim.pid == 700
    assert record.selectors[-1].selector == "fallback-oom-score"
    assert engine.statistics().plugin_failures == 1


async def test_one_victim_per_event_across_rules(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    first, second = _rule(fake), attrs.evolve(_rule(fake), name="second")
    records, engine = await _run(fake, [first, second], [_pressure()])
    assert [r.rule for r in records] == ["test"]
    assert engine.statistics().decisions == 1


async def test_a_memory_only_rule_keeps_acting_while_memory_stays_low(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    rule = _rule(fake, when=("mem_available < 5%",), cooldown=3.0)
    threshold = rule.when[0].threshold  # type: ignore[union-attr]
    events: list[Any] = [MemoryEvent(0.0, threshold, "crossed", 400 * MiB, 800 * MiB, 16 * GiB)]
    for _ in range(10):  # the source's reminders, one a second
        events += [
            1.0,
            MemoryEvent(0.0, threshold, "still-crossed", 400 * MiB, 800 * MiB, 16 * GiB),
        ]
    records, _engine = await _run(fake, [rule], events)
    assert len(records) == 4  # at 0, 3, 6 and 9 s: after every cooldown, not once per crossing


async def test_previews_read_afresh_and_rules_share_one_read_per_event(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    engine = Engine((_rule(fake),), emit=_ignore, procfs=ProcFS(fake.root))
    first = await engine.preview(engine.rules[0])
    fake.add_process(900, comm="newcomer", rss=8 * GiB, oom_score=999)
    second = await engine.preview(engine.rules[0])
    assert first[0] is not None and first[0].candidate.pid == 600
    assert second[0] is not None and second[0].candidate.pid == 900


async def _ignore(_record: KillRecord) -> None:
    return None


# -- plugin faults (issue 11): isolation, immutable views, failing safe, the action chain ------

#: What a plugin may raise besides Exception: none of it may end a decision, let alone the reaper.
NOT_EXCEPTIONS = [
    SystemExit(0),
    SystemExit(3),
    GeneratorExit(),
    BaseExceptionGroup("plugin", [SystemExit(1), RuntimeError("bug")]),
]
NOT_EXCEPTION_IDS = ["exit-0", "exit-3", "generator-exit", "group"]


class RaisesThis(Selector):
    name: ClassVar[str] = "test-raises-this"
    inline: ClassVar[bool] = True
    exc: BaseException = RuntimeError("plugin bug")

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        raise self.exc


def _raising(exc: BaseException) -> RaisesThis:
    sel = RaisesThis()
    sel.exc = exc
    return sel


@pytest.mark.parametrize("exc", NOT_EXCEPTIONS, ids=NOT_EXCEPTION_IDS)
async def test_a_selector_raising_anything_falls_back(
    fake: FakeProc, exc: BaseException, autojump_clock: trio.testing.MockClock
) -> None:
    records, engine = await _run(fake, [_rule(fake, Smallest(), _raising(exc))], [_pressure()])
    (record,) = records
    assert record.victim is not None and record.victim.pid == 600
    assert record.selectors[-1].selector == "fallback-oom-score"
    assert engine.statistics().plugin_failures == 1


async def test_a_lazy_reason_raising_anything_gives_a_reason_saying_so() -> None:
    def why(_r: Ranked, _arg: int) -> str:
        raise SystemExit(0)

    ranked = Ranked.explained(Candidate(7, 1, "x", 1, "S", 0, 0), 1.0, why)
    assert ranked.reason == "(its reason failed: SystemExit: 0)"


async def test_isolation_lets_cancellation_and_ctrl_c_through() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        with isolated() as failed:
            try:
                await trio.sleep(1)
            except trio.Cancelled as cancelled:  # a plugin wrapping it in a group
                raise BaseExceptionGroup("plugin", [cancelled, SystemExit(0)]) from None
    assert scope.cancelled_caught and failed.error is None
    with pytest.raises(KeyboardInterrupt), isolated():
        raise KeyboardInterrupt
    with isolated() as failed:
        raise SystemExit(0)
    assert isinstance(failed.error, SystemExit)


async def test_cancelling_a_decision_is_no_plugin_failure(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    engine = Engine(
        (_rule(fake, Hangs(), plugin_deadline=100),), emit=_ignore, procfs=ProcFS(fake.root)
    )
    with trio.move_on_after(1) as scope:
        async with trio.open_nursery() as nursery:
            await engine.handle(_pressure(), nursery)
    assert scope.cancelled_caught
    assert engine.statistics().plugin_failures == 0 and engine.statistics().decisions == 1


class Smuggles(Selector):
    """After a filter dropped the browser, tries to bring it back."""

    name: ClassVar[str] = "test-smuggles"
    inline: ClassVar[bool] = True
    into_the_list: bool = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        browser = Ranked(Candidate.from_info(situation.procfs.process_info(600)), 1e9, "smuggled")
        if self.into_the_list:  # the list it was given, which the check once compared against
            candidates.append(browser)  # type: ignore[attr-defined]
            return sorted(candidates, key=lambda r: -r.score)
        return [browser, *candidates]


@pytest.mark.parametrize("into_the_list", [True, False], ids=["appended", "invented"])
async def test_a_selector_cannot_smuggle_a_dropped_process_back(
    fake: FakeProc, into_the_list: bool, autojump_clock: trio.testing.MockClock
) -> None:
    smuggler = Smuggles()
    smuggler.into_the_list = into_the_list
    records, engine = await _run(fake, [_rule(fake, DropsBrowser(), smuggler)], [_pressure()])
    (record,) = records
    assert record.victim is not None and record.victim.pid == 700  # never the browser
    assert record.selectors[1].error is not None
    assert engine.statistics().plugin_failures == 1


class ProtectsBrowser(DropsBrowser):
    name: ClassVar[str] = "test-protects-browser"
    protective: ClassVar[bool] = True


class ProtectiveRaises(Raises):
    name: ClassVar[str] = "test-protective-raises"
    protective: ClassVar[bool] = True


class ProtectiveHangs(Hangs):
    name: ClassVar[str] = "test-protective-hangs"
    protective: ClassVar[bool] = True


@pytest.mark.parametrize("broken", [ProtectiveRaises(), ProtectiveHangs()], ids=["raises", "hangs"])
async def test_a_failing_protective_selector_fails_safe(
    fake: FakeProc, broken: Selector, autojump_clock: trio.testing.MockClock
) -> None:
    records, engine = await _run(fake, [_rule(fake, broken, plugin_deadline=0.5)], [_pressure()])
    (record,) = records
    assert record.outcome == "failed" and record.victim is None and record.actions == ()
    assert "failed safe" in record.reason and broken.name in record.reason
    assert all(s.selector != "fallback-oom-score" for s in record.selectors)
    assert (engine.statistics().fail_safe, engine.statistics().plugin_failures) == (1, 1)


async def test_a_protective_selector_after_a_failure_still_filters_the_fallback(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    rule = _rule(fake, Raises(), Smallest(), ProtectsBrowser())
    records, _ = await _run(fake, [rule], [_pressure()])
    (record,) = records
    assert record.victim is not None and record.victim.pid == 700  # browser spared
    names = [s.selector for s in record.selectors]
    assert names == ["test-raises", "fallback-oom-score", "test-protects-browser"]


def test_the_built_in_filters_are_protective() -> None:
    assert Protect.protective and Scope.protective and not ByOomScore.protective


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("plugin_deadline", math.nan),
        ("action_deadline", math.inf),
        ("victim_timeout", 0.0),
        ("kill_window", -1.0),
        ("cooldown", -5.0),
        ("cooldown", math.inf),
        ("max_kills", 0),
    ],
)
def test_a_rule_cannot_have_unusable_durations(fake: FakeProc, field: str, value: float) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        _rule(fake, **{field: value})
    _rule(fake, cooldown=0.0)  # resting 0 s is fine


class FailsToStart(Action):
    """Stands for a prekill hook that cannot start (no such user, EPERM, the pids limit)."""

    name: ClassVar[str] = "test-fails-to-start"
    exc: BaseException = PermissionError(1, "Operation not permitted")

    async def act(self, context: Any) -> str:
        raise self.exc


@pytest.mark.parametrize(
    "exc", [PermissionError(1, "Operation not permitted"), KeyError("nosuchuser"), *NOT_EXCEPTIONS]
)
async def test_a_failed_action_that_does_not_signal_does_not_stop_the_kill(
    fake: FakeProc, exc: BaseException, autojump_clock: trio.testing.MockClock
) -> None:
    hook = FailsToStart()
    hook.exc = exc
    rule = attrs.evolve(_rule(fake), actions=(hook, KillAction()))
    records, engine = await _run(fake, [rule], [_pressure()])
    (record,) = records
    assert record.outcome == "dry-run" and record.timeline.signal_sent is not None
    assert [(a.action, a.outcome) for a in record.actions] == [
        ("test-fails-to-start", "failed"),
        ("test-kill", "ok"),
    ]
    assert engine.statistics().plugin_failures == 1


class SignalsAndFails(FailsToStart):
    name: ClassVar[str] = "test-signals-and-fails"
    signals: ClassVar[bool] = True


async def test_a_failed_signalling_action_ends_the_chain(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    rule = attrs.evolve(_rule(fake), actions=(SignalsAndFails(), KillAction()))
    records, _ = await _run(fake, [rule], [_pressure()])
    (record,) = records
    assert record.outcome == "failed" and "Operation not permitted" in record.reason
    assert [a.action for a in record.actions] == ["test-signals-and-fails"]


class HangsAct(Action):
    name: ClassVar[str] = "test-hangs-act"

    async def act(self, context: Any) -> str:
        await trio.sleep_forever()
        raise AssertionError


async def test_a_selector_that_keeps_overrunning_is_switched_off_once(
    fake: FakeProc, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rule = _rule(fake, Smallest(), Hangs(), plugin_deadline=0.5, cooldown=0.0)
    events: list[Any] = []
    for _ in range(OVERRUNS_TO_SWITCH_OFF + 2):
        events += [ManualTrigger(0.0, "test"), 1.0]
    with caplog.at_level(logging.ERROR, "reapkit"):
        records, engine = await _run(fake, [rule], events)
    errors = [s.selectors[1].error for s in records]
    assert errors[:OVERRUNS_TO_SWITCH_OFF] == ["overran its deadline"] * OVERRUNS_TO_SWITCH_OFF
    assert all("switched off" in (e or "") for e in errors[OVERRUNS_TO_SWITCH_OFF:])
    assert all(r.victim is not None and r.victim.pid == 600 for r in records)  # the fallback
    assert engine.statistics().plugins_disabled == 1
    assert len([r for r in caplog.records if "switched off" in r.getMessage()]) == 1


async def test_only_actions_that_do_not_signal_are_switched_off(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    class HangsAndSignals(HangsAct):
        name: ClassVar[str] = "test-hangs-and-signals"
        signals: ClassVar[bool] = True

    quiet = attrs.evolve(
        _rule(fake, cooldown=0.0), action_deadline=0.5, actions=(HangsAct(), KillAction())
    )
    loud = attrs.evolve(quiet, name="loud", actions=(HangsAndSignals(),))
    events: list[Any] = []
    for _ in range(OVERRUNS_TO_SWITCH_OFF + 1):
        events += [ManualTrigger(0.0, "test"), 1.0]
    records, engine = await _run(fake, [quiet], events)
    assert records[-1].actions[0].detail.startswith("switched off")
    assert records[-1].outcome == "dry-run"
    records, engine = await _run(fake, [loud], events)
    assert {r.actions[0].detail for r in records} == {"overran its deadline"}
    assert engine.statistics().plugins_disabled == 0


class HangsThenSparesBrowser(ProtectsBrowser):
    """A protective selector that overruns its first calls, then answers in time."""

    name: ClassVar[str] = "test-hangs-then-spares"
    hangs = OVERRUNS_TO_SWITCH_OFF + 1

    async def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        if self.hangs:
            self.hangs -= 1
            await trio.sleep_forever()
        return super().select(situation, candidates)


async def test_a_protective_selector_is_never_switched_off(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    rule = _rule(fake, HangsThenSparesBrowser(), ByOomScore(), plugin_deadline=0.5, cooldown=0.0)
    events: list[Any] = []
    for _ in range(OVERRUNS_TO_SWITCH_OFF + 2):
        events += [ManualTrigger(0.0, "test"), 1.0]
    records, engine = await _run(fake, [rule], events)
    *overran, answered = records
    assert {(r.outcome, r.selectors[0].error) for r in overran} == {
        ("failed", "overran its deadline")
    }
    assert answered.victim is not None and answered.victim.pid == 700  # it protects again
    assert engine.statistics().plugins_disabled == 0


async def test_stopping_mid_chain_after_a_signal_still_records_the_victim(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    rule = attrs.evolve(_rule(fake), actions=(TermThenHang(),), action_deadline=100.0)
    records: list[KillRecord] = []

    async def emit(record: KillRecord) -> None:
        records.append(record)

    engine = Engine((rule,), emit=emit, procfs=ProcFS(fake.root))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.handle, _pressure(), nursery)
        await trio.sleep(1)  # the action signalled and hangs
        nursery.cancel_scope.cancel()
    (record,) = records
    assert record.victim is not None and record.victim.pid == 600
    assert record.outcome == "dry-run" and "stopped during the action chain" in record.reason
    assert engine.statistics().dry_runs == 1

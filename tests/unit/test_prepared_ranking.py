"""Prepared rankings: made when a memory line is approaching, used at the crossing only while
fresh, read afresh and checked again (protective selectors, guard) before anyone is chosen.

Fake /proc trees and the autojump clock: the guard reading a fake tree never signals, so "never
signalled" here means never the record's victim, never reached by an action.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from reapkit import KillGuard, SystemScope
from reapkit._conditions import MemoryCondition, parse_condition
from reapkit._engine import PREPARED_SHORTLIST, Engine, ManualTrigger, Rule
from reapkit._plugins import Action, Ranked, Selector, Situation
from reapkit._records import KillRecord
from reapkit._sources.memory import MemoryEvent
from reapkit.builtin.selectors import LargestRss, Protect, ProtectOptions
from reapkit.lowlevel import ProcFS
from reapkit.testing import FakeProc

GiB = 1 << 30
MiB = 1 << 20
MAX_AGE = 0.5


class Signal(Action):
    name: ClassVar[str] = "test-signal"
    inline: ClassVar[bool] = True
    signals: ClassVar[bool] = True

    async def act(self, context: Any) -> str:
        return str(context.send_signal(15).value)


class Calls(Selector):
    """Passes everything through, counting its calls; slow when told (a worker's await)."""

    name: ClassVar[str] = "test-calls"
    delay: float = 0.0

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.calls = 0

    async def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        self.calls += 1
        await trio.sleep(self.delay)
        return list(candidates)


class FailsFromTheSecondCall(Selector):
    """A protective selector that answers at the preparation and raises at the crossing."""

    name: ClassVar[str] = "test-fails-later"
    inline: ClassVar[bool] = True
    protective: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.calls = 0

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("cannot tell any more")
        return list(candidates)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path)
    proc.set_meminfo(total=16 * GiB, available=400 * MiB)  # below 5 %
    proc.add_process(500, comm="sshd", rss=8 * MiB, oom_score=5)
    proc.add_process(600, comm="browser", rss=3 * GiB, oom_score=700, start_time=6000)
    proc.add_process(700, comm="editor", rss=500 * MiB, oom_score=120, start_time=7000)
    return proc


def _rule(fake: FakeProc, *selectors: Selector) -> Rule:
    return Rule(
        name="test",
        when=(parse_condition("mem_available < 5%"),),
        guard=KillGuard(SystemScope(), procfs=ProcFS(fake.root)),
        selectors=selectors or (LargestRss(),),
        actions=(Signal(),),
        cooldown=0.0,
    )


def _event(rule: Rule, state: str) -> MemoryEvent:
    cond = rule.when[0]
    assert isinstance(cond, MemoryCondition)
    return MemoryEvent(trio.current_time(), cond.threshold, state, 400 * MiB, 800 * MiB, 16 * GiB)  # type: ignore[arg-type]


class _Harness:
    def __init__(self, fake: FakeProc, rule: Rule, max_age: float = MAX_AGE) -> None:
        self.rule = rule
        self.records: list[KillRecord] = []
        self.engine = Engine(
            (rule,), emit=self._emit, procfs=ProcFS(fake.root), prepare_ranking=max_age
        )

    async def _emit(self, record: KillRecord) -> None:
        self.records.append(record)

    async def approach(self, nursery: trio.Nursery) -> None:
        """An ``approaching`` event, and the preparation it starts run to its end (inline
        selectors run on worker threads there: wait for its end, not for blocked tasks)."""
        await self.engine.handle(_event(self.rule, "approaching"), nursery)
        await _prepared(self.engine)

    async def cross(self, nursery: trio.Nursery) -> KillRecord:
        await self.engine.handle(_event(self.rule, "crossed"), nursery)
        await trio.testing.wait_all_tasks_blocked()  # the record comes from its confirmation
        return self.records[-1]

    async def prepared_then_crossed(
        self, between: Callable[[], object] = lambda: None, *, wait: float = 0.0
    ) -> KillRecord:
        """Prepare, call ``between()`` (the machine changes), wait, cross: the record."""
        async with trio.open_nursery() as nursery:
            await self.approach(nursery)
            between()
            await trio.sleep(wait)
            record = await self.cross(nursery)
            nursery.cancel_scope.cancel()
        return record


async def _prepared(engine: Engine) -> None:
    job = engine._preparing
    if job is not None:
        await job.done.wait()


def _steps(record: KillRecord) -> list[str]:
    return [s.selector for s in record.selectors]


def _prepared_step(record: KillRecord) -> str:
    return next(s.reason for s in record.selectors if s.selector == "prepared")


async def test_an_approaching_line_prepares_the_ranking_and_the_crossing_uses_it(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    calls = Calls()
    h = _Harness(fake, _rule(fake, calls, LargestRss()))

    def prepared() -> None:
        assert calls.calls == 1 and h.records == []  # nothing decided, nothing sent

    record = await h.prepared_then_crossed(prepared, wait=0.1)
    assert calls.calls == 1  # the crossing ran no selector chain of its own
    assert record.victim is not None and record.victim.pid == 600
    assert _steps(record) == ["test-calls", "largest-rss", "prepared"]
    assert "prepared from 100 ms before the trigger (in 0 ms)" in _prepared_step(record)
    stats = h.engine.statistics()
    assert (stats.prepared, stats.prepared_used, stats.prepared_unused) == (1, 1, 0)


async def test_a_prepared_ranking_older_than_the_bound_is_not_used(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    calls = Calls()
    h = _Harness(fake, _rule(fake, calls, LargestRss()))
    record = await h.prepared_then_crossed(
        # Meanwhile the editor became the largest: a fresh scan must see it.
        lambda: fake.add_process(700, comm="editor", rss=5 * GiB, oom_score=900, start_time=7000),
        wait=MAX_AGE + 0.01,
    )
    assert calls.calls == 2  # the crossing scanned afresh
    assert "prepared" not in _steps(record)
    assert record.victim is not None and record.victim.pid == 700
    assert h.engine.statistics().prepared_unused == 1


async def test_a_ranking_is_used_once(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    calls = Calls()
    h = _Harness(fake, _rule(fake, calls, LargestRss()))
    async with trio.open_nursery() as nursery:
        await h.approach(nursery)
        first = await h.cross(nursery)
        await trio.sleep(0.01)
        second = await h.cross(nursery)
        nursery.cancel_scope.cancel()
    assert "prepared" in _steps(first) and "prepared" not in _steps(second)
    assert calls.calls == 2


async def test_a_victim_that_exited_since_the_preparation_is_never_chosen(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    h = _Harness(fake, _rule(fake))
    record = await h.prepared_then_crossed(lambda: fake.remove_process(600))
    assert record.victim is not None and record.victim.pid == 700
    assert "600 exited" in _prepared_step(record)
    assert h.engine.statistics().prepared_used == 1


async def test_a_victim_replaced_since_the_preparation_is_never_chosen(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    # PID 600 was reaped and reused by a newcomer (another start time), larger still: the
    # prepared entry is not the newcomer, and the newcomer was never ranked.

    def reused() -> None:
        fake.remove_process(600)
        fake.add_process(600, comm="newcomer", rss=6 * GiB, oom_score=900, start_time=9000)

    record = await _Harness(fake, _rule(fake)).prepared_then_crossed(reused)
    assert record.victim is not None and record.victim.pid == 700
    assert "600 is another process now" in _prepared_step(record)


async def test_a_zombie_since_the_preparation_is_never_chosen(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    record = await _Harness(fake, _rule(fake)).prepared_then_crossed(
        lambda: fake.add_process(600, comm="browser", state="Z", start_time=6000, oom_score=0)
    )
    assert record.victim is not None and record.victim.pid == 700


async def test_protect_applies_afresh_to_a_prepared_shortlist(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    # The browser exec'd into a protected program after the preparation (same PID, same
    # start time, another comm): protect, run again on fresh reads, spares it.
    protect = Protect(ProtectOptions(comm=("^keeper$",)))
    record = await _Harness(fake, _rule(fake, protect, LargestRss())).prepared_then_crossed(
        lambda: fake.add_process(600, comm="keeper", rss=3 * GiB, oom_score=700, start_time=6000)
    )
    assert record.victim is not None and record.victim.pid == 700
    assert _steps(record) == ["protect", "largest-rss", "prepared", "protect"]
    assert record.selectors[-1].candidates_out == record.selectors[-1].candidates_in - 1


async def test_the_guard_applies_afresh_to_a_prepared_shortlist(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    # oom_score_adj set to -1000 after the preparation: the guard refuses it at the crossing.
    record = await _Harness(fake, _rule(fake)).prepared_then_crossed(
        lambda: fake.add_process(
            600, comm="browser", rss=3 * GiB, oom_score=0, oom_score_adj=-1000, start_time=6000
        )
    )
    assert record.victim is not None and record.victim.pid == 700
    assert record.selectors[-1].selector == "guard"
    assert "600: oom-score-adj-min" in record.selectors[-1].reason


async def test_a_protective_selector_failing_at_the_crossing_fails_safe(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    h = _Harness(fake, _rule(fake, FailsFromTheSecondCall(), LargestRss()))
    record = await h.prepared_then_crossed()
    assert record.outcome == "failed" and record.victim is None
    assert "failed safe" in record.reason and record.actions == ()


async def test_an_empty_shortlist_means_a_fresh_scan(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:

    def replaced() -> None:
        for pid in (500, 600, 700):  # everyone on the shortlist is gone ...
            fake.remove_process(pid)
        fake.add_process(800, comm="late", rss=GiB, oom_score=300)  # ... and a newcomer came

    h = _Harness(fake, _rule(fake))
    record = await h.prepared_then_crossed(replaced)
    assert record.victim is not None and record.victim.pid == 800
    assert _steps(record)[-2:] == ["prepared", "largest-rss"]
    stats = h.engine.statistics()
    assert (stats.prepared_used, stats.prepared_unused) == (0, 1)


async def test_the_shortlist_holds_the_best_the_guard_allowed(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    for pid in range(1000, 1000 + 2 * PREPARED_SHORTLIST):
        fake.add_process(pid, comm="many", rss=(pid - 900) * MiB, oom_score=50)
    fake.add_process(900, comm="shielded", rss=9 * GiB, oom_score_adj=-1000)
    record = await _Harness(fake, _rule(fake)).prepared_then_crossed()
    prepared = next(s for s in record.selectors if s.selector == "prepared")
    assert prepared.candidates_in == PREPARED_SHORTLIST
    guard_at_preparation = record.selectors[_steps(record).index("prepared") - 1]
    assert guard_at_preparation.selector == "guard" and "900" in guard_at_preparation.reason
    assert record.victim is not None and record.victim.pid == 600


async def test_off_when_prepare_ranking_is_zero(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    calls = Calls()
    h = _Harness(fake, _rule(fake, calls, LargestRss()), max_age=0.0)
    async with trio.open_nursery() as nursery:
        await h.approach(nursery)
        assert calls.calls == 0
        record = await h.cross(nursery)
        nursery.cancel_scope.cancel()
    assert "prepared" not in _steps(record) and h.engine.statistics().prepared == 0


async def test_a_signal_discards_what_was_prepared(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    first = _rule(fake)
    other = Rule(
        name="other",
        when=first.when,
        guard=first.guard,
        selectors=(LargestRss(),),
        actions=(Signal(),),
    )
    records: list[KillRecord] = []

    async def emit(record: KillRecord) -> None:
        records.append(record)

    engine = Engine((first, other), emit=emit, procfs=ProcFS(fake.root), prepare_ranking=MAX_AGE)
    async with trio.open_nursery() as nursery:
        await engine.handle(_event(first, "approaching"), nursery)
        await _prepared(engine)
        assert engine.statistics().prepared == 2  # both rules watch the line
        await engine.handle(_event(first, "crossed"), nursery)  # "test" signals
        await trio.sleep(0.01)
        await engine.handle(ManualTrigger(trio.current_time(), "again"), nursery)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # The dry-run signal does not keep the victim "dying": the manual trigger decides again,
    # for the first rule, from a fresh scan: the ranking prepared for it was used, the other
    # rule's was discarded with the signal.
    assert [("prepared" in _steps(r)) for r in records] == [True, False]


@pytest.mark.parametrize(("delay", "cross_at"), [(0.2, 0.05), (0.7, MAX_AGE + 0.1)])
async def test_a_crossing_during_the_preparation_waits_for_it(
    fake: FakeProc, autojump_clock: trio.testing.MockClock, delay: float, cross_at: float
) -> None:
    # Even one begun longer before the trigger than the bound: it ends after the trigger, and
    # what it read is no older than what a scan begun at the trigger would have read by its
    # end, which comes later.
    calls = Calls()
    calls.delay = delay
    h = _Harness(fake, _rule(fake, calls, LargestRss()))
    async with trio.open_nursery() as nursery:
        await h.engine.handle(_event(h.rule, "approaching"), nursery)
        await trio.sleep(cross_at)  # the preparation is inside the slow selector
        record = await h.cross(nursery)
        nursery.cancel_scope.cancel()
    began, took = round(cross_at * 1000), round(delay * 1000)
    assert f"prepared from {began} ms before the trigger (in {took} ms)" in _prepared_step(record)
    assert calls.calls == 1 and record.victim is not None


async def test_a_slow_preparation_is_renewed_sooner(
    fake: FakeProc, autojump_clock: trio.testing.MockClock
) -> None:
    # Renewed once older than half the bound, or sooner when a preparation as slow as the
    # last would otherwise end after it expired: here 0.3 s to make, 0.5 s bound, so at 0.2 s.
    calls = Calls()
    calls.delay = 0.3
    h = _Harness(fake, _rule(fake, calls, LargestRss()))
    async with trio.open_nursery() as nursery:
        await h.approach(nursery)
        for wait, made in ((0.15, 1), (0.07, 2)):
            await trio.sleep(wait)
            await h.approach(nursery)
            assert h.engine.statistics().prepared == made
        nursery.cancel_scope.cancel()

"""The engine: a trigger arrives → rules → candidates → selectors → actions → confirmation.

Decisions are serial (one task handles one event at a time). A rule with a victim still dying
takes no second one until the first has exited or ``victim_timeout`` passed, and kills per rule
are capped per window: no kill loops (earlyoom #121, #309). After choosing, memory conditions
are sampled again and the kill is abandoned if memory recovered meanwhile.

Every plugin call runs under a deadline, isolated (see ``_plugins.PluginCalls``). A selector
that raises, overruns or is switched off is logged, counted and skipped: the rule falls back to
the largest ``oom_score`` among what the selectors before it kept, and the protective
selectors after it still filter. A protective selector (``protect``) that fails makes the
decision fail safe: no victim. A failed action that does not signal is recorded and the chain
goes on; a failed signalling action ends it, and a chain cut after a signal went out ends in
SIGKILL for a victim that has not exited.

Prepared rankings (``prepare_ranking`` seconds, 0: off): when the memory source says a line is
approaching (its headroom shrinks toward it fast enough to reach it soon), the rules watching
that line get their candidates and selector chain run beforehand, in a task of their own, and
keep a shortlist of the best the guard allowed. A decision whose rule has one finished at most
``prepare_ranking`` before its trigger (or being finished) uses it: the shortlist is read
afresh (a process that exited or whose start time changed is dropped), the protective
selectors and the guard run on it again, and only if nothing on it may be chosen does the
decision scan afresh. Each is used once; a signal discards them all. See
docs/architecture.md, "Prepared rankings".
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import attrs
import trio

from ._conditions import Condition, MemoryCondition, PressureCondition
from ._errors import NoSuchProcess, ProcessChanged, ReapkitError
from ._guard import (
    CgroupScope,
    KillGuard,
    KillRefused,
    Refusal,
    RefusalReason,
    SubtreeScope,
    cgroup_members,
)
from ._plugins import (
    Action,
    ActionContext,
    Candidate,
    PluginCalls,
    Ranked,
    RuleView,
    Selector,
    Situation,
    TimelineBuilder,
    describe,
    isolated,
)
from ._plugins import (
    ManualTrigger as ManualTrigger,
)
from ._process import ProcessRef
from ._procfs import DEAD_STATES, KeptScoreFiles, MemInfo, ProcFS, in_subtree
from ._records import ActionStep, KillRecord, KillWarning, Outcome, SelectorStep, Victim
from ._sources.memory import MemoryEvent
from ._sources.psi import PressureEvent, PressureWatchEnded

if TYPE_CHECKING:
    from ._reap_stage import ReapStage

log = logging.getLogger("reapkit.engine")

#: A candidate scan yields to the event loop after this many processes.
CHECKPOINT_EVERY = 256
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: ``born_from`` for a fake /proc tree, whose start times are not this boot's ticks.
_NEVER = sys.maxsize
#: Memory counts as back when the victim's anonymous memory + swap fell below this share.
MEMORY_BACK_FRACTION = 0.1
#: How many of a prepared ranking's best (that the guard allowed) it keeps for the decision.
PREPARED_SHORTLIST = 8


def _seconds(*, zero_ok: bool = False) -> Callable[[Rule, attrs.Attribute[float], object], None]:
    """A validator: a finite number of seconds, above 0 (or at least 0)."""

    def check(rule: Rule, attribute: attrs.Attribute[float], value: object) -> None:
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number) or number < 0 or not (number or zero_ok):
            least = "at least 0" if zero_ok else "above 0"
            raise ValueError(
                f"rule {rule.name!r}: {attribute.name} must be a finite number of seconds"
                f" {least}, not {value!r}"
            )

    return check


def _count(*, least: int) -> Callable[[Rule, attrs.Attribute[int], object], None]:
    """A validator: an integer (not a bool) of at least ``least``."""

    def check(_rule: Rule, attribute: attrs.Attribute[int], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(
                f"{attribute.name} must be an integer, at least {least}, not {value!r}"
            )

    return check


@attrs.frozen
class Rule:
    """One rule of a policy, with its plugins instantiated and its guard built. Its durations
    are finite (``cooldown`` at least 0, the others above 0): a rule cannot be built with
    ``nan``, ``inf`` or negative ones."""

    name: str
    when: tuple[Condition, ...]
    guard: KillGuard
    selectors: tuple[Selector, ...]
    actions: tuple[Action, ...]
    #: The rule's memory cgroup directory, for ``cgroup_usage`` conditions (candidates come
    #: from the scope, not from this).
    cgroup: str | None = None
    cooldown: float = attrs.field(default=5.0, validator=_seconds(zero_ok=True))
    victim_timeout: float = attrs.field(default=10.0, validator=_seconds())
    max_kills: int = attrs.field(default=10, validator=_count(least=1))
    kill_window: float = attrs.field(default=60.0, validator=_seconds())
    plugin_deadline: float = attrs.field(default=1.0, validator=_seconds())
    action_deadline: float = attrs.field(default=30.0, validator=_seconds())

    def view(self) -> RuleView:
        """What the rule's actions see of it (:attr:`ActionContext.rule`)."""
        return RuleView(
            self.name, self.guard, self.cooldown, self.victim_timeout, self.plugin_deadline,
            self.action_deadline, protects=any(s.protective for s in self.selectors),
        )  # fmt: skip


@attrs.frozen
class _Prepared:
    """A rule's ranking made before its line was crossed: the best the guard then allowed."""

    rule: Rule
    #: When its candidate scan began and when its shortlist was ready (trio clock). Its age
    #: is counted from ``finished``: what it read is at most that age + its own scan time old
    #: at the decision, as a scan begun at the trigger would be its scan time old at the end.
    started: float
    finished: float
    shortlist: tuple[Ranked, ...]
    steps: tuple[SelectorStep, ...]
    #: How many candidates the selector chain ranked.
    ranked: int


@attrs.define(eq=False)
class _Preparation:
    """The preparation running now, for which rules; ``done`` is set when it ends."""

    rules: frozenset[str]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)


@attrs.frozen
class EngineStatistics:
    events: int
    decisions: int
    kills: int
    #: Decisions that would have killed, in dry-run (not counted as kills nor against caps).
    dry_runs: int
    abandoned: int
    refused: int
    no_candidate: int
    plugin_failures: int
    skipped_busy: int
    skipped_cooldown: int
    skipped_cap: int
    #: Selectors and non-signalling actions switched off for overrunning their deadline.
    plugins_disabled: int = 0
    #: Decisions that chose no victim because a protective selector failed.
    fail_safe: int = 0
    #: Rankings prepared before a crossing (``prepare_ranking``).
    prepared: int = 0
    #: Decisions that chose from a prepared ranking's shortlist.
    prepared_used: int = 0
    #: Decisions that found their rule's prepared ranking too old, or nothing on its shortlist
    #: that could be chosen now, and scanned afresh.
    prepared_unused: int = 0


@attrs.define
class EngineCounters:
    """What :meth:`Engine.statistics` reports, counted as it happens (see
    :class:`EngineStatistics` for each)."""

    events: int = 0
    decisions: int = 0
    kills: int = 0
    dry_runs: int = 0
    abandoned: int = 0
    refused: int = 0
    no_candidate: int = 0
    plugin_failures: int = 0
    skipped_busy: int = 0
    skipped_cooldown: int = 0
    skipped_cap: int = 0
    fail_safe: int = 0
    prepared: int = 0
    prepared_used: int = 0
    prepared_unused: int = 0


Emit = Callable[[KillRecord], Awaitable[None]]


class PidSource(Protocol):
    """Where a rule whose scope is not a cgroup gets its PIDs (the ProcessTable)."""

    def pids(self) -> Iterable[int]: ...


@attrs.define(eq=False)
class _Decision:
    """One decision in the making: its rule, what it saw, its timeline and what it chose —
    everything its record is made of."""

    rule: Rule
    condition: str
    situation: Situation
    timeline: TimelineBuilder
    epoch_offset: float
    steps: tuple[SelectorStep, ...] = ()
    victim: Victim | None = None

    def record(
        self,
        outcome: Outcome,
        reason: str,
        *,
        actions: Sequence[ActionStep] = (),
        refusal: str | None = None,
        bytes_freed: int | None = None,
    ) -> KillRecord:
        return KillRecord(
            rule=self.rule.name,
            outcome=outcome,
            reason=reason,
            condition=self.condition,
            timeline=self.timeline.build(),
            victim=self.victim,
            selectors=self.steps,
            actions=tuple(actions),
            bytes_freed=bytes_freed,
            dry_run=not self.rule.guard.signals_enabled,
            refusal=refusal,
            epoch_offset=self.epoch_offset,
        )


@attrs.define
class Engine:
    """Decides, one event at a time, for a policy's rules; see the module docstring.

    ``emit`` receives every KillRecord; ``table`` (the ProcessTable) supplies PIDs for rules
    whose scope is not a cgroup; ``reap_stage`` reaps for the ``reap`` action;
    ``warn_observers`` hands the ``warn`` action's warnings to the observers."""

    rules: tuple[Rule, ...]
    emit: Emit
    procfs: ProcFS = attrs.field(factory=ProcFS)
    #: The ProcessTable (or another :class:`PidSource`), or None to scan /proc.
    table: PidSource | None = None
    reap_stage: ReapStage | None = None
    warn_observers: Callable[[KillWarning], Awaitable[None]] | None = None
    _last_pressure: dict[object, float] = attrs.field(factory=dict, init=False)
    #: Victims signalled and not yet confirmed gone: pid -> deadline (trio clock).
    _dying: dict[int, float] = attrs.field(factory=dict, init=False)
    _cooldown_until: dict[str, float] = attrs.field(factory=dict, init=False)
    _kills: dict[str, collections.deque[float]] = attrs.field(
        factory=lambda: collections.defaultdict(collections.deque), init=False
    )
    _counters: EngineCounters = attrs.field(factory=EngineCounters, init=False)
    _epoch_offset: float = attrs.field(factory=lambda: 0.0, init=False)
    _event_serial: int = attrs.field(default=0, init=False)
    _scan_cache: dict[object, tuple[object, list[Ranked]]] = attrs.field(factory=dict, init=False)
    _meminfo_read: tuple[int, MemInfo] | None = attrs.field(default=None, init=False)
    #: Keep up to this many ``oom_score`` files open between decisions (0: read them afresh).
    keep_score_files: int = attrs.field(default=0, kw_only=True)
    _kept: KeptScoreFiles | None = attrs.field(default=None, init=False)
    _scope_pids: dict[object, set[int]] = attrs.field(factory=dict, init=False)
    #: Prepare rankings when a line is approaching, and use one at most this old (seconds,
    #: from its end to the decision's trigger); 0: never.
    prepare_ranking: float = attrs.field(default=0.0, kw_only=True)
    _prepared: dict[str, _Prepared] = attrs.field(factory=dict, init=False)
    _preparing: _Preparation | None = attrs.field(default=None, init=False)
    #: False: plugins' sync code runs on the trio thread (``PluginCalls.threads``), for a
    #: virtual clock that would jump while a worker thread works (``reapkit replay``).
    plugin_threads: bool = attrs.field(default=True, kw_only=True)
    #: Calls the rules' selectors and actions (deadlines, worker threads, switching off).
    _calls: PluginCalls = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._calls = PluginCalls(inline_context=_collector_paused, threads=self.plugin_threads)
        # Only on the real /proc: a fake tree's files are replaced, not regenerated, so a
        # file kept open would go on reading the old content.
        if self.keep_score_files > 0 and self.procfs.is_real:
            self._kept = KeptScoreFiles(self.procfs, self.keep_score_files)

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            **attrs.asdict(self._counters), plugins_disabled=self._calls.switched_off
        )

    def replace_rules(self, rules: Sequence[Rule]) -> None:
        """Swap in a new policy's rules between two decisions (``reload``)."""
        self.rules = tuple(rules)
        self._calls.keep_only(p for r in self.rules for p in (*r.selectors, *r.actions))
        self._scope_pids.clear()  # the old scopes' kept files close at the next decision
        self._discard_prepared()

    async def handle(self, event: object, nursery: trio.Nursery) -> None:
        """Handle one event; confirmation of kills continues in ``nursery``."""
        self._counters.events += 1
        self._event_serial += 1
        now = trio.current_time()
        self._epoch_offset = time.time() - now
        if isinstance(event, PressureEvent):
            self._last_pressure[event.spec] = event.timestamp
        elif isinstance(event, PressureWatchEnded):
            log.warning("PSI watch ended: %s (%s)", event.spec, event.reason)
            return
        elif isinstance(event, MemoryEvent) and event.state in ("recovered", "gone"):
            if event.state == "gone":
                log.warning("memory watch ended: %s (its cgroup was removed)", event.threshold)
            return
        elif isinstance(event, MemoryEvent) and event.state == "approaching":
            self._approaching(event, now, nursery)
            return
        elif not isinstance(event, MemoryEvent | ManualTrigger):
            return
        for rule in self.rules:
            held = self._conditions_hold(rule, event, now)
            if held is None:
                continue
            # No second victim, from any rule, while one is still dying (bounded per victim
            # by its rule's victim_timeout): its memory may be on its way back.
            self._dying = {pid: t for pid, t in self._dying.items() if t > now}
            if self._dying:
                self._counters.skipped_busy += 1
                return
            if now < self._cooldown_until.get(rule.name, -math.inf):
                self._counters.skipped_cooldown += 1
                continue
            kills = self._kills[rule.name]
            while kills and kills[0] < now - rule.kill_window:
                kills.popleft()
            if len(kills) >= rule.max_kills:
                self._counters.skipped_cap += 1
                log.warning(
                    "rule %s: %d kills within %s s, holding off",
                    rule.name,
                    len(kills),
                    rule.kill_window,
                )
                continue
            if await self._decide(rule, event, held, now, nursery):
                return  # one victim per event

    async def preview(self, rule: Rule) -> tuple[Ranked | None, list[Ranked], list[SelectorStep]]:
        """What ``rule`` would choose right now: (the victim or None, the ranking, the steps).
        Runs candidates, selectors and the guard's check; signals nothing."""
        self._event_serial += 1  # a fresh read: a preview is a moment of its own
        situation = Situation(
            rule.name, ManualTrigger(trio.current_time(), "preview"), self._meminfo(),
            self.procfs, trio.current_time(),
        )  # fmt: skip
        chosen, ranked, steps, _halt = await self._choose(rule, situation)
        return chosen, ranked, steps

    async def _choose(
        self, rule: Rule, situation: Situation
    ) -> tuple[Ranked | None, list[Ranked], list[SelectorStep], str | None]:
        """Candidates → selectors → the first the guard allows; and why the selection failed
        safe, if it did."""
        ranked, steps, halt = await self._select(rule, situation, await self._candidates(rule))
        with _collector_paused():
            chosen, refusals = self._first_allowed(rule, ranked)
        if refusals:
            top = chosen.candidate.pid if chosen else None
            kept = len(ranked) - len(refusals)
            steps.append(SelectorStep("guard", len(ranked), kept, top, "; ".join(refusals[:5])))
        return chosen, ranked, steps, halt

    # -- conditions --------------------------------------------------------------------------

    def _meminfo(self) -> MemInfo:
        """``/proc/meminfo`` as read once for the current event (every rule's conditions and
        its Situation share it; the re-check after choosing reads afresh)."""
        if self._meminfo_read is None or self._meminfo_read[0] != self._event_serial:
            self._meminfo_read = (self._event_serial, self.procfs.meminfo())
        return self._meminfo_read[1]

    def _conditions_hold(self, rule: Rule, event: object, now: float) -> str | None:
        """A sentence naming the conditions that hold, or None if one does not."""
        said = []
        for cond in rule.when:
            if isinstance(cond, PressureCondition):
                if isinstance(event, ManualTrigger):
                    said.append(f"{cond} (manual: {event.reason})")
                    continue
                fired = self._last_pressure.get(cond.spec)
                if fired is None or now - fired > cond.spec.window:
                    return None
                said.append(f"{cond.spec} fired")
            else:
                holds, numbers = cond.holds(self._meminfo())
                if not holds:
                    return None
                said.append(f"{cond} ({numbers})")
        if not rule.when and not isinstance(event, ManualTrigger):
            return None  # a rule without conditions acts only when asked
        return "; ".join(said) or f"manual: {getattr(event, 'reason', '')}"

    def _memory_recovered(self, rule: Rule) -> str | None:
        meminfo = self.procfs.meminfo()
        for cond in rule.when:
            if isinstance(cond, MemoryCondition):
                holds, numbers = cond.holds(meminfo)
                if not holds:
                    return f"{cond} no longer holds ({numbers})"
        return None

    # -- prepared rankings ------------------------------------------------------------------

    def _approaching(self, event: MemoryEvent, now: float, nursery: trio.Nursery) -> None:
        """A line is approaching: prepare the rankings of the rules that watch it, unless
        theirs is young (see :meth:`_due`) — one preparation at a time, none while a victim is
        dying."""
        if self.prepare_ranking <= 0 or self._preparing is not None:
            return
        if any(t > now for t in self._dying.values()):
            return
        rules = [
            rule
            for rule in self.rules
            if any(
                isinstance(c, MemoryCondition) and c.threshold == event.threshold for c in rule.when
            )
            and self._due(rule, now)
        ]
        if rules:
            self._preparing = _Preparation(frozenset(r.name for r in rules))
            nursery.start_soon(self._prepare, rules, event, self._preparing)

    def _due(self, rule: Rule, now: float) -> bool:
        """Whether ``rule``'s ranking should be prepared again now: it has none, or its
        ranking is older than half ``prepare_ranking``, or so old that a preparation taking as
        long as it did would end after it expired (then the next one is ready in time)."""
        prepared = self._prepared.get(rule.name)
        if prepared is None or prepared.rule is not rule:
            return True
        took = prepared.finished - prepared.started
        young = min(self.prepare_ranking / 2, self.prepare_ranking - took)
        return not self._fresh(rule, now, young)

    def _fresh(self, rule: Rule, at: float, age: float) -> bool:
        """Whether ``rule`` has a prepared ranking finished ``age`` or less before ``at``."""
        prepared = self._prepared.get(rule.name)
        return prepared is not None and prepared.rule is rule and at - prepared.finished <= age

    async def _settled(self, rule: Rule) -> None:
        """Wait for the preparation running for ``rule``, if any: it ends sooner than a scan
        begun now would, and the rule's selectors are then called by one task at a time."""
        job = self._preparing
        if job is not None and rule.name in job.rules:
            await job.done.wait()

    async def _prepare(self, rules: list[Rule], event: MemoryEvent, job: _Preparation) -> None:
        """Run each rule's candidates and selector chain now; keep a shortlist of the best
        the guard allows. Cancelled when a decision signals; a failure is logged, not raised:
        the decision then scans afresh."""
        serial = ("prepare", id(job))  # its own scan cache key: never a decision's
        try:
            with job.scope:
                meminfo = self.procfs.meminfo()
                for rule in rules:
                    started = trio.current_time()
                    situation = Situation(rule.name, event, meminfo, self.procfs, started)
                    candidates = await self._candidates(rule, serial)
                    # Inline selectors on their threads: the memory sampler must not wait.
                    ranked, steps, halt = await self._select(
                        rule, situation, candidates, offload=True
                    )
                    if halt is not None:  # the decision runs the chain again, and says why
                        self._prepared.pop(rule.name, None)
                        continue
                    with _collector_paused():
                        shortlist, refusals = self._shortlist(rule, ranked)
                    if refusals:
                        top = shortlist[0].candidate.pid if shortlist else None
                        kept = len(ranked) - len(refusals)
                        why = "; ".join(refusals[:5])
                        steps.append(SelectorStep("guard", len(ranked), kept, top, why))
                    self._prepared[rule.name] = _Prepared(
                        rule, started, trio.current_time(), tuple(shortlist), tuple(steps),
                        len(ranked),
                    )  # fmt: skip
                    self._counters.prepared += 1
                    await trio.lowlevel.checkpoint()
        except Exception:  # an optimisation: never the end of the reaper
            log.warning("preparing a ranking failed; decisions scan afresh", exc_info=True)
        finally:
            job.done.set()
            if self._preparing is job:
                self._preparing = None

    def _shortlist(self, rule: Rule, ranked: list[Ranked]) -> tuple[list[Ranked], list[str]]:
        """The first ``PREPARED_SHORTLIST`` of ``ranked`` the guard allows now, and the
        refusals passed over on the way."""
        shortlist: list[Ranked] = []
        refusals: list[str] = []
        for r in ranked:
            refusal = rule.guard.check(r.candidate.pid, r.candidate.start_time)
            if refusal is not None:
                refusals.append(f"{r.candidate.pid}: {refusal.reason.value}")
                continue
            shortlist.append(r)
            if len(shortlist) == PREPARED_SHORTLIST:
                break
        return shortlist, refusals

    def _discard_prepared(self) -> None:
        """Forget every prepared ranking and stop the preparation running, if any."""
        self._prepared.clear()
        if self._preparing is not None:
            self._preparing.scope.cancel()

    async def _take_prepared(self, rule: Rule, trigger_at: float) -> _Prepared | None:
        """``rule``'s prepared ranking if it was finished at most ``prepare_ranking`` before
        ``trigger_at``, taken (each is used once). Without one, one being prepared for the
        rule is waited for."""
        if self.prepare_ranking <= 0:
            return None
        if not self._fresh(rule, trigger_at, self.prepare_ranking):
            await self._settled(rule)
        prepared = self._prepared.pop(rule.name, None)
        if prepared is None or prepared.rule is not rule:
            return None
        if trigger_at - prepared.finished > self.prepare_ranking:
            self._counters.prepared_unused += 1
            return None
        return prepared

    async def _choose_prepared(
        self, rule: Rule, situation: Situation, prepared: _Prepared, trigger_at: float
    ) -> tuple[Ranked | None, list[SelectorStep], str | None]:
        """The victim from a prepared shortlist, read afresh: each candidate's ``oom_score``
        and ``stat`` again (one that exited, or whose start time differs, is dropped), the
        rule's protective selectors on what is left, then the guard. Returns (the victim or
        None, the steps, why it failed safe or None)."""
        procfs, real = self.procfs, self.procfs.is_real
        with _collector_paused():
            born = _boot_tick() if real else _NEVER  # before the reads, as in a scan
            pids = [r.candidate.pid for r in prepared.shortlist]
            scores = dict(procfs.oom_scores(pids, self._kept))
            fresh: list[Ranked] = []
            dropped: list[str] = []
            for r in prepared.shortlist:
                old = r.candidate
                score = scores.get(old.pid)
                c = None
                if score is not None:
                    c = Candidate.lazy(old.pid, score, procfs, born_from=born)
                if c is None or c.state in DEAD_STATES:
                    dropped.append(f"{old.pid} exited")
                elif c.start_time != old.start_time:
                    dropped.append(f"{old.pid} is another process now")
                else:
                    fresh.append(r._of(c))
        steps = list(prepared.steps)
        began = (trigger_at - prepared.started) * 1000
        took = (prepared.finished - prepared.started) * 1000
        top = fresh[0].candidate.pid if fresh else None
        note = (
            f"ranking of {prepared.ranked} prepared from {began:.0f} ms before the trigger (in"
            f" {took:.0f} ms); its best {len(prepared.shortlist)} read afresh"
        ) + (f": {', '.join(dropped)}" if dropped else "")
        steps.append(SelectorStep("prepared", len(prepared.shortlist), len(fresh), top, note))
        ranked = tuple(fresh)
        for sel in rule.selectors:
            if not sel.protective:
                continue
            before = len(ranked)
            ranked, error = await self._apply(rule, sel, situation, ranked)
            if error is not None:
                why = describe(error)
                steps.append(SelectorStep(sel.name, before, before, None, "", error=why))
                log.error("rule %s: protective selector %s %s; no victim", rule.name, sel.name, why)
                return None, steps, f"failed safe: the protective selector {sel.name} {why}"
            steps.append(_step(sel.name, before, ranked))
        with _collector_paused():
            chosen, refusals = self._first_allowed(rule, list(ranked))
        if refusals:
            top = chosen.candidate.pid if chosen else None
            kept = len(ranked) - len(refusals)
            steps.append(SelectorStep("guard", len(ranked), kept, top, "; ".join(refusals[:5])))
        return chosen, steps, None

    # -- one decision ------------------------------------------------------------------------

    async def _choose_now(
        self, rule: Rule, situation: Situation, trigger_at: float | None
    ) -> tuple[Ranked | None, list[SelectorStep], str | None]:
        """The decision's choice: from the rule's prepared ranking if it has a fresh one and
        something on its shortlist may be chosen, else from a fresh scan."""
        at = situation.now if trigger_at is None else trigger_at
        prepared = await self._take_prepared(rule, at)
        if prepared is None:
            await self._settled(rule)
            chosen, _ranked, steps, halt = await self._choose(rule, situation)
            return chosen, steps, halt
        chosen, steps, halt = await self._choose_prepared(rule, situation, prepared, at)
        if chosen is None and halt is None:  # nothing on the shortlist may be chosen now
            self._counters.prepared_unused += 1
            await self._settled(rule)
            chosen, _ranked, more, halt = await self._choose(rule, situation)
            steps += more
        elif chosen is not None:
            self._counters.prepared_used += 1
        return chosen, steps, halt

    async def _decide(
        self, rule: Rule, event: object, condition: str, now: float, nursery: trio.Nursery
    ) -> bool:
        """One decision for ``rule``; returns whether a signal was sent (or would have been,
        in dry-run)."""
        self._counters.decisions += 1
        # Whatever the outcome, the rule rests now; a kill extends it once the victim is gone.
        self._cooldown_until[rule.name] = now + rule.cooldown
        trigger_seen = getattr(event, "timestamp", now)
        decision = _Decision(
            rule, condition, Situation(rule.name, event, self._meminfo(), self.procfs, now),
            TimelineBuilder(trigger_seen), self._epoch_offset,
        )  # fmt: skip
        chosen, steps, halt = await self._choose_now(rule, decision.situation, trigger_seen)
        decision.steps = tuple(steps)
        if chosen is None:  # none, or the selection failed safe (halt says why)
            await self._no_victim(decision, halt)
            return False
        victim = chosen.candidate
        decision.timeline.mark("victim_chosen")
        decision.victim = decision.situation.victim(victim)
        recovered = self._memory_recovered(rule)
        if recovered is not None:
            await self._abandon(decision, f"memory recovered after choosing: {recovered}")
            return False
        try:
            ref = self._open(victim)
        except (NoSuchProcess, ProcessChanged) as exc:
            await self._abandon(decision, f"the victim is gone: {exc}")
            return False
        context = ActionContext(
            rule.view(), ref, victim, decision.situation, self.reap_stage, decision.timeline,
            [], warn_observers=self.warn_observers,
            protect=functools.partial(self._protected, rule, decision.situation, victim.pid),
        )  # fmt: skip
        context.freeable = self._freeable(ref) if not ref.closed else victim.rss
        failure = await self._act(decision, context, ref, now)
        if decision.timeline.get("signal_sent") is None:
            ref.close()
            await self._unsignalled(decision, context, failure)
            return False
        # A signal went out (a SIGKILL refused after SIGTERM still means the victim is on its
        # way): count it, keep every rule off new victims until it is confirmed gone. What was
        # prepared before it ranked a machine that is changing now.
        self._count_signalled(rule, context, now, dying=True)
        self._discard_prepared()
        nursery.start_soon(self._confirm, decision, context, ref, failure)
        return True

    async def _no_victim(self, decision: _Decision, halt: str | None) -> None:
        """Record a decision that chose nobody: none could be, or the selection failed safe."""
        if halt is None:
            self._counters.no_candidate += 1
            await self.emit(decision.record("no-candidate", "no process in scope could be chosen"))
        else:
            self._counters.fail_safe += 1
            await self.emit(decision.record("failed", halt))

    async def _abandon(self, decision: _Decision, reason: str) -> None:
        self._counters.abandoned += 1
        await self.emit(decision.record("abandoned", reason))

    def _open(self, victim: Candidate) -> ProcessRef:
        """The victim's pidfd, pinned to its identity (raises if it is gone or another)."""
        if self.procfs.is_real:
            return ProcessRef.open(victim.pid, start_time=victim.start_time, procfs=self.procfs)
        # A fake tree: its PIDs are not real processes (and its guard never signals).
        return ProcessRef.unpinned(victim.pid, victim.start_time, self.procfs)

    async def _unsignalled(
        self, decision: _Decision, context: ActionContext, failure: BaseException | None
    ) -> None:
        """Record an action chain that ended before any signal went out."""
        refusal = None
        if isinstance(failure, KillRefused):
            self._counters.refused += 1
            outcome: Outcome = "refused"
            reason = str(failure.refusal)
            refusal = f"{failure.refusal.reason.value}: {failure.refusal.detail}"
        elif failure is None or isinstance(failure, NoSuchProcess):
            self._counters.abandoned += 1
            outcome = "abandoned"
            reason = (
                "the victim exited before it could be signalled"
                if failure
                else "no action sent a signal"
            )
        else:
            outcome, reason = "failed", f"no signal was sent: {failure}"
        await self.emit(decision.record(outcome, reason, actions=context.steps, refusal=refusal))

    def _count_signalled(
        self, rule: Rule, context: ActionContext, now: float, *, dying: bool
    ) -> None:
        if context.dry_run:
            self._counters.dry_runs += 1
            return
        self._counters.kills += 1
        self._kills[rule.name].append(now)
        if dying:
            self._dying[context.pid] = trio.current_time() + rule.victim_timeout

    async def _emit_shielded(self, record: KillRecord) -> None:
        """Emit ``record`` also while the reaper is stopping (shielded, bounded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self.emit(record)

    async def _candidates(self, rule: Rule, serial: object = None) -> list[Ranked]:
        """The processes a rule may choose from: its cgroup's members, or every process
        (the live table, else a /proc scan), its sub-tree picked out by parent PIDs.

        One small read per process: its ``oom_score``. The rest (``stat``) is read lazily,
        only for the candidates the selectors look at (see :class:`Candidate`). A score above
        0 proves a process with memory that is not a kernel thread (the kernel's
        ``oom_badness``); only a score of 0 needs a look at ``stat`` to tell. (A process whose
        leader exited while other threads live on scores above 0 and reads as state ``Z``:
        the guard refuses it if it is chosen.)

        Rules with the same scope share one read per event. The read yields to the loop every
        ``CHECKPOINT_EVERY`` processes: other tasks — the connector, reap results, an
        embedding service — must not wait for a whole scan of 10,000 processes. ``serial``
        keys the sharing (default: the current event's)."""
        scope = rule.guard.scope
        serial = self._event_serial if serial is None else serial
        cached = self._scan_cache.get(scope)
        if cached is not None and cached[0] == serial:
            return cached[1]
        if isinstance(scope, CgroupScope):
            pids: list[int] = list(cgroup_members(scope.directory))
        elif self.table is not None:
            pids = list(self.table.pids())
        else:
            pids = self.procfs.pids()
        procfs, kept, real = self.procfs, self._kept, self.procfs.is_real
        candidates = []
        for start in range(0, len(pids), CHECKPOINT_EVERY):
            if start:
                await trio.lowlevel.checkpoint()
            with _collector_paused():
                # Taken before the chunk's reads: a process whose stat shows a start in this
                # tick or later may have taken the PID after its score was read.
                born = _boot_tick() if real else _NEVER
                for pid, score in procfs.oom_scores(pids[start : start + CHECKPOINT_EVERY], kept):
                    c = Candidate.lazy(pid, score, procfs, born_from=born)
                    if score == 0 and (c.is_kernel_thread or c.state in DEAD_STATES):
                        continue
                    candidates.append(c)
        with _collector_paused():
            if isinstance(scope, SubtreeScope):
                candidates = _descendants(candidates, scope.root_pid)
            ranked = [Ranked(c) for c in candidates]
        self._scan_cache = {scope: (serial, ranked)}
        if kept is not None:
            self._scope_pids[scope] = set(pids)
            kept.retain(set().union(*self._scope_pids.values()))
        return ranked

    async def prepare(self) -> None:
        """Open the ``oom_score`` files to keep (``keep_score_files``) for every rule's scope
        now, so that the first decision reads each with one ``pread``. Processes that start
        later get theirs at the decision that first reads them. The reaper awaits it before
        its first decision."""
        if self._kept is None:
            return
        self._event_serial += 1
        for rule in self.rules:
            await self._candidates(rule)
        self._event_serial += 1  # what was read here is not a decision's snapshot

    def close(self) -> None:
        """Close the ``oom_score`` files kept open (``keep_score_files``)."""
        if self._kept is not None:
            self._kept.close()

    async def _select(
        self, rule: Rule, situation: Situation, candidates: list[Ranked], *, offload: bool = False
    ) -> tuple[list[Ranked], list[SelectorStep], str | None]:
        """Run the selector chain: the ranking, its steps, and why it failed safe (or None).

        Each selector gets a tuple (an immutable view) and its result is checked against that
        very tuple, the engine's own copy. On a failure, fall back from the last good ranking
        — what the filters before the failure dropped stays dropped — ordered by oom_score,
        and still apply the protective selectors after it. A failing protective selector
        fails safe: no victim."""
        steps: list[SelectorStep] = []
        ranked = tuple(candidates)
        fell_back = False
        for sel in rule.selectors:
            if fell_back and not sel.protective:
                continue
            before = len(ranked)
            ranked, error = await self._apply(rule, sel, situation, ranked, offload=offload)
            if error is None:
                steps.append(_step(sel.name, before, ranked, ranks=sel.ranks))
                continue
            why = describe(error)
            steps.append(SelectorStep(sel.name, before, before, None, "", error=why))
            if sel.protective:
                log.error("rule %s: protective selector %s %s; no victim", rule.name, sel.name, why)
                return [], steps, f"failed safe: the protective selector {sel.name} {why}"
            log.warning(
                "rule %s: selector %s %s; falling back to the largest oom_score",
                rule.name, sel.name, why,
            )  # fmt: skip
            ranked = tuple(
                Ranked(r.candidate, r.candidate.oom_score, f"fallback: {_oom(r)}")
                for r in sorted(ranked, key=lambda r: -r.candidate.oom_score)
            )
            steps.append(_step("fallback-oom-score", before, ranked))
            fell_back = True
        return list(ranked), steps, None

    async def _apply(
        self,
        rule: Rule,
        sel: Selector,
        situation: Situation,
        ranked: tuple[Ranked, ...],
        *,
        offload: bool = False,
    ) -> tuple[tuple[Ranked, ...], BaseException | None]:
        """One selector, isolated: its validated ranking, or ``ranked`` and its failure
        (counted). A protective selector is never switched off: it would end the rule's kills.
        ``offload``: an inline selector runs on its worker thread (a preparation)."""
        with isolated() as failed:
            result = await self._calls.call(
                sel, "select", {"situation": situation, "candidates": ranked},
                deadline=rule.plugin_deadline, may_switch_off=not sel.protective,
                offload=offload,
            )  # fmt: skip
            ranked_now = _validated(ranked, result)
        if failed.error is not None:
            self._counters.plugin_failures += 1
            return ranked, failed.error
        return ranked_now, None

    async def _protected(
        self, rule: Rule, situation: Situation, pid: int, candidates: Sequence[Ranked]
    ) -> tuple[Ranked, ...]:
        """:meth:`ActionContext.protected` for the victim ``pid``."""
        ranked = tuple(candidates)
        for sel in rule.selectors:
            if sel.protective:
                ranked, error = await self._apply(rule, sel, situation, ranked)
                if error is not None:
                    why = f"the protective selector {sel.name} {describe(error)}"
                    raise KillRefused(Refusal(pid, RefusalReason.PROTECTED, why))
        return ranked

    def _first_allowed(self, rule: Rule, ranked: list[Ranked]) -> tuple[Ranked | None, list[str]]:
        refusals: list[str] = []
        for r in ranked:
            refusal = rule.guard.check(r.candidate.pid, r.candidate.start_time)
            if refusal is None:
                return r, refusals
            refusals.append(f"{r.candidate.pid}: {refusal.reason.value}")
        return None, refusals

    async def _act(
        self, decision: _Decision, context: ActionContext, ref: ProcessRef, now: float
    ) -> BaseException | None:
        """Run the action chain; the failure that ended it, or None. A chain cut (a failure,
        the reaper stopping) after a signal went out ends in SIGKILL (:func:`_kill_if_cut`);
        a chain that ran to its end is left as its actions made it. Stopped after a signal,
        the victim still gets its record."""
        rule = decision.rule
        try:
            failure = await self._chain(rule, context)
        except BaseException:  # cancelled mid-chain (the reaper stops)
            _kill_if_cut(context, ref, None)
            ref.close()
            if context.timeline.get("signal_sent") is not None:
                self._count_signalled(rule, context, now, dying=False)
                outcome: Outcome = "dry-run" if context.dry_run else "killed"
                reason = "the reaper stopped during the action chain"
                await self._emit_shielded(decision.record(outcome, reason, actions=context.steps))
            raise
        if failure is not None:
            _kill_if_cut(context, ref, failure)
        return failure

    async def _chain(self, rule: Rule, context: ActionContext) -> BaseException | None:
        """The actions in turn; the failure that ended the chain, or None. A failed action that
        does not signal is recorded and the chain goes on."""
        for action in rule.actions:
            at = trio.current_time()
            with isolated() as failed:
                outcome = await self._calls.call(
                    action, "act", {"context": context},
                    deadline=rule.action_deadline, may_switch_off=not action.signals,
                )  # fmt: skip
            exc = failed.error
            if exc is None:
                context.steps.append(ActionStep(action.name, "ok", str(outcome), at))
            elif isinstance(exc, KillRefused):
                context.steps.append(ActionStep(action.name, "refused", str(exc.refusal), at))
                return exc
            elif isinstance(exc, NoSuchProcess):  # it exited (or its PID was reused) meanwhile
                context.steps.append(ActionStep(action.name, "gone", str(exc), at))
                return exc
            else:
                self._counters.plugin_failures += 1
                why = describe(exc)
                log.warning("rule %s: action %s failed: %s", rule.name, action.name, why)
                context.steps.append(ActionStep(action.name, "failed", why, at))
                if action.signals:
                    return exc
        return None

    async def _confirm(
        self,
        decision: _Decision,
        context: ActionContext,
        ref: ProcessRef,
        failure: BaseException | None,
    ) -> None:
        """Wait for the victim's exit (pidfd) and its memory, then emit the record — also when
        the reaper is stopped meanwhile (the record then says so)."""
        rule, victim, timeline = decision.rule, decision.victim, decision.timeline
        assert victim is not None
        held = initial = context.freeable
        reason = "the reaper stopped before the victim was confirmed gone"
        try:
            if context.dry_run:
                reason = "dry-run: nothing was signalled"
            else:
                with trio.move_on_after(rule.victim_timeout):
                    async with trio.open_nursery() as watch:
                        watch.start_soon(_mark_exit, ref, timeline)
                        while timeline.missing("exit_seen", "memory_back"):
                            held = min(held, self._freeable(ref))
                            if held <= initial * MEMORY_BACK_FRACTION:
                                timeline.mark("memory_back")
                            await trio.sleep(0.005)
                        watch.cancel_scope.cancel()
                missing = timeline.missing("memory_back", "exit_seen")
                reason = (
                    f"victim {victim.comm!r} ({victim.pid}) killed"
                    + (f"; not seen within {rule.victim_timeout:g} s: {', '.join(missing)}"
                       if missing else "")
                    + (f"; an action failed: {failure}" if failure else "")
                )  # fmt: skip
        finally:
            ref.close()
            self._dying.pop(victim.pid, None)
            self._cooldown_until[rule.name] = trio.current_time() + rule.cooldown
            outcome: Outcome = "dry-run" if context.dry_run else "killed"
            freed = None if context.dry_run else max(0, initial - held)
            final = decision.record(outcome, reason, actions=context.steps, bytes_freed=freed)
            await self._emit_shielded(final)

    def _freeable(self, ref: ProcessRef) -> int:
        """Anonymous memory + swap the victim still holds (0 once it is gone or reused)."""
        try:
            status = self.procfs.status(ref.pid)
            if self.procfs.stat(ref.pid).start_time != ref.start_time:
                return 0
        except (NoSuchProcess, ReapkitError):
            return 0
        return (status.rss_anon or 0) + (status.vm_swap or 0)


def _oom(r: Ranked) -> str:
    return f"oom_score {r.candidate.oom_score}"


def _step(name: str, before: int, ranked: Sequence[Ranked], *, ranks: bool = True) -> SelectorStep:
    """A step of the chain. The first a pure filter kept is no choice of its own (see
    ``Selector.ranks``): its step names no ``top_pid``."""
    top = ranked[0] if ranked else None
    pid = top.candidate.pid if top is not None and ranks else None
    return SelectorStep(name, before, len(ranked), pid, top.reason if top else "")


def _validated(given: tuple[Ranked, ...], result: object) -> tuple[Ranked, ...]:
    """A selector may drop and reorder what it was ``given`` (the engine's own tuple), never
    invent: each item must be a :class:`Ranked` of a candidate in ``given`` — the same object,
    or an equal one, which is then swapped for the engine's own."""
    if not isinstance(result, Iterable):
        raise TypeError(f"a selector must return Ranked items, not {type(result).__name__}")
    known = {id(r.candidate) for r in given}
    own: dict[Candidate, Candidate] | None = None
    out = []
    for item in result:
        if type(item) is not Ranked:
            raise TypeError(f"a selector must return Ranked items, not {type(item).__name__}")
        candidate = item.candidate
        if id(candidate) not in known:
            if own is None:
                own = {r.candidate: r.candidate for r in given}
            found = own.get(candidate) if type(candidate) is Candidate else None
            if found is None:
                raise ValueError(f"a selector returned process {candidate.pid}, not a candidate")
            out.append(item._of(found))
        else:
            out.append(item)
    return tuple(out)


async def _mark_exit(ref: ProcessRef, timeline: TimelineBuilder) -> None:
    await ref.wait()
    timeline.mark("exit_seen")


def _kill_if_cut(context: ActionContext, ref: ProcessRef, failure: BaseException | None) -> None:
    """The safety net: a chain cut (an error, a deadline, the reaper stopping) after a signal
    went out ends in SIGKILL, through the guard, for a victim that has not exited."""
    if isinstance(failure, KillRefused | NoSuchProcess) or context.killed or context.dry_run:
        return
    if context.timeline.get("signal_sent") is None or ref.has_exited():
        return
    at = trio.current_time()
    try:
        outcome = context.send_signal(signal.SIGKILL).value
        step = ActionStep(_NET, "ok", f"the chain was cut after a signal: SIGKILL {outcome}", at)
    except KillRefused as exc:
        step = ActionStep(_NET, "refused", str(exc.refusal), at)
    except NoSuchProcess as exc:
        step = ActionStep(_NET, "gone", str(exc), at)
    context.steps.append(step)
    log.warning("the action chain was cut after a signal: %s", step.detail)


#: The step of the safety net in a record's actions.
_NET = "sigkill-after-cut"


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a synchronous part of a choice (a chunk of
    the candidate scan, an inline selector, the guard's pass) — never across an await, so
    the rest of the program never runs without it.

    A choice among 10,000 processes allocates some 40,000 objects that live until it ends,
    which sets off collections of the older generations — of every object the program has —
    for nothing: the choice makes no garbage cycles. Measured here, they cost a quarter to a
    third of the choice. Reference counting still frees everything at once; the collector
    is switched back on (if it was on) at the end of the part, also on an error."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _boot_tick() -> int:
    """Now, in the unit of ``start_time``: clock ticks since boot (``CLOCK_BOOTTIME``)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


class _Parented(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def ppid(self) -> int: ...


_P = TypeVar("_P", bound=_Parented)


def _descendants(infos: list[_P], root: int) -> list[_P]:
    """The processes that descend from ``root`` (or are it), from their ppids alone."""
    parent: dict[int, int] = {i.pid: i.ppid for i in infos}
    memo: dict[int, bool] = {}

    def parent_of(pid: int) -> int:
        return parent.get(pid, 0)

    return [info for info in infos if in_subtree(info.pid, root, parent_of, memo)]

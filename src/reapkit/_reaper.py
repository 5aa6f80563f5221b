"""The embedding API: a running reaper in the caller's trio program.

Two doors, trio style: ``async with open_reaper(policy) as reaper:`` owns its nursery;
``reaper = await nursery.start(serve_reaper, policy)`` joins the caller's and calls
``task_status.started(reaper)`` only once every source is armed, the process table is seeded
and the reap threads run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import attrs
import trio

from ._conditions import MemoryCondition, PressureCondition
from ._engine import Engine, EngineStatistics
from ._guard import CgroupScope
from ._plugins import (
    HOOKS,
    AttachingObserver,
    ManualTrigger,
    Observer,
    PluginCalls,
    ServingObserver,
    Trigger,
    describe,
    hook_arguments,
    isolated,
)
from ._policy import Policy
from ._procfs import FILES_SPARE, ProcFS
from ._reap_stage import ReapStage
from ._records import KillRecord, RecordLine
from ._sources._base import SourceStatistics
from ._sources.memory import MemoryThresholdSource
from ._sources.psi import PsiTriggerSource
from ._table import ProcessTable
from ._units import PsiSpec

log = logging.getLogger("reapkit")

#: A memory line is announced as approaching this many times ``prepare_ranking`` ahead.
PREPARE_LEAD = 2
#: Events buffered between the sources and the engine (a slow decision applies backpressure).
EVENT_BUFFER = 64
#: Records buffered per subscriber; one that falls further behind loses the newest (counted).
RECORD_BUFFER = 256
#: Seconds an observer may take for one record or warning.
OBSERVER_DEADLINE = 2.0
#: Records and warnings buffered for the observers; when full, the newest are dropped (counted).
OBSERVER_BUFFER = 256


@attrs.define
class OutputCounters:
    """What a program's own records file and log lost, counted by their writers (those of
    ``reapkit run``) and reported by :meth:`Reaper.statistics`. Pass one as ``output=``."""

    #: Writes to the records file that failed (ENOSPC, EIO, ...); the records are retried.
    records_write_errors: int = 0
    #: Records never written: the retry buffer overflowed (oldest first), or the end came.
    records_lost: int = 0
    #: Records left out by the rate limit (a "suppressed" line counts them in the file).
    records_suppressed: int = 0
    #: Log lines dropped because stderr did not take them (a stalled journal).
    log_lines_dropped: int = 0


@attrs.frozen
class ReaperStatistics:
    """A snapshot of the whole reaper."""

    engine: EngineStatistics
    sources: tuple[SourceStatistics, ...]
    table: Any
    reap: Any
    records: int
    records_dropped: int
    observer_failures: int
    #: Events whose handling raised (logged with the traceback; the reaper went on).
    event_failures: int
    policy: str
    #: Observers switched off for overrunning their deadline again and again.
    observers_disabled: int = 0
    #: Records and warnings the observers never got: they fell ``OBSERVER_BUFFER`` behind.
    observer_items_dropped: int = 0
    #: From the ``output`` counters (zero without them): see :class:`OutputCounters`.
    records_write_errors: int = 0
    records_lost: int = 0
    records_suppressed: int = 0
    log_lines_dropped: int = 0


@attrs.define(eq=False)
class Reaper:
    """A running reaper. Get one from :func:`open_reaper` or :func:`serve_reaper`."""

    _policy: Policy
    _engine: Engine
    _events: trio.MemorySendChannel[object]
    _sources: list[Any] = attrs.field(factory=list)
    _table: Any = None
    _reap_stage: ReapStage | None = None
    _subscribers: list[trio.MemorySendChannel[KillRecord]] = attrs.field(factory=list)
    _records: int = 0
    _dropped: int = 0
    _observer_failures: int = 0
    _event_failures: int = 0
    _restart_sources: trio.Event = attrs.field(factory=trio.Event)
    #: Observers of the policy the reaper started with (not reloaded).
    _observers: tuple[Observer, ...] = attrs.field(default=())
    #: Calls the observers (deadlines, worker threads, switching off).
    _observer_calls: PluginCalls = attrs.field(factory=PluginCalls)
    #: What the observers' task delivers: (method, record or warning), in order.
    _to_observers: trio.MemorySendChannel[tuple[str, object]] | None = None
    _observer_items_dropped: int = 0
    _output: OutputCounters = attrs.field(factory=OutputCounters)

    @property
    def policy(self) -> Policy:
        return self._policy

    def records(self) -> trio.MemoryReceiveChannel[KillRecord]:
        """A channel of every KillRecord from this call on. Close it when done::

        async with reaper.records() as records:
            async for record in records: ...

        Called right after ``await reaper.trigger(...)``, it still gets that decision's record.
        For every record from the first decision on, pass a channel as ``serve_reaper(...,
        records=[send])`` instead: this one is subscribed once the reaper already runs.
        """
        send, receive = trio.open_memory_channel[KillRecord](RECORD_BUFFER)
        self._subscribers.append(send)
        return receive

    def statistics(self) -> ReaperStatistics:
        return ReaperStatistics(
            engine=self._engine.statistics(),
            sources=tuple(s.statistics() for s in self._sources if hasattr(s, "statistics")),
            table=self._table.statistics() if self._table is not None else None,
            reap=self._reap_stage.statistics() if self._reap_stage is not None else None,
            records=self._records,
            records_dropped=self._dropped,
            observer_failures=self._observer_failures,
            event_failures=self._event_failures,
            policy=self._policy.source,
            observers_disabled=self._observer_calls.switched_off,
            observer_items_dropped=self._observer_items_dropped,
            **attrs.asdict(self._output),
        )

    async def trigger(self, reason: str) -> None:
        """Evaluate every rule now, as if pressure were present; memory conditions are still
        checked. For services that know they are in trouble before the kernel does."""
        await self._events.send(ManualTrigger(trio.current_time(), reason))

    async def reload(self, policy: Policy) -> None:
        """Switch to ``policy`` between two decisions: its rules, and its sources (which
        replace the old ones). Observers and the reap stage stay those the reaper started
        with: restart it to change them."""
        if [o.name for o in policy.observers] != [o.name for o in self._observers]:
            log.warning("reload: observers are not reloaded; restart to change them")
        if policy.keep_score_files != self._engine.keep_score_files:
            log.warning("reload: reaper.keep_score_files is not reloaded; restart to change it")
        self._policy = policy
        self._engine.replace_rules(policy.rules)
        self._engine.prepare_ranking = policy.prepare_ranking
        self._restart_sources.set()
        await trio.lowlevel.checkpoint()

    async def _emit(self, record: KillRecord) -> None:
        """Hand ``record`` to every subscriber and queue it for the observers; never waits
        (no checkpoint either: a cancelled caller still gets it out)."""
        self._records += 1
        log.debug("kill record: %s", RecordLine(record), extra={"kill_record": record})
        for send in list(self._subscribers):
            try:
                send.send_nowait(record)
            except trio.WouldBlock:
                self._dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(send)
        self._queue_for_observers("on_record", record)

    async def _warn(self, warning: object) -> None:
        """Queue a warning for the observers, behind the records before it; never waits."""
        self._queue_for_observers("on_warning", warning)

    def _queue_for_observers(self, method: str, item: object) -> None:
        if self._to_observers is None or not self._observers:
            return
        try:
            self._to_observers.send_nowait((method, item))
        except trio.WouldBlock:
            self._observer_items_dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reaper is stopping: its observers' task has ended

    async def _serve_observers(
        self, receive: trio.MemoryReceiveChannel[tuple[str, object]]
    ) -> None:
        """The observers' task: each item to every observer still on, one call at a time."""
        async with receive:
            async for method, item in receive:
                for observer in self._observers:
                    if self._observer_calls.is_on(observer):
                        await self._call_observer(observer, method, item, OBSERVER_DEADLINE)

    async def _call_observer(
        self, observer: Observer, method: str, arg: object, deadline: float
    ) -> None:
        """``observer.<method>(arg)`` under ``deadline``, sync code on a worker thread of its
        own; whatever it raises, or an overrun, is logged and counted."""
        [name] = HOOKS["observer"][method]  # the hook's one argument, passed by name
        with isolated() as failed:
            await self._observer_calls.call(observer, method, {name: arg}, deadline=deadline)
        if failed.error is not None:
            self._observer_failures += 1
            log.warning("observer %s.%s failed: %s", observer.name, method, describe(failed.error))


def _sources_for(policy: Policy, procfs: ProcFS) -> list[Any]:
    specs: dict[PsiSpec, None] = {}
    thresholds = []
    for rule in policy.rules:
        for cond in rule.when:
            if isinstance(cond, PressureCondition):
                specs[cond.spec] = None
            elif isinstance(cond, MemoryCondition) and cond.threshold not in thresholds:
                thresholds.append(cond.threshold)
    sources: list[Any] = [PsiTriggerSource(spec) for spec in specs]
    sources.extend(policy.triggers)
    if thresholds:
        # A line that approaches prepares rankings (Engine.prepare_ranking). Announced twice
        # that time ahead: a preparation that takes up to that time (10,000 processes beside
        # a CPU load) still ends before the crossing, and is not too old at it.
        lead = PREPARE_LEAD * policy.prepare_ranking
        sources.append(MemoryThresholdSource(thresholds, procfs=procfs, lead=lead))
    return sources


async def serve_reaper(
    policy: Policy,
    *,
    procfs: ProcFS | None = None,
    live_table: bool = True,
    stop_timeout: float = 5.0,
    records: Iterable[trio.MemorySendChannel[KillRecord]] = (),
    output: OutputCounters | None = None,
    task_status: trio.TaskStatus[Reaper] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a reaper until cancelled; ``task_status.started(reaper)`` once it is fully up.

    ``live_table=False`` skips the proc-connector process table (candidates then come from a
    ``/proc`` scan per decision, or from the rule's cgroup). ``stop_timeout`` bounds how long
    cancellation waits for the reap threads. ``records``: channels subscribed before the
    first event is handled, like :meth:`Reaper.records`; the reaper closes them when it has
    stopped. ``output``: counters of the caller's own records file and log, for
    :meth:`Reaper.statistics`.
    """
    procfs = procfs or ProcFS()
    send, receive = trio.open_memory_channel[object](EVENT_BUFFER)
    subscribers = list(records)
    async with trio.open_nursery() as outer:
        feed = _ObserverFeed(outer)
        try:
            await _serve(
                policy, procfs, live_table, stop_timeout, send, receive, subscribers, output,
                feed, task_status,
            )  # fmt: skip
        finally:
            # After every task ended, so records emitted while stopping still reach them;
            # iterating records() then ends with the reaper.
            for subscriber in subscribers:
                subscriber.close()
            feed.close()


@attrs.define(eq=False)
class _ObserverFeed:
    """The observers' own task and its bounded channel. Shielded, it outlives the reaper's
    other tasks, then delivers what they queued while stopping for ``OBSERVER_DEADLINE``."""

    nursery: trio.Nursery
    send: trio.MemorySendChannel[tuple[str, object]] = attrs.field(init=False)
    receive: trio.MemoryReceiveChannel[tuple[str, object]] = attrs.field(init=False)
    scope: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))

    def __attrs_post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[tuple[str, object]](OBSERVER_BUFFER)

    def start(self, reaper: Reaper) -> None:
        reaper._to_observers = self.send
        self.nursery.start_soon(self._run, reaper)

    async def _run(self, reaper: Reaper) -> None:
        with self.scope:
            await reaper._serve_observers(self.receive)

    def close(self) -> None:
        self.send.close()
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + OBSERVER_DEADLINE)


async def _serve(  # noqa: PLR0917 - serve_reaper's body, split off for its finally
    policy: Policy,
    procfs: ProcFS,
    live_table: bool,
    stop_timeout: float,
    send: trio.MemorySendChannel[object],
    receive: trio.MemoryReceiveChannel[object],
    subscribers: list[trio.MemorySendChannel[KillRecord]],
    output: OutputCounters | None,
    feed: _ObserverFeed,
    task_status: trio.TaskStatus[Reaper],
) -> None:
    async with send, receive, trio.open_nursery() as nursery:
        table = None
        if live_table and any(not isinstance(r.guard.scope, CgroupScope) for r in policy.rules):
            table = await nursery.start(ProcessTable(procfs=procfs).serve)
        reap_stage = None
        if policy.needs_reap_stage:
            stage = ReapStage(policy.reap, shutdown_timeout=stop_timeout)
            reap_stage = await nursery.start(stage.serve)
        raised_from = _files_for(policy.keep_score_files)
        engine = Engine(
            policy.rules, emit=_noop_emit, procfs=procfs, table=table, reap_stage=reap_stage,
            keep_score_files=policy.keep_score_files, prepare_ranking=policy.prepare_ranking,
        )  # fmt: skip
        try:  # from here on the engine may hold kept files: close them however this ends
            reaper = Reaper(
                policy, engine, send.clone(), table=table, reap_stage=reap_stage,
                subscribers=subscribers, observers=policy.observers,
                output=output or OutputCounters(),
            )  # fmt: skip
            engine.emit = reaper._emit
            engine.warn_observers = reaper._warn
            feed.start(reaper)
            try:  # before the first decision, not beside it
                await engine.prepare()
            except Exception as exc:  # kept files are an optimisation: never fatal
                log.warning("could not open the oom_score files to keep: %r", exc)
            for observer in policy.observers:
                if isinstance(observer, AttachingObserver):
                    await reaper._call_observer(observer, "attach", reaper, TRIGGER_START_DEADLINE)
                if isinstance(observer, ServingObserver):
                    await _start_isolated(nursery, observer)
            await nursery.start(_run_sources, reaper, procfs, send.clone())
            nursery.start_soon(_decide, reaper, engine, receive.clone(), nursery)
            task_status.started(reaper)
            await trio.sleep_forever()
        finally:
            engine.close()
            if raised_from is not None:  # the embedding program gets its own limit back
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised_from, hard))


def _files_for(kept: int) -> int | None:
    """Raise the soft open-file limit (up to the hard one, which the policy was checked
    against) to hold ``kept`` files beside those open now and the spare; return the soft
    limit it replaced, if it did."""
    if not kept:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = kept + FILES_SPARE + len(os.listdir("/proc/self/fd"))
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return soft


async def _noop_emit(record: KillRecord) -> None:  # pragma: no cover - replaced at once
    del record


async def _run_sources(
    reaper: Reaper,
    procfs: ProcFS,
    send: trio.MemorySendChannel[object],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the current policy's sources; restart them when a reload asks."""
    async with send:
        first = True
        while True:
            reaper._restart_sources = trio.Event()
            sources = _sources_for(reaper.policy, procfs)
            async with trio.open_nursery() as nursery:
                for source in sources:
                    if isinstance(source, Trigger):
                        await _start_isolated(nursery, source, send.clone())
                    else:
                        await nursery.start(source.run, send.clone())
                reaper._sources = sources
                if first:
                    task_status.started()
                    first = False
                await reaper._restart_sources.wait()
                nursery.cancel_scope.cancel()


#: Seconds a trigger or observer plugin may take to call ``task_status.started()``.
TRIGGER_START_DEADLINE = 10.0


async def _start_isolated(
    nursery: trio.Nursery,
    plugin: Trigger | Observer,
    send: trio.MemorySendChannel[object] | None = None,
) -> None:
    """Run a trigger plugin's ``run(send)`` or an observer's ``serve()`` so that its failure
    (raising, never starting) is logged and the reaper goes on without it."""

    async def guarded(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        with isolated() as failed:  # TooSlowError, or whatever the plugin raised (SystemExit)
            async with trio.open_nursery() as inner:
                with trio.fail_after(TRIGGER_START_DEADLINE):  # only the start is bounded
                    if isinstance(plugin, Trigger):
                        run: Callable[..., Awaitable[None]] = plugin.run
                        arguments = hook_arguments(type(plugin), "run", {"send": send})
                        await inner.start(functools.partial(run, **arguments))
                    elif isinstance(plugin, ServingObserver):
                        await inner.start(plugin.serve)
                started = True
                task_status.started()
        if failed.error is not None:
            why = describe(failed.error)
            log.warning("%s plugin %s failed and was dropped: %s", plugin.kind, plugin.name, why)
            if not started:
                task_status.started()

    await nursery.start(guarded)


async def _decide(
    reaper: Reaper,
    engine: Engine,
    receive: trio.MemoryReceiveChannel[object],
    nursery: trio.Nursery,
) -> None:
    async with receive:
        async for event in receive:
            if isinstance(event, ManualTrigger):
                # `await reaper.trigger()` returns in the turn its event is taken; deciding a
                # turn later lets `records()`, called right after it, get the decision's record.
                await trio.lowlevel.checkpoint()
            with isolated() as failed:  # one bad event (a bug, a plugin) must not end the reaper
                await engine.handle(event, nursery)
            if failed.error is not None:
                reaper._event_failures += 1
                log.error("handling %r failed; the reaper goes on", event, exc_info=failed.error)


@contextlib.asynccontextmanager
async def open_reaper(policy: Policy, **kwargs: Any) -> AsyncIterator[Reaper]:
    """``async with open_reaper(policy) as reaper:`` — a reaper in its own nursery, stopped
    (every fd closed, every thread joined) when the block ends. An exception raised in the
    block comes out as itself, not wrapped in an exception group."""
    from_body: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            reaper: Reaper = await nursery.start(functools.partial(serve_reaper, policy, **kwargs))
            try:
                yield reaper
            except BaseException as exc:
                from_body = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # split() tests the leaves (subgroup() would test the group itself first).
        if from_body is not None and group.split(lambda e: e is from_body)[1] is None:
            raise from_body from None
        raise

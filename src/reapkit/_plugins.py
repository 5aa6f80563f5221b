"""The plugin API: Trigger, Selector, Action and Observer; registration and discovery.

A plugin is a class with a ``name``, a ``kind`` (from its base class) and an ``Options`` attrs
class. It is registered in code (:func:`register`) or through the ``reapkit.plugins`` entry
point group, and validated when it registers and again when a policy builds its options —
never first at the moment of a kill. Selectors may also be plain functions of
``(situation, candidates)`` (:func:`selector`). Sync or async, every plugin call runs under a
deadline through :class:`PluginCalls`, isolated by :func:`isolated`: whatever it raises
(``SystemExit`` too), except trio's cancellation and ``KeyboardInterrupt``, is logged and
counted by the caller, and the reaper goes on.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import logging
import re
import signal
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Literal,
    NamedTuple,
    Protocol,
    TypeVar,
    runtime_checkable,
)

import attrs
import trio

from ._errors import NoSuchProcess, ReapkitError
from ._guard import KillGuard, SignalOutcome
from ._process import ProcessRef
from ._procfs import PF_KTHREAD, MemInfo, ProcessInfo, ProcFS, ProcStatus
from ._records import ActionStep, KillRecord, KillWarning, Timeline, Victim
from ._sources.pidfd import wait_exit

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from ._reap_stage import ReapResult, ReapStage

log = logging.getLogger("reapkit.plugins")

Kind = Literal["trigger", "selector", "action", "observer"]
ENTRY_POINT_GROUP = "reapkit.plugins"
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_T = TypeVar("_T")
_D = TypeVar("_D")


class PluginError(ReapkitError, ValueError):
    """A plugin or its options are invalid; the message names the plugin (and option)."""

    def __init__(self, plugin: str, message: str, option: str | None = None) -> None:
        self.plugin = plugin
        #: The option at fault, where known.
        self.option = option
        self.detail = message
        super().__init__(f"plugin {plugin!r}: {message}")


# -- what selectors see ------------------------------------------------------------------------


class Candidate:
    """A process that may be chosen.

    ``pid`` and ``oom_score`` are read for every process in scope (one small read each). The
    fields of ``/proc/<pid>/stat`` — ``start_time``, ``comm``, ``ppid``, ``state``, ``rss`` —
    are read together on first use of any of them, so a decision reads ``stat`` only for the
    candidates its selectors look at (earlyoom reads lazily the same way). Once read, nothing
    changes: a candidate is a snapshot, read-only, hashable and compared by value.

    A process that exited before its ``stat`` was read reads as gone: ``state == "X"``,
    ``rss == 0``, ``start_time == -1``; the kill guard never lets it be chosen. So does one
    whose ``stat`` shows a start in or after the clock tick in which its score was read: its
    PID may have been taken by a newcomer after the score was read, and the score is not the
    newcomer's (a process younger than one tick, 10 ms, is not chosen in that decision).
    Built with all its fields (as tests and :meth:`from_info` do), a candidate reads nothing.

    Not an attrs class (it reads lazily): ``attrs.evolve`` and ``attrs.asdict`` do not apply.
    """

    __slots__ = ("_born_from", "_oom_score", "_pid", "_procfs", "_stat")
    __match_args__ = ("pid", "start_time", "comm", "ppid", "state", "rss", "oom_score")

    _pid: int
    _oom_score: int
    _stat: _StatFields | None
    _procfs: ProcFS | None
    _born_from: int

    def __init__(  # noqa: PLR0917 - the record's fields, positional as attrs made them
        self, pid: int, start_time: int, comm: str, ppid: int, state: str, rss: int, oom_score: int
    ) -> None:
        self._pid = pid
        self._oom_score = oom_score
        self._stat = _StatFields(start_time, comm, ppid, state, rss, 0)
        self._procfs = None
        self._born_from = 0

    @classmethod
    def from_info(cls, info: ProcessInfo) -> Candidate:
        return cls(
            info.pid, info.start_time, info.comm, info.ppid, info.state, info.rss, info.oom_score
        )

    @classmethod
    def lazy(cls, pid: int, oom_score: int, procfs: ProcFS, *, born_from: int) -> Candidate:
        """A candidate whose ``stat`` fields are read from ``procfs`` on first use.

        ``born_from`` is a clock tick (``CLOCK_BOOTTIME`` times ``SC_CLK_TCK``, the unit of
        ``start_time``) taken before ``oom_score`` was read. A ``stat`` showing a start at
        or after it may belong to a process that took the PID after the score was read: it
        reads as gone. (A start before it proves the process existed when its score was
        read, so the score is its own.)"""
        self = cls.__new__(cls)
        self._pid = pid
        self._oom_score = oom_score
        self._stat = None
        self._procfs = procfs
        self._born_from = born_from
        return self

    def _fields(self) -> _StatFields:
        fields = self._stat
        if fields is None:
            assert self._procfs is not None
            try:
                fields = _StatFields(*self._procfs.selection_stat(self._pid))
            except (NoSuchProcess, ReapkitError):
                fields = _GONE
            if fields.start_time >= self._born_from:
                fields = _GONE  # maybe a newcomer on the PID, not the process scored
            if self._stat is None:  # a selector on a thread may have read it meanwhile
                self._stat = fields
            fields = self._stat
        return fields

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def oom_score(self) -> int:
        """``/proc/<pid>/oom_score``: the kernel's badness, 0 to 2000."""
        return self._oom_score

    @property
    def start_time(self) -> int:
        """Clock ticks since boot: with the pid, the process's identity."""
        return self._fields().start_time

    @property
    def comm(self) -> str:
        return self._fields().comm

    @property
    def ppid(self) -> int:
        return self._fields().ppid

    @property
    def state(self) -> str:
        return self._fields().state

    @property
    def rss(self) -> int:
        """Resident memory in bytes."""
        return self._fields().rss

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self._fields().flags & PF_KTHREAD)

    def _key(self) -> tuple[int, int, int, str, int, str, int]:
        f = self._fields()
        return (self._pid, f.start_time, self._oom_score, f.comm, f.ppid, f.state, f.rss)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Candidate)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        f = self._fields()
        return (
            f"Candidate(pid={self._pid}, start_time={f.start_time}, comm={f.comm!r},"
            f" ppid={f.ppid}, state={f.state!r}, rss={f.rss}, oom_score={self._oom_score})"
        )


class _StatFields(NamedTuple):
    start_time: int
    comm: str
    ppid: int
    state: str
    rss: int
    flags: int


_GONE = _StatFields(-1, "", 0, "X", 0, 0)


class Ranked:
    """A candidate with the score and reason the last selector gave it (higher: kill first).

    Read-only, hashable, compared by value. A selector that ranks thousands of candidates
    may give the reason as a function (:meth:`explained`): it is then written only for the
    few entries anyone reads (the victim, the top of ``reapkit check``). A reason function
    that raises gives a reason saying so, logged; it never fails a decision. Not an attrs
    class: ``attrs.evolve`` does not apply, and a ``Ranked`` with a reason function does not
    pickle."""

    __slots__ = ("_candidate", "_reason", "_score", "_why", "_why_arg")
    __match_args__ = ("candidate", "score", "reason")

    _candidate: Candidate
    _score: float
    _reason: str | None
    _why: Callable[[Ranked, int], str] | None
    _why_arg: int

    def __init__(self, candidate: Candidate, score: float = 0.0, reason: str = "") -> None:
        self._candidate = candidate
        self._score = score
        self._reason = reason
        self._why = None
        self._why_arg = 0

    @classmethod
    def explained(
        cls, candidate: Candidate, score: float, why: Callable[[Ranked, int], str], arg: int = 0
    ) -> Ranked:
        """A ranked candidate whose reason is ``why(it, arg)``, written on first use (for
        instance ``arg``: its place in the ranking, ``why``: one function for all places)."""
        self = cls.__new__(cls)
        self._candidate = candidate
        self._score = score
        self._reason = None
        self._why = why
        self._why_arg = arg
        return self

    @property
    def candidate(self) -> Candidate:
        return self._candidate

    @property
    def score(self) -> float:
        return self._score

    @property
    def reason(self) -> str:
        """One line: why this score (and place)."""
        reason = self._reason
        if reason is None:
            assert self._why is not None
            with isolated() as failed:  # a plugin's reason must not break a decision
                reason = str(self._why(self, self._why_arg))
            if failed.error is not None:
                log.warning("a selector's reason failed: %s", describe(failed.error))
                reason = f"(its reason failed: {describe(failed.error)})"
            self._reason = reason
        return reason

    def _of(self, candidate: Candidate) -> Ranked:
        """This ranking for an equal ``candidate``; a reason not written yet stays unwritten."""
        copy = Ranked.__new__(Ranked)
        copy._candidate, copy._score, copy._reason = candidate, self._score, self._reason
        copy._why, copy._why_arg = self._why, self._why_arg
        return copy

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Ranked)
        return (self._candidate, self._score, self.reason) == (
            other._candidate,
            other._score,
            other.reason,
        )

    def __hash__(self) -> int:
        return hash((self._candidate, self._score, self.reason))

    def __repr__(self) -> str:
        return (
            f"Ranked(candidate={self._candidate!r}, score={self._score!r}, reason={self.reason!r})"
        )


@attrs.define
class Situation:
    """What a selector may know when choosing: the trigger, memory, and lazy reads.

    Reads beyond the candidate's two (``cmdline``, ``cgroup``, ``oom_score_adj``, ``uid``,
    ``swap``) happen only when a selector asks, once per decision (earlyoom reads lazily the
    same way). A process that vanished meanwhile reads as ``None`` / empty.
    """

    rule: str
    trigger: object
    meminfo: MemInfo
    procfs: ProcFS
    now: float
    _cache: dict[tuple[int, str], object] = attrs.field(factory=dict, init=False)

    def _cached(self, pid: int, what: str, read: Callable[[int], _T], default: _D) -> _T | _D:
        key = (pid, what)
        if key not in self._cache:
            try:
                self._cache[key] = read(pid)
            except (NoSuchProcess, ReapkitError, OSError):
                self._cache[key] = default
        return self._cache[key]  # type: ignore[return-value] # what `read` gave for `what`

    def cmdline(self, c: Candidate) -> str:
        return " ".join(self._cached(c.pid, "cmdline", self.procfs.cmdline, ()))

    def exe(self, c: Candidate) -> str:
        """The executable's path, only if it is verified (:meth:`ProcFS.exe`)."""
        value: str = self._cached(c.pid, "exe", self.procfs.exe, "")
        return value

    def cgroup(self, c: Candidate) -> str:
        """The cgroup path that memory is accounted to: the v1 memory hierarchy's where there
        is one, else the v2 path."""
        entries = self._cached(c.pid, "cgroup", self.procfs.cgroup, ())
        for entry in entries:
            if "memory" in entry.controllers:
                return str(entry.path)
        for entry in entries:
            if entry.hierarchy_id == 0:
                return str(entry.path)
        return ""

    def oom_score_adj(self, c: Candidate) -> int | None:
        return self._cached(c.pid, "oom_score_adj", self.procfs.oom_score_adj, None)

    def _status(self, c: Candidate) -> ProcStatus | None:
        return self._cached(c.pid, "status", self.procfs.status, None)

    def uid(self, c: Candidate) -> int | None:
        status = self._status(c)
        return None if status is None else int(status.uids[0])

    def swap(self, c: Candidate) -> int | None:
        status = self._cache.get((c.pid, "status"))
        if isinstance(status, ProcStatus):  # read already (uid): no second read
            return int(status.vm_swap) if status.vm_swap is not None else None
        return self._cached(c.pid, "swap", self.procfs.vm_swap, None)

    def victim(self, c: Candidate) -> Victim:
        return Victim(
            pid=c.pid,
            start_time=c.start_time,
            comm=c.comm,
            cmdline=self.cmdline(c)[:256],
            cgroup=self.cgroup(c),
            uid=self.uid(c),
            rss=c.rss,
            swap=self.swap(c),
            oom_score=c.oom_score,
            oom_score_adj=self.oom_score_adj(c),
        )


# -- what actions see ---------------------------------------------------------------------------

#: The steps of a :class:`reapkit.Timeline`.
TimelineStep = Literal[
    "trigger_seen",
    "victim_chosen",
    "signal_sent",
    "reap_started",
    "reap_finished",
    "memory_back",
    "exit_seen",
]


class TimelineBuilder:
    """A decision's timeline in the making: :meth:`mark` each step as it happens (the first
    mark holds); :meth:`build` is the frozen :class:`reapkit.Timeline` for its record."""

    __slots__ = ("_timeline",)

    def __init__(self, trigger_seen: float) -> None:
        self._timeline = Timeline(trigger_seen)

    def get(self, step: TimelineStep) -> float | None:
        """When ``step`` happened, or None."""
        at: float | None = getattr(self._timeline, step)
        return at

    def mark(self, step: TimelineStep, at: float | None = None) -> None:
        """``step`` happened ``at`` (default: now, on the trio clock) — unless it was marked."""
        if self.get(step) is None:
            self.set(step, trio.current_time() if at is None else at)

    def set(self, step: TimelineStep, at: float) -> None:
        """``step`` happened ``at`` (a time measured elsewhere, such as a reaper thread's)."""
        self._timeline = attrs.evolve(self._timeline, **{step: at})

    def missing(self, *steps: TimelineStep) -> list[TimelineStep]:
        """Those of ``steps`` not marked yet."""
        return [step for step in steps if self.get(step) is None]

    def build(self) -> Timeline:
        return self._timeline


@attrs.frozen
class RuleView:
    """What an action knows of its rule: its name, deadlines and guard. (The rule itself, with
    its conditions and plugins, belongs to the engine.)"""

    name: str
    guard: KillGuard
    cooldown: float
    victim_timeout: float
    plugin_deadline: float
    action_deadline: float
    #: The rule has protective selectors (``protect``, ``scope``): an action that kills more
    #: than the victim asks :meth:`ActionContext.protected` about the others.
    protects: bool = False

    @property
    def dry_run(self) -> bool:
        """Signals are only pretended (the guard holds them)."""
        return not self.guard.signals_enabled


#: What the engine's pass of a rule's protective selectors looks like to an action.
Protect = Callable[[Sequence[Ranked]], Awaitable[tuple[Ranked, ...]]]


@attrs.define
class ActionContext:
    """What an action gets: the chosen victim, its rule, the guard, and the record in the
    making.

    The victim's pidfd stays inside: an action signals only through :meth:`send_signal`
    (the guard decides, dry-run holds), waits with :meth:`wait_exit` and reaps with
    :meth:`reap`."""

    rule: RuleView
    _ref: ProcessRef
    candidate: Candidate
    situation: Situation
    _reap_stage: ReapStage | None
    timeline: TimelineBuilder
    steps: list[ActionStep]
    #: True once SIGKILL was sent (or would have been, in dry-run).
    killed: bool = False
    dry_run: bool = False
    #: Hands a warning to every observer (the ``warn`` action); None without observers.
    warn_observers: Callable[[KillWarning], Awaitable[None]] | None = None
    #: Anonymous memory + swap the victim held before any action (what its end frees).
    freeable: int = 0
    #: The engine's pass of the rule's protective selectors (see :meth:`protected`).
    _protect: Protect | None = None

    @property
    def guard(self) -> KillGuard:
        return self.rule.guard

    @property
    def pid(self) -> int:
        return self._ref.pid

    @property
    def start_time(self) -> int:
        return self._ref.start_time

    @property
    def can_reap(self) -> bool:
        return self._reap_stage is not None

    @property
    def notify(self) -> Callable[[KillWarning], Awaitable[None]] | None:
        """The old name of :attr:`warn_observers`."""
        return self.warn_observers

    def mark(self, step: TimelineStep) -> None:
        """Record the time of a timeline step (first time only)."""
        self.timeline.mark(step)

    def send_signal(self, sig: int) -> SignalOutcome:
        """Signal the victim through the guard and mark the timeline."""
        outcome = self.guard.send_signal(self._ref, sig)
        self.mark("signal_sent")
        if outcome is SignalOutcome.DRY_RUN:
            self.dry_run = True
        if sig == signal.SIGKILL:
            self.killed = True
        return outcome

    # A timeout argument (ASYNC109): "did it exit in time" is the answer, not an error.
    async def wait_exit(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to ``timeout`` s for the victim to exit (its pidfd); marks ``exit_seen``."""
        if await wait_exit(self._ref, timeout=timeout):
            self.mark("exit_seen")
            return True
        return False

    async def protected(self, candidates: Sequence[Ranked]) -> tuple[Ranked, ...]:
        """What the rule's protective selectors (``protect``, ``scope``, third-party ones)
        keep of ``candidates``, each called as in the decision (deadline, worker thread). One
        that fails raises :class:`KillRefused`: a protection that cannot answer spares all."""
        if self._protect is None:
            raise RuntimeError("this context has no engine to call the selectors")
        return await self._protect(candidates)

    async def reap(self) -> ReapResult | None:
        """``process_mrelease`` on a reaper thread: the ReapResult, or None when every
        reaper thread is busy (the victim then frees its memory itself)."""
        if self._reap_stage is None:
            raise RuntimeError("this reaper has no reap stage")
        result = await self._reap_stage.reap_or_skip(self._ref)
        if result is not None:  # the thread's own times, already on the trio clock
            self.timeline.set("reap_started", result.started)
            self.timeline.set("reap_finished", result.finished)
        return result


# -- what triggers send and observers may offer ---------------------------------------------------


@attrs.frozen
class ManualTrigger:
    """``await reaper.trigger(reason)``, or a trigger plugin's event: evaluate the rules now;
    pressure counts as present."""

    timestamp: float
    reason: str


class RunningReaper(Protocol):
    """What an observer's ``attach`` gets: the running :class:`reapkit.Reaper` (the part of it
    a plugin may rely on)."""

    def statistics(self) -> object: ...

    async def trigger(self, reason: str) -> None: ...


@runtime_checkable
class ServingObserver(Protocol):
    """An observer that must run for as long as the reaper does (an HTTP server for metrics,
    a bus connection): the reaper starts ``serve`` in its nursery before it reports itself
    started (``task_status.started()`` once it serves), and cancels it last. One that fails
    to start is logged and dropped: a metrics port in use must not leave a machine without its
    OOM reaper."""

    async def serve(self, *, task_status: trio.TaskStatus[object]) -> None: ...


@runtime_checkable
class AttachingObserver(Protocol):
    """An observer that wants the running reaper (for ``statistics()``): ``attach`` is called
    once, before ``serve``."""

    def attach(self, reaper: RunningReaper) -> Awaitable[None] | None: ...


# -- plugin bases --------------------------------------------------------------------------------


@attrs.frozen
class NoOptions:
    """For plugins without options."""


class Plugin:
    """The base of every plugin class. Subclass one of the four kinds below."""

    kind: ClassVar[Kind]
    #: Registry name: lowercase letters, digits, ``-`` and ``_``.
    name: ClassVar[str]
    #: An attrs class; a policy's table for this plugin becomes an instance of it.
    Options: ClassVar[type[Any]] = NoOptions
    #: Trusted, fast and non-blocking (built-ins and first-party plugins only): a sync call
    #: runs on the trio thread, to its end, not on a worker thread; no deadline can stop it.
    inline: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = self.Options() if options is None else options

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} {self.options!r}>"


class Selector(Plugin):
    """Candidates in, fewer or reordered candidates out, each with a reason."""

    kind: ClassVar[Kind] = "selector"
    #: A filter that spares processes (``protect``, ``scope``): when it fails, overruns or is
    #: switched off, the decision fails safe (no victim) instead of falling back past it.
    protective: ClassVar[bool] = False
    #: Orders what it keeps: the first it returns is its choice. ``False`` for a pure filter
    #: (``protect``, ``scope``), which keeps the rest in their incoming order: its step in a
    #: kill record then names no ``top_pid``.
    ranks: ClassVar[bool] = True

    @abc.abstractmethod
    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> Selection: ...


class Action(Plugin):
    """Does something to the chosen victim. Signals only through ``context.guard``."""

    kind: ClassVar[Kind] = "action"
    #: Sends the signal that ends the victim (``terminate``, ``kill``, ``cgroup-kill``): its
    #: failure ends the chain. Any other action that fails is recorded and the chain goes on.
    signals: ClassVar[bool] = False
    #: Reaps (calls ``context.reap()``, as ``reap`` does): a policy with such an action
    #: gets a reap stage (its pinned threads); without one, ``context.can_reap`` is False.
    needs_reap_stage: ClassVar[bool] = False

    @abc.abstractmethod
    async def act(self, context: ActionContext) -> str:
        """Do it; return a short outcome (``"sent SIGKILL"``). Raise to fail the action."""


class Observer(Plugin):
    """Receives every KillRecord (metrics, logs, notifications), and the warnings that rules
    send before they kill (the ``warn`` action). Sync or async; each call has a deadline."""

    kind: ClassVar[Kind] = "observer"

    @abc.abstractmethod
    def on_record(self, record: KillRecord) -> Awaitable[None] | None: ...

    def on_warning(self, warning: KillWarning) -> Awaitable[None] | None:
        """A rule warns that it is about to act (default: ignore)."""
        return None

    # Optional hooks: ``async def serve(self, *, task_status)`` (:class:`ServingObserver`)
    # and ``attach(self, reaper)`` (:class:`AttachingObserver`).


class Trigger(Plugin):
    """A source of reasons to act, run for as long as the reaper runs: ``run(send, *,
    task_status)`` calls ``task_status.started()`` once armed, then sends
    :class:`reapkit.ManualTrigger` events (every rule is evaluated, as for
    ``reaper.trigger()``) into ``send`` until cancelled."""

    kind: ClassVar[Kind] = "trigger"

    @abc.abstractmethod
    async def run(
        self, send: trio.abc.SendChannel[ManualTrigger], *, task_status: trio.TaskStatus[None]
    ) -> None: ...


_KIND_BASES: dict[Kind, tuple[type[Plugin], str]] = {
    "selector": (Selector, "select"),
    "action": (Action, "act"),
    "observer": (Observer, "on_record"),
    "trigger": (Trigger, "run"),
}
#: Each kind's hooks and the arguments reapkit passes each, by name (pluggy's hook specs): a
#: hook may take fewer of them, in any order, but none of another name without a default.
HOOKS: dict[Kind, dict[str, tuple[str, ...]]] = {
    "selector": {"select": ("situation", "candidates")},
    "action": {"act": ("context",)},
    "observer": {
        "on_record": ("record",),
        "on_warning": ("warning",),
        "attach": ("reaper",),
        "serve": ("task_status",),
    },
    "trigger": {"run": ("send", "task_status")},
}
#: Hooks started with ``nursery.start``, which passes ``task_status`` itself.
_STARTED = frozenset({"serve", "run"})


#: What a selector returns: the candidates it keeps, in its order (or an awaitable of them).
Selection = Iterable[Ranked] | Awaitable[Iterable[Ranked]]
SelectorFunction = Callable[[Situation, Sequence[Ranked]], Selection]


def selector(
    name: str, *, registry: PluginRegistry | None = None
) -> Callable[[SelectorFunction], type[Selector]]:
    """Register a plain function of ``(situation, candidates)`` as a selector::

    @reapkit.selector("largest-background")
    def largest_background(situation, candidates): ...
    """

    def wrap(func: SelectorFunction) -> type[Selector]:
        method: Callable[..., Selection]
        if inspect.iscoroutinefunction(func):

            async def select_async(
                self: Selector, situation: Situation, candidates: Sequence[Ranked]
            ) -> Iterable[Ranked]:
                result: Iterable[Ranked] = await func(situation, candidates)
                return result

            method = select_async
        else:

            def select_sync(
                self: Selector, situation: Situation, candidates: Sequence[Ranked]
            ) -> Selection:
                return func(situation, candidates)

            method = select_sync
        cls = type(
            f"FunctionSelector_{name}",
            (Selector,),
            {
                "name": name,
                "select": method,
                "__doc__": func.__doc__,
                "__module__": func.__module__,
            },
        )
        (registry or default_registry).register(cls)
        return cls

    return wrap


# -- calling plugins -----------------------------------------------------------------------------

#: What no plugin call swallows: trio's cancellation and Ctrl-C.
_PASS_THROUGH = (trio.Cancelled, KeyboardInterrupt)
#: A plugin whose calls overrun their deadline this many times in a row is switched off.
OVERRUNS_TO_SWITCH_OFF = 3


@attrs.define
class Isolated:
    """What :func:`isolated` caught: the plugin's failure, or None."""

    error: BaseException | None = None


@contextlib.contextmanager
def isolated() -> Iterator[Isolated]:
    """Run plugin code in the block so that whatever it raises — ``SystemExit`` (0 or not),
    ``GeneratorExit``, exception groups — ends up in ``.error`` for the caller to log and
    count. Trio's ``Cancelled`` and ``KeyboardInterrupt`` go on, also out of a group (the
    rest of the group is then dropped with a warning)."""
    box = Isolated()
    try:
        yield box
    except BaseException as exc:
        if isinstance(exc, _PASS_THROUGH):
            raise
        if isinstance(exc, BaseExceptionGroup):
            through, rest = exc.split(_PASS_THROUGH)
            if through is not None:
                if rest is not None:
                    log.warning("a plugin failed while cancelled: %s", describe(rest))
                raise through from None
        box.error = exc


def describe(exc: BaseException) -> str:
    """A plugin's failure in a few words, for logs and records."""
    if isinstance(exc, trio.TooSlowError):
        return "overran its deadline"
    if isinstance(exc, PluginSwitchedOff):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class PluginSwitchedOff(ReapkitError, RuntimeError):
    """Raised instead of calling a plugin that was switched off for overrunning."""


@attrs.define(eq=False)
class _CallState:
    #: Held so that its id is not reused while this state lives.
    plugin: Plugin
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1))
    overruns: int = 0
    off: bool = False


@attrs.define
class PluginCalls:
    """Calls plugins for their owner (the engine; the reaper, for observers), each under a
    deadline. A sync call runs on a worker thread of the plugin's own (a
    ``CapacityLimiter(1)`` each: a hung plugin can neither pile up threads nor use up the
    limiter the embedding program shares), abandoned at the deadline, unless the plugin is
    ``inline``; an async call runs as part of the caller's task and is cancelled at the
    deadline. A plugin that overruns ``OVERRUNS_TO_SWITCH_OFF`` times in a row is switched
    off (logged once, counted in ``switched_off``); calls then raise
    :class:`PluginSwitchedOff`. The caller isolates each call with :func:`isolated`."""

    #: Wraps an inline sync call (the engine pauses the garbage collector).
    inline_context: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    #: False: every sync call runs on the trio thread, as an inline one (no deadline can stop
    #: it). For a virtual clock (``reapkit replay``), which jumps while a thread works.
    threads: bool = True
    _states: dict[int, _CallState] = attrs.field(factory=dict, init=False)
    #: Plugins switched off so far.
    switched_off: int = attrs.field(default=0, init=False)

    def _state(self, plugin: Plugin) -> _CallState:
        state = self._states.get(id(plugin))
        if state is None:
            state = self._states[id(plugin)] = _CallState(plugin)
        return state

    def is_on(self, plugin: Plugin) -> bool:
        state = self._states.get(id(plugin))
        return state is None or not state.off

    def keep_only(self, plugins: Iterable[Plugin]) -> None:
        """Forget every plugin but ``plugins`` (after a reload: the old rules' instances)."""
        keep = {id(p) for p in plugins}
        self._states = {k: v for k, v in self._states.items() if k in keep}

    async def call(
        self,
        plugin: Plugin,
        method: str,
        arguments: Mapping[str, object],
        *,
        deadline: float,
        may_switch_off: bool = True,
        offload: bool = False,
    ) -> object:
        """``plugin.<method>(...)`` under ``deadline`` seconds, given those of ``arguments``
        its hook asks for, by name (:func:`hook_arguments`): its result, awaited if it is
        awaitable. Raises what the plugin raised, ``trio.TooSlowError`` if it overran.

        ``offload``: an ``inline`` plugin's sync call runs on its worker thread instead, to its
        end and without a deadline, as it would on the trio thread (the engine's preparations:
        a ranking of 10,000 processes must not hold the event loop)."""
        state = self._state(plugin)
        if state.off:
            raise PluginSwitchedOff(
                f"switched off after {OVERRUNS_TO_SWITCH_OFF} overruns in a row"
            )
        func = getattr(plugin, method)
        call = functools.partial(func, **hook_arguments(type(plugin), method, arguments))
        inline = plugin.inline or not self.threads
        if offload and inline and self.threads and not inspect.iscoroutinefunction(func):
            return await trio.to_thread.run_sync(_drained, call, limiter=state.limiter)
        try:
            with trio.fail_after(deadline):
                result: object
                if inspect.iscoroutinefunction(func):
                    result = await call()
                elif inline:
                    with self.inline_context():  # on the trio thread, to its end
                        result = _drained(call) if not self.threads else call()
                else:  # an abandoned call finishes on its thread; its result is dropped
                    result = await trio.to_thread.run_sync(
                        _drained, call, abandon_on_cancel=True, limiter=state.limiter
                    )
                if inspect.isawaitable(result):
                    result = await result
        except trio.TooSlowError:
            self._overran(state, deadline, may_switch_off)
            raise
        state.overruns = 0
        return result

    def _overran(self, state: _CallState, deadline: float, may_switch_off: bool) -> None:
        state.overruns += 1
        if may_switch_off and state.overruns >= OVERRUNS_TO_SWITCH_OFF and not state.off:
            state.off = True
            self.switched_off += 1
            plugin = state.plugin
            log.error(
                "%s %s overran its deadline (%g s) %d times in a row: switched off",
                plugin.kind, plugin.name, deadline, state.overruns,
            )  # fmt: skip


def _drained(call: Callable[[], object]) -> object:
    """``call()``; an iterable it returns (a generator, a class of its own) is iterated
    here too, on the worker thread, and so is the reason of its first ranked item (what the
    record shows), not later on the trio thread."""
    result = call()
    if isinstance(result, Iterable) and not isinstance(result, str | bytes):
        result = tuple(result)
        if result and type(result[0]) is Ranked:
            _ = result[0].reason
    return result


# -- the registry --------------------------------------------------------------------------------


@attrs.frozen
class PluginInfo:
    """What ``reapkit plugins`` lists."""

    name: str
    kind: str
    options: tuple[str, ...]
    #: ``"built-in"``, ``"code"`` or the distribution that supplied it.
    source: str
    plugin: type[Plugin] | None
    error: str | None = None


def validate_plugin(cls: object) -> type[Plugin]:
    """Raise :class:`PluginError` unless ``cls`` is a usable plugin class: one of the four
    kinds, a name, attrs options, and its hooks' parameters named as reapkit passes them
    (:data:`HOOKS`), as pluggy checks a hook's argument names when a plugin registers."""
    label = getattr(cls, "name", None) or getattr(cls, "__name__", repr(cls))
    if not inspect.isclass(cls) or not issubclass(cls, Plugin):
        raise PluginError(str(label), "not a subclass of Selector, Action, Observer or Trigger")
    kind = getattr(cls, "kind", None)
    if kind not in _KIND_BASES:
        raise PluginError(str(label), "subclass Selector, Action, Observer or Trigger")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(str(label), "needs a name of lowercase letters, digits, '-' or '_'")
    if not attrs.has(cls.Options):
        raise PluginError(name, "Options must be an attrs class")
    _base, required = _KIND_BASES[kind]
    impl = getattr(cls, required, None)
    if impl is None or getattr(impl, "__isabstractmethod__", False):
        raise PluginError(name, f"a {kind} must implement {required}()")
    for method in HOOKS[kind]:
        if getattr(cls, method, None) is not None:
            hook_parameters(cls, method)
    return cls


#: Per plugin class, what :func:`hook_parameters` found for each hook.
_HOOK_PARAMETERS: weakref.WeakKeyDictionary[type[Plugin], dict[str, tuple[str, ...] | None]] = (
    weakref.WeakKeyDictionary()
)


def hook_parameters(cls: type[Plugin], method: str) -> tuple[str, ...] | None:
    """The arguments of ``HOOKS`` that ``cls.<method>`` takes by name (None: all of them, it
    takes ``**kwargs``). Raises :class:`PluginError`, naming the plugin and the hook, for a
    parameter reapkit does not pass and that has no default, and for positional-only ones."""
    known = _HOOK_PARAMETERS.setdefault(cls, {})
    if method not in known:
        known[method] = _read_hook(cls, method)
    return known[method]


def _read_hook(cls: type[Plugin], method: str) -> tuple[str, ...] | None:
    spec = HOOKS[cls.kind][method]
    label = getattr(cls, "name", cls.__name__)
    try:
        signature = inspect.signature(getattr(cls, method))
    except (TypeError, ValueError) as exc:
        raise PluginError(label, f"{method}(): its signature cannot be read: {exc}") from None
    params = list(signature.parameters.values())
    if inspect.isfunction(inspect.getattr_static(cls, method)) and params:
        params = params[1:]  # self
    names: list[str] = []
    takes_all = False
    for param in params:
        if param.kind is param.VAR_KEYWORD:
            takes_all = True
        elif param.kind is param.POSITIONAL_ONLY:
            raise PluginError(
                label, f"{method}(): {param.name!r} is positional-only; reapkit passes"
                f" {', '.join(spec)} by name"
            )  # fmt: skip
        elif param.name in spec:
            names.append(param.name)
        elif param.kind is not param.VAR_POSITIONAL and param.default is param.empty:
            raise PluginError(
                label, f"{method}() asks for {param.name!r}, which reapkit does not pass"
                f" (it passes {', '.join(spec)}, by name)"
            )  # fmt: skip
    if method in _STARTED and not takes_all and "task_status" not in names:
        raise PluginError(label, f"{method}() must take task_status (it is started)")
    return None if takes_all else tuple(names)


def hook_arguments(
    cls: type[Plugin], method: str, arguments: Mapping[str, object]
) -> Mapping[str, object]:
    """Those of ``arguments`` that ``cls.<method>`` takes (see :func:`hook_parameters`)."""
    names = hook_parameters(cls, method)
    if names is None or len(names) == len(arguments):
        return arguments
    return {n: arguments[n] for n in names if n in arguments}


def make_options(cls: type[Plugin], table: Mapping[str, Any] | None) -> Any:
    """Build ``cls.Options`` from a policy table. A :class:`PluginError` names the plugin,
    the option at fault (``.option``) and what was expected."""
    table = dict(table or {})
    table.pop("name", None)
    fields = {f.name.lstrip("_"): f for f in attrs.fields(cls.Options) if f.init}
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise PluginError(cls.name, f"unknown option {key!r} (options: {known})", key)
    try:
        return cls.Options(**table)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        # attrs does not say which field a converter or validator failed on: the value, or
        # the field's name, in the message tells.
        culprit = next((k for k, v in table.items() if k in message or repr(v) in message), None)
        raise PluginError(cls.name, message, culprit) from None


@attrs.define
class PluginRegistry:
    """Plugins by kind and name."""

    _plugins: dict[tuple[str, str], type[Plugin]] = attrs.field(factory=dict)
    _sources: dict[tuple[str, str], str] = attrs.field(factory=dict)
    _failed: list[PluginInfo] = attrs.field(factory=list)
    #: Entry-point groups to look up when a plugin name is not otherwise known.
    _groups: list[str] = attrs.field(factory=list)
    #: Entry points found, not imported yet.
    _pending: list[EntryPoint] = attrs.field(factory=list)
    #: Entry points imported (registered or failed): each is imported, and listed, once.
    _loaded: list[EntryPoint] = attrs.field(factory=list)

    def register(self, cls: type[Plugin], *, source: str = "code") -> type[Plugin]:
        """Validate and add ``cls``; usable as a class decorator. A name is registered once."""
        validate_plugin(cls)
        key = (cls.kind, cls.name)
        if key in self._plugins and self._plugins[key] is not cls:
            raise PluginError(cls.name, f"a {cls.kind} with this name is already registered")
        self._plugins[key] = cls
        self._sources[key] = source
        return cls

    def get(self, kind: Kind, name: str) -> type[Plugin]:
        key = (kind, name)
        if key not in self._plugins:
            self._find()
        if key not in self._plugins and self._pending:
            # The entry point of that name first; failing that, all (one may list several).
            self._load([ep for ep in self._pending if ep.name == name])
            if key not in self._plugins:
                self._load(self._pending)
        try:
            return self._plugins[key]
        except KeyError:
            for failed in self._failed:
                if failed.name == name:
                    raise PluginError(
                        name, f"installed by {failed.source} but failed to load: {failed.error}"
                    ) from None
            known = ", ".join(sorted(n for k, n in self._plugins if k == kind))
            raise PluginError(name, f"no {kind} of this name (known: {known})") from None

    def discover_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Use the plugins advertised in ``group``, without importing them now. The group is
        looked up when a name is not otherwise known, or when plugins are listed; each
        plugin is imported, validated and registered when first asked for by name
        (:meth:`get`, i.e. when a policy that names it loads), and all of them when they are
        listed. A daemon carries only the plugins its policy uses (and, with only built-in
        ones, not even the packaging metadata machinery)."""
        self._groups.append(group)

    def _find(self) -> None:
        if self._groups:
            for group in self._groups:
                self._pending.extend(ep for ep in _entry_points(group) if ep not in self._loaded)
            self._groups.clear()

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[PluginInfo]:
        """Register every plugin advertised in ``group`` (each entry point names a plugin
        class, or a list of them). A plugin that fails to load is remembered with its error;
        the others still load (pluggy's ``load_setuptools_entrypoints``). Returns failures."""
        return self._load(_entry_points(group))

    def _load(self, eps: Iterable[EntryPoint]) -> list[PluginInfo]:
        eps = [ep for ep in eps if ep not in self._loaded]
        self._loaded.extend(eps)
        self._pending = [ep for ep in self._pending if ep not in eps]
        failures = []
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else "?"
            try:
                loaded = ep.load()
                for cls in loaded if isinstance(loaded, list | tuple) else [loaded]:
                    self.register(cls, source=dist)
            except Exception as exc:  # a broken third-party plugin must not stop the reaper
                info = PluginInfo(ep.name, "?", (), dist, None, f"{type(exc).__name__}: {exc}")
                failures.append(info)
                log.warning("plugin %s from %s failed to load: %s", ep.name, dist, info.error)
        self._failed.extend(failures)
        return failures

    def plugins(self) -> list[PluginInfo]:
        self._find()
        self._load(self._pending)
        infos = [
            PluginInfo(
                cls.name,
                cls.kind,
                tuple(f.name.lstrip("_") for f in attrs.fields(cls.Options) if f.init),
                self._sources[key],
                cls,
            )
            for key, cls in sorted(self._plugins.items())
        ]
        return infos + list(self._failed)

    def names(self, kind: Kind) -> Iterable[str]:
        self._find()
        self._load(self._pending)
        return sorted(n for k, n in self._plugins if k == kind)


def _entry_points(group: str) -> Iterable[EntryPoint]:
    import importlib.metadata  # noqa: PLC0415 - 1.4 MiB the daemon needs only for plugins

    return importlib.metadata.entry_points(group=group)


default_registry = PluginRegistry()


def register(cls: type[Plugin]) -> type[Plugin]:
    """Register a plugin class in the default registry (usable as a decorator)."""
    return default_registry.register(cls)

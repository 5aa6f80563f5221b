"""Replay a policy over a trace: what would it have done?

The real engine, selectors, actions and guard run in dry-run mode on a virtual clock (trio's
``MockClock``, jumping to the next moment anything happens) over a ``/proc`` served from the
trace: a directory written as the trace says, record by record, at the record's time. What the
engine's sources would have seen comes from the trace too:

* memory lines: the real :class:`MemoryThresholdSource` samples the served ``meminfo``;
* PSI triggers: each trigger's firings are derived from the recorded stall totals as the kernel
  decides them (stall growth within the window at least the threshold, at most one event per
  window), for the system's pressure files and the recorded cgroups';
* processes: the served tree (the engine scans it at each decision).

Counterfactuals: when the policy kills a process that the trace does not show exiting soon
after (within :data:`REAL_EXIT_WITHIN`), the real machine did not make that kill. From then on
the trace shows a world where that process lived; the victim is hidden from the served tree
and every later decision is marked ``counterfactual``.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
import trio
import trio.testing

from ._conditions import Condition, MemoryCondition, PressureCondition
from ._engine import Engine
from ._guard import CgroupScope, Scope, SubtreeScope
from ._kernel._cgroups import CgroupMount, entry_matches, mount_containing
from ._policy import Policy, PolicyHost, load_policy_on
from ._procfs import ProcFS
from ._records import KillRecord
from ._sources.memory import MemoryThreshold, MemoryThresholdSource
from ._sources.psi import PressureEvent
from ._testing._fakeproc import FakeProc
from ._trace import Trace, TraceError, read_trace
from ._units import PsiSpec

KiB: Final = 1024
#: A replayed kill whose victim the trace shows exiting within this many seconds is one the
#: real machine made too (by this policy, another daemon or the kernel).
REAL_EXIT_WITHIN: Final = 5.0
#: Replay goes on this long past the trace's last record (victims' confirmations, cooldowns).
TAIL: Final = 1.0


@attrs.frozen
class ReplayedDecision:
    """One decision of a replayed policy."""

    #: Seconds since the trace started.
    t: float
    record: KillRecord
    #: Made after the first kill the real machine did not make: the trace shows a world where
    #: that victim lived on, so this decision saw figures of a different world. (That first
    #: kill itself is not: it is where the worlds part, ``happened`` False.) Also a decision
    #: made while a victim the machine lost too was already hidden here but not yet gone there.
    counterfactual: bool
    #: Whether the trace shows this victim exiting within ``REAL_EXIT_WITHIN`` seconds: the real
    #: machine lost it too (``None``: no victim).
    happened: bool | None

    def as_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "replayed": True,
            "counterfactual": self.counterfactual,
            "happened": self.happened,
            "record": self.record.as_json(),
        }


@attrs.frozen
class ReplayResult:
    """A policy's decisions over a trace (:func:`replay_trace`)."""

    policy: str
    decisions: tuple[ReplayedDecision, ...]
    #: Seconds since the trace started of the first kill the real machine did not make.
    diverged_at: float | None
    #: The trace's length in seconds, and what was wrong with it (``truncated``, ``lost``).
    duration: float
    truncated: bool
    lost: int


class _ServedProcFS(ProcFS):
    """The served tree, with each process's executable as the trace verified it (the path
    may not exist on the machine that replays)."""

    __slots__ = ("exes",)

    def __init__(self, root: str, page_size: int) -> None:
        super().__init__(root, page_size=page_size)
        self.exes: dict[int, str] = {}

    def exe(self, pid: int) -> str:
        return self.exes.get(pid, "")


@attrs.frozen
class _ServedHost:
    """The recorded machine, as a policy is loaded on it (``PolicyHost``): its ``/proc`` and
    cgroups served from the trace under ``cgroups`` (the cgroup mounts as the trace recorded
    them, their mount points below it), its processes' start times for sub-tree scopes."""

    procfs: _ServedProcFS
    cgroups: str
    mounts: tuple[CgroupMount, ...]
    starts: Mapping[int, int]

    def cgroup_directory(self, directory: str) -> str:
        # Below the served root, whatever the path says (".." cannot climb out of "/").
        return self.cgroups + os.path.normpath("/" + directory.lstrip("/"))

    def cgroup_scope(self, directory: str) -> Scope:
        try:
            mount = mount_containing(directory, self.mounts)
        except ValueError:
            raise ValueError(
                f"the trace holds no cgroup hierarchy with {directory} (its header's"
                " cgroup_mounts): record with --cgroup or --policy naming it"
            ) from None
        served = attrs.evolve(mount, mountpoint=self.cgroup_directory(mount.mountpoint))
        return CgroupScope(served, mount.cgroup_path(directory))

    def subtree_scope(self, pid: int) -> Scope:
        if pid not in self.starts:
            raise ValueError(f"process {pid} is not in the trace")
        return SubtreeScope(pid, self.starts[pid])

    def check(self, policy: Policy) -> None:
        return None  # the recorded machine's limits and capabilities are not known

    def check_condition(self, condition: Condition) -> None:
        return None  # replay fires PSI triggers from the totals, of any window


@attrs.define
class _World:
    """The served ``/proc`` and what the trace said about each process so far."""

    fake: FakeProc
    #: The trace's file, for messages.
    path: str
    host: _ServedHost
    #: Served cgroup directory → the pids in it (its ``cgroup.procs``).
    members: dict[str, set[int]] = attrs.field(factory=dict)
    #: (pid, start) → the process's fields as recorded so far.
    processes: dict[tuple[int, int], dict[str, Any]] = attrs.field(factory=dict)
    #: Victims of replayed kills: hidden from the tree from their kill on.
    hidden: set[tuple[int, int]] = attrs.field(factory=set)

    def apply(self, record: Mapping[str, Any]) -> None:
        """Serve what ``record`` says; a record whose values make no sense is a
        :class:`TraceError` naming it."""
        try:
            self._apply(record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TraceError(
                self.path, None, f"a {record.get('k')!r} record at {record.get('t')} s: {exc!r}"
            ) from None

    def _apply(self, record: Mapping[str, Any]) -> None:
        kind = record["k"]
        if kind == "mem":
            self.fake.set_meminfo(
                total=record["total"] * KiB,
                available=record["avail"] * KiB,
                free=record["free"] * KiB,
                swap_total=record["swap_total"] * KiB,
                swap_free=record["swap_free"] * KiB,
            )
        elif kind == "psi":
            self._pressure(record)
        elif kind == "proc":
            key = (record["pid"], record["start"])
            if key not in self.processes and "comm" not in record:
                return  # what changed of a process not (or no more) served: nothing to serve
            fields = self.processes.setdefault(key, {})
            fields.update(record)
            if key not in self.hidden:
                self._write(key, fields)
        elif kind == "exit":
            self._exit(record["pid"], record.get("start"))
        elif kind == "comm":
            for key, fields in self.processes.items():
                if key[0] == record["pid"]:  # prctl(PR_SET_NAME): the served name follows
                    fields["comm"] = record["comm"]
                    if key not in self.hidden:
                        self._write(key, fields)
        elif kind == "cgroup":
            self._cgroup(record)

    def hide(self, pid: int, start: int) -> None:
        self.hidden.add((pid, start))
        self._exit(pid, start)

    def _exit(self, pid: int, start: int | None) -> None:
        gone = [k for k in self.processes if k[0] == pid and start in (None, k[1])]
        for key in gone:
            del self.processes[key]
        # The served directory is the PID's: remove it only if no process holds the PID now.
        if gone and not any(k[0] == pid for k in self.processes):
            self.host.procfs.exes.pop(pid, None)
            self._join(pid, ())
            with contextlib.suppress(FileNotFoundError):
                self.fake.remove_process(pid)

    def _write(self, key: tuple[int, int], f: Mapping[str, Any]) -> None:
        pid, start = key
        dead = f.get("state") in ("Z", "X")
        argv = f.get("cmdline") or [f.get("comm", "")]
        self.fake.add_process(
            pid,
            comm=f.get("comm", ""),
            state=f.get("state", "S"),
            ppid=f.get("ppid", 1),
            start_time=start,
            rss=0 if dead else f.get("rss", 0) * KiB // self.fake.page_size * self.fake.page_size,
            swap=0 if dead else f.get("swap", 0) * KiB,
            oom_score=f.get("score", 0),
            oom_score_adj=f.get("adj", 0),
            uid=f.get("uid", 0),
            cgroup=f.get("cgroup", "0::/\n"),
            cmdline=() if dead else argv,
        )
        self.host.procfs.exes[pid] = f.get("exe", "")
        self._join(pid, self._directories(f.get("cgroup", "")))

    def _directories(self, text: str) -> list[str]:
        """The served directories of the cgroups a ``/proc/<pid>/cgroup`` text names, in the
        hierarchies the trace recorded."""
        out = []
        for line in text.splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            names = [c for c in controllers.split(",") if c]
            for mount in self.host.mounts:
                if entry_matches(mount, int(hierarchy), names):
                    directory = mount.directory(path)
                    if directory is not None:
                        out.append(self.host.cgroup_directory(directory))
        return out

    def _join(self, pid: int, directories: Sequence[str]) -> None:
        """Move ``pid`` into ``directories`` (none: out of every served cgroup)."""
        for directory, pids in self.members.items():
            if pid in pids and directory not in directories:
                pids.discard(pid)
                self._write_procs(directory)
        for directory in directories:
            pids = self.members.setdefault(directory, set())
            if pid not in pids:
                pids.add(pid)
                self._write_procs(directory)

    def _write_procs(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write("".join(f"{pid}\n" for pid in sorted(self.members[directory])))

    def _cgroup(self, record: Mapping[str, Any]) -> None:
        """A recorded memory cgroup's usage, limit and pressure, in the files
        :class:`CgroupMemoryFiles` reads (no ``memory.events``: nothing to be notified by)."""
        directory = self.host.cgroup_directory(record["path"])
        os.makedirs(directory, exist_ok=True)
        usage, limit = record["usage"] * KiB, record["limit"] * KiB
        files = (
            {"memory.current": usage, "memory.max": limit}
            if record.get("v") == 2
            else {"memory.usage_in_bytes": usage, "memory.limit_in_bytes": limit}
        )
        for name, value in files.items():
            with open(os.path.join(directory, name), "w", encoding="ascii") as f:
                f.write(f"{value}\n")
        pressure = record.get("pressure")
        if pressure:
            with open(os.path.join(directory, "memory.pressure"), "w", encoding="ascii") as f:
                f.write(_pressure_text(pressure))

    def _pressure(self, record: Mapping[str, Any]) -> None:
        self.fake.write(f"pressure/{record['res']}", _pressure_text(record))


def _pressure_text(record: Mapping[str, Any]) -> str:
    """A pressure file with the recorded totals and ``avg10`` (the other averages 0)."""
    avg10 = record.get("avg10") or [0.0, None]
    lines = [f"some avg10={avg10[0] or 0:.2f} avg60=0.00 avg300=0.00 total={record['some']}"]
    if record.get("full") is not None:
        full = avg10[1] or 0.0
        lines.append(f"full avg10={full:.2f} avg60=0.00 avg300=0.00 total={record['full']}")
    return "\n".join(lines) + "\n"


class _Firings:
    """A PSI trigger's firings, derived from the stall totals of one pressure file as the
    kernel decides them: growth within ``window`` reached ``threshold``, at most one event per
    window."""

    def __init__(self, spec: PsiSpec) -> None:
        self.spec = spec
        self.times: list[float] = []
        self.totals: list[int] = []
        self.last = -math.inf

    @property
    def last_total(self) -> int | None:
        return self.totals[-1] if self.totals else None

    def sample(self, t: float, total: int) -> bool:
        self.times.append(t)
        self.totals.append(total)
        if t - self.last < self.spec.window:
            return False
        if self._growth_since(t - self.spec.window, total) >= self.spec.threshold_us:
            self.last = t
            return True
        return False

    def _growth_since(self, then: float, total: int) -> float:
        i = bisect.bisect_left(self.times, then)
        if i == 0:
            return total - self.totals[0]  # the trace began inside the window
        t0, t1 = self.times[i - 1], self.times[i]
        v0, v1 = self.totals[i - 1], self.totals[i]
        at = v0 + (v1 - v0) * ((then - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return total - at


def _pressure_total(record: Mapping[str, Any], spec: PsiSpec, host: _ServedHost) -> int | None:
    """The stall total ``record`` holds for ``spec``'s file, or ``None``. A cgroup's pressure
    file is named as the policy was loaded: in the served tree."""
    kind = spec.kind
    if record["k"] == "psi" and spec.path == f"/proc/pressure/{record['res']}":
        value = record.get(kind)
    elif record["k"] == "cgroup" and record.get("pressure") and spec.resource == "memory":
        if spec.path != os.path.join(host.cgroup_directory(record["path"]), "memory.pressure"):
            return None
        value = record["pressure"].get(kind)
    else:
        return None
    return value if isinstance(value, int) else None


PolicyLoader = Callable[[PolicyHost], Policy]


@attrs.define
class _Verdicts:
    """The decisions as they come, and whether the trace still shows their world."""

    world: _World
    #: When each process (pid, start) left the trace.
    exits: Mapping[tuple[int, int], list[float]]
    t0: float
    decisions: list[ReplayedDecision] = attrs.field(factory=list)
    #: The first kill the real machine did not make (the worlds part there).
    diverged: float | None = None
    #: Until when a victim the machine lost too was still alive in the trace.
    pending: float = 0.0

    async def emit(self, record: KillRecord) -> None:
        t = round(trio.current_time() - self.t0, 3)
        # The trace no longer shows this policy's world: after a kill the machine did not
        # make, or while a victim it did lose is hidden here but still alive in the trace.
        counterfactual = self.diverged is not None or t < self.pending
        happened = None
        if record.victim is not None and record.outcome in ("killed", "dry-run"):
            key = (record.victim.pid, record.victim.start_time)
            real = [e for e in self.exits.get(key, ()) if t <= e <= t + REAL_EXIT_WITHIN]
            happened = bool(real)
            if real:
                self.pending = max(self.pending, min(real))
            elif self.diverged is None:
                self.diverged = t
            self.world.hide(*key)
        self.decisions.append(ReplayedDecision(t, record, counterfactual, happened))


async def _replay(load: PolicyLoader, trace: Trace, root: str) -> ReplayResult:
    """Replay the policy ``load(host)`` returns over ``trace``, serving ``/proc`` from
    ``root/proc`` and the cgroups from ``root/cgroup``; run under a virtual clock (see
    :func:`replay_trace`). ``load`` must return a dry-run policy loaded on ``host``."""
    procfs = _ServedProcFS(os.path.join(root, "proc"), int(trace.header.get("page_size", 4096)))
    host = _ServedHost(procfs, os.path.join(root, "cgroup"), _mounts(trace), _starts(trace))
    world = _World(FakeProc(procfs.root), trace.path, host)
    policy = load(host)
    if not policy.dry_run:
        raise ValueError("replay needs a dry-run policy")
    t0 = trio.current_time()
    verdicts = _Verdicts(world, _exit_times(trace.records), t0)
    engine = Engine(
        policy.rules, emit=verdicts.emit, procfs=procfs, prepare_ranking=policy.prepare_ranking,
        plugin_threads=False,  # a worker thread's real time would let the virtual clock jump
    )  # fmt: skip
    if trace.records:
        for record in _until(trace.records, trace.records[0]["t"]):
            world.apply(record)  # the keyframe, before any source looks
    send, receive = trio.open_memory_channel[object](1024)
    async with trio.open_nursery() as nursery:
        thresholds = _thresholds(policy)
        if thresholds:
            source = MemoryThresholdSource(
                thresholds, procfs=procfs, lead=2 * policy.prepare_ranking
            )
            await nursery.start(source.run, send.clone())
        nursery.start_soon(_decide, engine, receive, nursery)
        await _play(trace, world, _firings(policy), send, t0)
        duration = trace.records[-1]["t"] if trace.records else 0.0
        await trio.sleep_until(t0 + duration + TAIL)
        nursery.cancel_scope.cancel()
    epoch = float(trace.header.get("started", 0.0)) - t0
    done = tuple(
        attrs.evolve(d, record=attrs.evolve(d.record, epoch_offset=epoch))
        for d in verdicts.decisions
    )
    return ReplayResult(
        policy.source, done, verdicts.diverged, duration, trace.truncated, trace.lost
    )


async def _play(
    trace: Trace,
    world: _World,
    firings: list[_Firings],
    send: trio.MemorySendChannel[object],
    t0: float,
) -> None:
    """Serve each record at its time, and fire the PSI triggers its totals make fire."""
    for record in trace.records:
        await trio.sleep_until(t0 + record["t"])
        world.apply(record)
        for firing in firings:
            # A total is written when it moved: between two, it stood still. Every sample
            # (each ``mem`` record) is a point of that step function.
            total = _pressure_total(record, firing.spec, world.host)
            if total is None and record["k"] == "mem":
                total = firing.last_total
            if total is not None and firing.sample(record["t"], total):
                await send.send(PressureEvent(trio.current_time(), firing.spec, None, "trigger"))


def _thresholds(policy: Policy) -> list[MemoryThreshold]:
    return list(
        dict.fromkeys(
            c.threshold for r in policy.rules for c in r.when if isinstance(c, MemoryCondition)
        )
    )


def _firings(policy: Policy) -> list[_Firings]:
    specs = {c.spec for r in policy.rules for c in r.when if isinstance(c, PressureCondition)}
    return [_Firings(s) for s in specs]


async def _decide(
    engine: Engine, receive: trio.MemoryReceiveChannel[object], nursery: trio.Nursery
) -> None:
    async with receive:
        async for event in receive:
            await engine.handle(event, nursery)


def _first(group: BaseExceptionGroup[TraceError]) -> TraceError:
    inner = group.exceptions[0]
    return inner if isinstance(inner, TraceError) else _first(inner)


def _mounts(trace: Trace) -> tuple[CgroupMount, ...]:
    try:
        return tuple(
            CgroupMount(**{**m, "controllers": tuple(m["controllers"])})
            for m in trace.header.get("cgroup_mounts", ())
        )
    except (TypeError, KeyError) as exc:
        raise TraceError(trace.path, 1, f"cgroup_mounts: {exc}") from None


def _starts(trace: Trace) -> dict[int, int]:
    """Each pid's start time when it first shows in the trace (for sub-tree scopes)."""
    starts: dict[int, int] = {}
    for r in trace.records:
        if r["k"] == "proc":
            starts.setdefault(r["pid"], r["start"])
    return starts


def _until(records: Sequence[Mapping[str, Any]], t: float) -> Iterable[Mapping[str, Any]]:
    return (r for r in records if r["t"] <= t)


def _exit_times(records: Iterable[Mapping[str, Any]]) -> dict[tuple[int, int], list[float]]:
    """When each process (pid, start) left the trace."""
    starts: dict[int, int] = {}
    out: dict[tuple[int, int], list[float]] = collections.defaultdict(list)
    for r in records:
        if r["k"] == "proc":
            starts[r["pid"]] = r["start"]
        elif r["k"] == "exit":
            start = r.get("start", starts.get(r["pid"]))
            if start is not None:
                out[(r["pid"], start)].append(r["t"])
    return out


def replay_trace(
    policy: str | os.PathLike[str] | None,
    trace: Trace | str | os.PathLike[str],
    *,
    text: str | None = None,
) -> ReplayResult:
    """What the policy at ``policy`` (or in ``text``; the default with neither) would have
    done over ``trace`` (a :class:`Trace`, or a trace file's path): its real engine,
    selectors, actions and guard in dry-run mode on a virtual clock, ``/proc`` and the
    recorded cgroups served from the trace in a temporary directory (removed afterwards).
    Raises :class:`reapkit.PolicyError` for a bad policy, :class:`TraceError` for a bad trace.
    """
    path = policy
    if not isinstance(trace, Trace):
        trace = read_trace(os.fspath(trace))

    def load(host: PolicyHost) -> Policy:
        return load_policy_on(host, path, text=text, dry_run=True)

    with tempfile.TemporaryDirectory(prefix="reapkit-replay-") as root:
        clock = trio.testing.MockClock(autojump_threshold=0)
        try:
            return trio.run(_replay, load, trace, root, clock=clock)
        except BaseExceptionGroup as group:  # a task's error, wrapped by its nursery
            found, _rest = group.split(TraceError)
            if found is None:
                raise
            raise _first(found) from None

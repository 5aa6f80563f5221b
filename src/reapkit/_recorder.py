"""Record a machine's memory story as a trace (``reapkit record``, ``reapkit run --trace``).

What the engine's inputs were, at a rate that follows the headroom as the memory sampler's does.
The headroom is MemAvailable, or less where a recorded cgroup is closer to its limit, or a
memory line of the policies the trace is for (``run --trace``, ``record --policy``) is closer:

* ``mem`` (MemTotal, MemAvailable, MemFree, swap) every sample: the interval is the headroom
  divided by an assumed fill rate of 10 GiB/s, clamped to [10 ms, 1 s] (near a line of
  the policies recorded for, [2 ms, 1 s], as the daemon's own sampler);
* ``psi``: each of ``/proc/pressure/{memory,io,cpu}`` whose totals moved since the sample
  before, read at most every 50 ms (replay derives any trigger's firings from the totals);
* ``cgroup``: usage, limit, ``memory.events`` and pressure totals of the cgroups named (a
  policy's own, under ``run --trace``), when they changed;
* ``proc``: every user process (kernel threads never are candidates) in snapshots whose
  interval is the headroom divided by 1 GiB/s, clamped to [1 s, 10 s] — identity, name,
  command line, executable, uid, cgroup, RSS, swap, ``oom_score``, ``oom_score_adj``. After
  the first sight of a process only what changed is written, and what rarely changes (uid,
  cgroup) is read every tenth snapshot; a process that exec'd is read at the next sample;
* ``fork``, ``exec``, ``comm``, ``exit`` from the proc connector as they happen (where it can
  be opened; snapshots see exits too, later).

Snapshots read three small files per process on a worker thread: the event loop the recorder
shares with the reaper (``run --trace``) does not wait for them. A sample is one read of
``/proc/meminfo`` on the event loop (and, at most every 50 ms, the three pressure files).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
import trio

from ._conditions import MemoryCondition, PressureCondition
from ._errors import AccessDenied, NoSuchProcess, ProcFormatError
from ._guard import CgroupScope
from ._kernel._cgroups import CgroupMount, cgroup_mounts
from ._policy import Policy
from ._procfs import PF_KTHREAD, MemInfo, ProcFS, read_file
from ._records import KillRecord
from ._sources.memory import CgroupMemoryFiles, MemoryThreshold
from ._sources.proc_connector import (
    ProcComm,
    ProcConnectorSource,
    ProcEvent,
    ProcExec,
    ProcExit,
    ProcFork,
)
from ._sources.psi import parse_pressure
from ._trace import FORMAT, PSI_RESOURCES, VERSION, TraceWriter
from ._version import __version__

log = logging.getLogger("reapkit.trace")

KiB: Final = 1024
GiB: Final = 1 << 30
#: Memory samples: MemAvailable / MEM_FILL_RATE seconds, within MEM_INTERVAL.
MEM_FILL_RATE: Final = 10 * GiB
MEM_INTERVAL: Final = (0.010, 1.0)
#: The pressure files are read at most this often (seconds): the kernel itself checks a
#: trigger's growth every tenth of its window, 50 ms at the least (kernel/sched/psi.c).
PSI_INTERVAL: Final = 0.05
#: Near a memory line of the policies recorded for: as the daemon's sampler (2 ms at least).
LINE_INTERVAL: Final = (0.002, 1.0)
#: Process snapshots: MemAvailable / SNAPSHOT_FILL_RATE seconds, within SNAPSHOT_INTERVAL.
SNAPSHOT_FILL_RATE: Final = 1 * GiB
SNAPSHOT_INTERVAL: Final = (1.0, 10.0)
#: A process's uid and cgroup are read again every this many snapshots (and at an exec).
SLOW_EVERY: Final = 10
#: A rolling trace's segments last at least this long (seconds): half the window.
TRACE_SEGMENT_MIN: Final = 30.0


# Two converters, not one generic: attrs' mypy plugin cannot infer a TypeVar's type there.
def _as_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _as_lines(value: Iterable[MemoryThreshold]) -> tuple[MemoryThreshold, ...]:
    return tuple(value)


class _Everyone(set[int]):
    """Every pid is in it: a keyframe reads each process in full."""

    def __contains__(self, _pid: object) -> bool:
        return True


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(bounds[1], max(bounds[0], value))


@attrs.frozen
class RecorderStatistics:
    """What a :class:`Recorder` has done so far (``statistics()``)."""

    samples: int
    snapshots: int
    #: User processes in the last snapshot.
    processes: int
    lines_written: int
    lines_dropped: int
    #: The trace could not be written any more (a full disk): the error, else ``None``.
    failed: str | None


@attrs.define
class Recorder:
    """Writes a trace to ``writer`` until cancelled (see the module docstring)."""

    writer: TraceWriter
    procfs: ProcFS = attrs.field(factory=ProcFS)
    #: Keep command lines (``--no-cmdline`` drops them: a trace may leave the machine).
    cmdline: bool = True
    #: Memory cgroup directories whose usage and events are recorded.
    cgroups: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)
    #: Rolling: a new segment every half ``window`` seconds, the one before kept (``None``: one
    #: segment).
    window: float | None = None
    #: Memory lines of the policies the trace is for: near one, samples are as dense as that
    #: policy's own sampler takes them (its crossing is in the trace).
    lines: tuple[MemoryThreshold, ...] = attrs.field(default=(), converter=_as_lines)
    #: Subscribe to the proc connector for exact fork/exec/exit times (needs CAP_NET_ADMIN).
    events: bool = True
    #: Bytes per second assumed to fill memory, for the two intervals (module docstring).
    mem_fill_rate: float = MEM_FILL_RATE
    snapshot_fill_rate: float = SNAPSHOT_FILL_RATE
    _t0: float = attrs.field(default=math.nan, init=False)
    _recording: str = attrs.field(factory=lambda: uuid.uuid4().hex, init=False)
    _segment: int = attrs.field(default=0, init=False)
    _segment_started: float = attrs.field(default=0.0, init=False)
    #: (pid, start) → the fields last written for that process.
    _known: dict[tuple[int, int], dict[str, Any]] = attrs.field(factory=dict, init=False)
    #: pids whose name, command line or program changed (exec, comm): read them afresh.
    _changed: set[int] = attrs.field(factory=set, init=False)
    _last: dict[str, Any] = attrs.field(factory=dict, init=False)
    _samples: int = attrs.field(default=0, init=False)
    _snapshots: int = attrs.field(default=0, init=False)
    _connected: bool = attrs.field(default=False, init=False)
    _swap: bool = attrs.field(default=True, init=False)
    _psi_read: float = attrs.field(default=-math.inf, init=False)
    #: pids the connector said exited, since the last read (see ``_write_read``).
    _exited: set[int] = attrs.field(factory=set, init=False)
    #: pids that exec'd since the last sample: read at the next sample.
    _execs: set[int] = attrs.field(factory=set, init=False)
    #: PIDs that were kernel threads when last read: skipped but every SLOW_EVERY snapshots.
    _kthreads: set[int] = attrs.field(factory=set, init=False)
    #: Each recorded cgroup's files, found once (again after the cgroup could not be read).
    _cgroup_files: dict[str, CgroupMemoryFiles] = attrs.field(factory=dict, init=False)

    def statistics(self) -> RecorderStatistics:
        failed = self.writer.failed
        return RecorderStatistics(
            self._samples,
            self._snapshots,
            len(self._known),
            self.writer.written,
            self.writer.dropped,
            None if failed is None else f"{failed.strerror or failed}",
        )

    def now(self) -> float:
        """Seconds since the recording started, as written in ``t``."""
        return round(trio.current_time() - self._t0, 3)

    def header(self) -> dict[str, Any]:
        return {
            "k": "header",
            "format": FORMAT,
            "version": VERSION,
            "recording": self._recording,
            "segment": self._segment,
            "started": round(time.time() - (trio.current_time() - self._t0), 3),
            "hostname": socket.gethostname(),
            "kernel": platform.release(),
            "reapkit": __version__,
            "page_size": self.procfs.page_size,
            "cmdline": self.cmdline,
            "events": self._connected,
            "cgroups": list(self.cgroups),
            # Where each hierarchy is mounted: replay serves the cgroups above from these.
            "cgroup_mounts": [attrs.asdict(m) for m in _mounts()],
            "window": self.window,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the trace (its file is created before ``started()``), then record until
        cancelled; the trace's ``end`` record is written on the way out."""
        self._t0 = trio.current_time()
        self.writer.open()  # a file that cannot be created fails here, not in a task
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[ProcEvent](4096)
            if self.events:
                try:
                    await nursery.start(ProcConnectorSource().run, send)
                    self._connected = True
                except (AccessDenied, OSError) as exc:
                    log.warning("trace: no process events (%s); snapshots only", exc)
            self.writer.start(self.header())
            try:
                await self._keyframe()
                if self._connected:
                    nursery.start_soon(self._follow, receive)
                task_status.started()
                await self._sample_forever()
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.writer.close, self.now())

    def record_kill(self, record: KillRecord) -> None:
        """Write a kill the running reaper made (``run --trace``): replay tells the kills the
        machine really saw from those a policy would have made."""
        self.writer.write({"t": self.now(), "k": "kill", "record": record.as_json()})

    # -- sampling --------------------------------------------------------------------------

    async def _sample_forever(self) -> None:
        next_snapshot = trio.current_time() + SNAPSHOT_INTERVAL[0]
        while self.writer.failed is None:
            headroom, to_line = self._sample()
            now = trio.current_time()
            if self.window is not None and now - self._segment_started >= self.window / 2:
                await self._rotate()
            elif now >= next_snapshot:
                await self._snapshot(keyframe=False)
            elif self._execs:
                await self._read_new()
            if now >= next_snapshot:
                interval = headroom / self.snapshot_fill_rate
                next_snapshot = now + _clamp(interval, SNAPSHOT_INTERVAL)
            # As dense as the policy's own sampler near its lines; 10 ms at the most elsewhere.
            await trio.sleep(
                min(
                    _clamp(headroom / self.mem_fill_rate, MEM_INTERVAL),
                    _clamp(to_line / self.mem_fill_rate, LINE_INTERVAL),
                )
            )
        log.warning("trace %s: stopped: %s", self.writer.path, self.writer.failed)

    def _sample(self, *, every: bool = False) -> tuple[int, float]:
        """Write ``mem``, and the ``psi`` and ``cgroup`` records that changed (all: ``every``);
        return the headroom in bytes (MemAvailable, or less where a recorded cgroup is closer
        to its limit) and the distance to the nearest line of the policies recorded for."""
        self._samples += 1
        t = self.now()
        psi_due = every or trio.current_time() - self._psi_read >= PSI_INTERVAL
        meminfo = self.procfs.meminfo()
        self._swap = meminfo.swap_total > 0
        self.writer.write(
            {
                "t": t,
                "k": "mem",
                "total": meminfo.total // KiB,
                "avail": meminfo.available // KiB,
                "free": meminfo.free // KiB,
                "swap_total": meminfo.swap_total // KiB,
                "swap_free": meminfo.swap_free // KiB,
            }
        )
        if psi_due:  # at most every 50 ms: the kernel checks a trigger every window/10 >= 50 ms
            self._psi_read = trio.current_time()
        for resource in PSI_RESOURCES if psi_due else ():
            psi = _pressure(f"{self.procfs.root}/pressure/{resource}")
            if psi is not None:
                self._changed_record(
                    f"psi {resource}", t, {"k": "psi", "res": resource, **psi}, every
                )
        headroom = meminfo.available
        #: path -> (usage, limit) in bytes, as sampled now
        sampled: dict[str, tuple[int, int]] = {}
        for path in self.cgroups:
            cgroup = self._cgroup(path, meminfo.total)
            if cgroup is not None:
                self._changed_record(
                    f"cgroup {path}", t, {"k": "cgroup", "path": path, **cgroup}, every
                )
                sampled[path] = (cgroup["usage"] * KiB, cgroup["limit"] * KiB)
                headroom = min(headroom, (cgroup["limit"] - cgroup["usage"]) * KiB)
        # No line recorded for: none is near (the 2 ms floor is for a policy's own lines).
        to_line = min((_distance(line, meminfo, sampled) for line in self.lines), default=math.inf)
        return max(0, headroom), max(0, to_line)

    def _cgroup(self, path: str, mem_total: int) -> dict[str, Any] | None:
        """A recorded cgroup's figures now, or ``None`` if it cannot be read (removed, or not
        a memory cgroup): its files are looked for again at the next sample."""
        try:
            files = self._cgroup_files.get(path) or CgroupMemoryFiles(path)
            sample = files.sample(mem_total)
            events = _events(files.events_path) if files.events_path else None
            pressure = _pressure(os.path.join(path, "memory.pressure"))
        except (OSError, ValueError):
            self._cgroup_files.pop(path, None)
            return None
        self._cgroup_files[path] = files
        return {
            "v": files.version,
            "usage": sample.value // KiB,
            "limit": sample.total // KiB,
            "events": events,
            "pressure": pressure,
        }

    def _changed_record(self, key: str, t: float, record: dict[str, Any], every: bool) -> None:
        if every or self._last.get(key) != record:
            self._last[key] = record
            self.writer.write({"t": t, **record})

    async def _rotate(self) -> None:
        self._segment += 1
        self._segment_started = trio.current_time()
        if self.writer.rotate(self.header()):
            await self._keyframe()
        else:
            self._segment -= 1  # the disk is behind: the segment goes on, a later try

    async def _keyframe(self) -> None:
        """Every figure and every process afresh: a segment reads on its own."""
        self._segment_started = trio.current_time()
        self._sample(every=True)
        await self._snapshot(keyframe=True)

    async def _read_new(self) -> None:
        """Read the processes that exec'd since the last sample now, not at the next
        snapshot: a short-lived hog must be in the trace."""
        self._forget(self._take_exited())
        t = self.now()
        pids, self._execs = self._execs, set()
        records = await trio.to_thread.run_sync(self._read_some, t, pids)
        self._write_read(records)

    def _read_some(self, t: float, pids: set[int]) -> list[dict[str, Any]]:
        records = []
        for pid in sorted(pids):
            try:
                key, fields = self._read_process(pid, pids, swap=self._swap, slow=True)
            except (NoSuchProcess, AccessDenied, ProcFormatError):
                continue
            if key is None:
                continue
            before = self._known.get(key, {})
            delta = {k: v for k, v in fields.items() if before.get(k) != v}
            self._known[key] = {**before, **fields}
            if delta:
                records.append({"t": t, "k": "proc", "pid": key[0], "start": key[1], **delta})
        return records

    async def _snapshot(self, *, keyframe: bool) -> None:
        """Read every process (on a worker thread). A keyframe writes each in full (a segment
        of a rolling trace reads on its own) and the exits since the snapshot before."""
        self._snapshots += 1
        # Exits the connector told since the last read: a process still there (the connector
        # reports a leader's pthread_exit, a thread's execve as exits too) is written afresh.
        self._forget(self._take_exited())
        t = self.now()
        changed, self._changed = self._changed, set()
        self._execs.clear()
        read = functools.partial(
            self._read_processes,
            t,
            changed,
            swap=self._swap,
            slow=keyframe or self._snapshots % SLOW_EVERY == 0,
            full=keyframe,
        )
        self._write_read(await trio.to_thread.run_sync(read))

    def _take_exited(self) -> set[int]:
        exited, self._exited = self._exited, set()
        return exited

    def _forget(self, pids: set[int]) -> None:
        """Forget what was written of ``pids``: if they are still there, the next read writes
        them in full."""
        if pids:
            for key in [k for k in self._known if k[0] in pids]:
                del self._known[key]

    def _write_read(self, records: list[dict[str, Any]]) -> None:
        """Write what a read on the worker thread found, but the ``proc`` records of processes
        whose exit the connector told meanwhile: read before it, they would bring a dead
        process back after its ``exit`` record."""
        gone = self._take_exited()
        self._forget(gone)
        for record in records:
            if not (gone and record["k"] == "proc" and record["pid"] in gone):
                self.writer.write(record)

    def _read_processes(
        self,
        t: float,
        changed: set[int],
        *,
        swap: bool = True,
        slow: bool = True,
        full: bool = False,
    ) -> list[dict[str, Any]]:
        """One snapshot, on a worker thread: an ``exit`` for each process gone, then a
        ``proc`` record for each one new or changed since the last (each in full: ``full``).
        Exits first: a PID reused since is a new process after its predecessor's exit."""
        records: list[dict[str, Any]] = []
        seen: dict[tuple[int, int], dict[str, Any]] = {}
        everyone = _Everyone() if full else changed
        kthreads = self._kthreads if not slow else set()
        for pid in self.procfs.pids():
            if pid in kthreads and pid not in changed:
                continue  # a kernel thread when last read (a fork of its pid is a change)
            try:
                key, fields = self._read_process(pid, everyone, swap=swap, slow=slow)
            except (NoSuchProcess, AccessDenied, ProcFormatError):
                continue  # gone between two reads, or not ours to read: the next one tells
            if key is None:
                kthreads.add(pid)
                continue
            before = self._known.get(key)
            if before is None or full:
                delta = fields
            else:
                delta = {k: v for k, v in fields.items() if before.get(k) != v}
                fields = {**before, **fields}
            seen[key] = fields
            if delta:
                records.append({"t": t, "k": "proc", "pid": key[0], "start": key[1], **delta})
        exits = [
            {"t": t, "k": "exit", "pid": pid, "start": start}
            for pid, start in sorted(self._known.keys() - seen.keys())
        ]
        self._known = seen
        self._kthreads = kthreads
        return exits + records

    def _read_process(
        self, pid: int, changed: set[int], *, swap: bool, slow: bool
    ) -> tuple[tuple[int, int] | None, dict[str, Any]]:
        procfs = self.procfs
        start, comm, ppid, state, rss, flags = procfs.selection_stat(pid)
        if flags & PF_KTHREAD:
            return None, {}
        key = (pid, start)
        fields: dict[str, Any] = {
            "comm": comm,
            "ppid": ppid,
            "state": state,
            "rss": rss // KiB,
            "score": procfs.oom_score(pid),
            "adj": procfs.oom_score_adj(pid),
        }
        if swap:  # without swap VmSwap is 0: one read fewer per process
            fields["swap"] = (procfs.vm_swap(pid) or 0) // KiB
        # What changes rarely (credentials, cgroup) or only at exec (program, arguments) is
        # read at first sight, after an exec or a comm change, and every SLOW_EVERY snapshots.
        if key not in self._known or pid in changed or slow:
            fields["uid"] = procfs.status(pid).uids[0]
            fields["cgroup"] = procfs.read_bytes(f"{pid}/cgroup").decode("utf-8", "surrogateescape")
        if key not in self._known or pid in changed:
            fields["exe"] = procfs.exe(pid)
            if self.cmdline:
                fields["cmdline"] = list(procfs.cmdline(pid))
        return key, fields

    # -- process events --------------------------------------------------------------------

    async def _follow(self, receive: trio.MemoryReceiveChannel[ProcEvent]) -> None:
        async with receive:
            async for event in receive:
                t = self.now()
                if isinstance(event, ProcFork):
                    self._changed.add(event.child_pid)
                    record = {"k": "fork", "pid": event.child_pid, "ppid": event.parent_pid}
                elif isinstance(event, ProcExec):
                    self._changed.add(event.pid)
                    self._execs.add(event.pid)
                    record = {"k": "exec", "pid": event.pid}
                elif isinstance(event, ProcComm):
                    self._changed.add(event.pid)
                    record = {"k": "comm", "pid": event.pid, "comm": event.comm}
                elif isinstance(event, ProcExit):
                    self._exited.add(event.pid)
                    record = {"k": "exit", "pid": event.pid}
                else:
                    continue  # lost events: the next snapshot resynchronises
                self.writer.write({"t": t, **record})


def _distance(
    line: MemoryThreshold, meminfo: MemInfo, sampled: Mapping[str, tuple[int, int]]
) -> float:
    """Bytes between ``line`` and its value now, on either side (``sampled``: each recorded
    cgroup's usage and limit)."""
    if line.metric == "cgroup_usage":
        if line.cgroup is None or line.cgroup not in sampled:
            return math.inf  # a cgroup not recorded (or not readable now): no line near
        usage, limit = sampled[line.cgroup]
        return abs(line.line.resolve(limit) - usage)
    value, total = (
        (meminfo.available, meminfo.total)
        if line.metric == "mem_available"
        else (meminfo.swap_free, meminfo.swap_total)
    )
    return abs(value - line.line.resolve(total)) if total else math.inf


def policy_lines(policy: Policy) -> list[MemoryThreshold]:
    """The memory lines ``policy``'s rules watch."""
    found: dict[MemoryThreshold, None] = {}
    for rule in policy.rules:
        for cond in rule.when:
            if isinstance(cond, MemoryCondition):
                found[cond.threshold] = None
    return list(found)


def policy_cgroups(policy: Policy) -> list[str]:
    """The memory cgroup directories ``policy`` reads: its rules' ``cgroup_usage`` lines, cgroup
    scopes and ``pressure_cgroup`` pressure files."""
    found: dict[str, None] = {}
    for rule in policy.rules:
        for cond in rule.when:
            if isinstance(cond, MemoryCondition) and cond.threshold.cgroup is not None:
                found[cond.threshold.cgroup] = None
            elif isinstance(cond, PressureCondition) and not cond.spec.path.startswith("/proc/"):
                found[os.path.dirname(cond.spec.path)] = None
        if isinstance(rule.guard.scope, CgroupScope):
            found[rule.guard.scope.directory] = None
    return list(found)


def _mounts() -> tuple[CgroupMount, ...]:
    try:
        return cgroup_mounts()
    except OSError:
        return ()


def _pressure(path: str) -> dict[str, Any] | None:
    try:
        snapshot = parse_pressure(read_file(path))
    except (OSError, ValueError):
        return None  # no PSI here (kernel built without it, or psi=0)
    full = snapshot.full
    return {
        "some": snapshot.some.total_us,
        "full": full.total_us if full else None,
        "avg10": [snapshot.some.avg10, full.avg10 if full else None],
    }


def _events(path: str) -> dict[str, int]:
    pairs = (line.split() for line in read_file(path).splitlines())
    return {k.decode(): int(v) for k, v in pairs}

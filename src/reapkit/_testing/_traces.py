"""Synthetic traces for tests of whole incidents (``reapkit.testing.TraceBuilder``).

A builder holds a machine (memory, swap, processes) and the incidents that happen to it — a
leak growing at a given rate, a thrashing page cache, a fork storm — and writes the trace that
``reapkit record`` would have written of it: ``mem`` and ``psi`` samples every ``interval``
seconds, process snapshots as things change. Deterministic: the same calls give the same trace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Final

import attrs

from .._replay import ReplayResult, replay_trace
from .._trace import FORMAT, VERSION, Trace, read_trace, write_trace
from .._units import parse_bytes


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read the trace at ``path`` (``reapkit record``, ``run --trace``; its ``PATH.1`` first
    when there is one). Raises :class:`reapkit.lowlevel.TraceError` naming file and line."""
    return read_trace(os.fspath(path))


def replay(
    policy: str | os.PathLike[str] | None,
    trace: Trace | str | os.PathLike[str],
    *,
    text: str | None = None,
) -> ReplayResult:
    """What the policy at ``policy`` (or in ``text``; the default with neither) would have
    done over ``trace``, as ``reapkit replay`` shows it (see
    :func:`reapkit.lowlevel.replay_trace`)."""
    return replay_trace(policy, trace, text=text)


KiB: Final = 1024
_PAGE: Final = 4096


def _kib(size: str | int) -> int:
    return parse_bytes(size) // KiB


@attrs.define
class _Process:
    pid: int
    start: int
    comm: str
    cmdline: list[str]
    uid: int
    rss: int  # KiB
    adj: int
    cgroup: str
    exe: str
    appears: float
    exits: float | None = None
    ppid: int = 1


@attrs.define
class _Leak:
    pid: int
    rate: int  # KiB per second
    start: float
    until: float


@attrs.define
class _Thrash:
    start: float
    until: float
    some: float
    full: float
    available: int  # KiB


#: Below this share of MemTotal available, tasks stall reclaiming (see _reclaim_stall).
RECLAIM_STALL_BELOW: Final = 0.05


def _reclaim_stall(avail: int, total: int) -> tuple[float, float]:
    """The share of time tasks stall on memory (some, full) with ``avail`` of ``total`` left
    and nothing else going on: none above 5 %, rising to 80 % (some) and 40 % (full) at 0 —
    direct reclaim scraping the last page cache, as a machine without swap running out does."""
    share = avail / total if total else 0.0
    if share >= RECLAIM_STALL_BELOW:
        return 0.0, 0.0
    depth = 1.0 - share / RECLAIM_STALL_BELOW
    return 0.8 * depth, 0.4 * depth


@attrs.define
class TraceBuilder:
    """A machine and its incidents, as a trace. Sizes take ``"512MiB"`` or bytes.

    Memory pressure follows MemAvailable as on a machine without swap: below 5 % of MemTotal
    tasks stall reclaiming, more the closer it gets to 0 (80 % of the time ``some``, 40 %
    ``full`` at 0); :meth:`thrashing_cache` adds stall with memory left."""

    mem_total: str | int = "8GiB"
    #: MemAvailable before any incident (the processes added count against it too).
    mem_available: str | int = "6GiB"
    swap_total: str | int = 0
    #: Seconds between two ``mem``/``psi`` samples.
    interval: float = 0.1
    _processes: dict[int, _Process] = attrs.field(factory=dict, init=False)
    _leaks: list[_Leak] = attrs.field(factory=list, init=False)
    _thrashes: list[_Thrash] = attrs.field(factory=list, init=False)
    _end: float = attrs.field(default=0.0, init=False)

    def process(
        self,
        pid: int,
        comm: str,
        *,
        rss: str | int = "16MiB",
        uid: int = 1000,
        oom_score_adj: int = 0,
        cmdline: list[str] | None = None,
        cgroup: str = "/user.slice",
        exe: str = "",
        at: float = 0.0,
        exits: float | None = None,
        ppid: int = 1,
    ) -> None:
        """A process (a child of ``ppid``) that appears at ``at`` (seconds) and lives until
        ``exits`` (or the end)."""
        self._processes[pid] = _Process(
            pid, 10_000 + pid + int(at * 100), comm, cmdline or [comm], uid, _kib(rss),
            oom_score_adj, cgroup, exe, at, exits, ppid,
        )  # fmt: skip
        self._end = max(self._end, at, exits or 0.0)

    def leak(self, pid: int, rate: str | int, *, start: float = 0.0, seconds: float = 10.0) -> None:
        """Process ``pid`` grows by ``rate`` (a size per second) from ``start`` for
        ``seconds``, or until memory runs out."""
        self._leaks.append(_Leak(pid, _kib(rate), start, start + seconds))
        self._end = max(self._end, start + seconds)

    def thrashing_cache(
        self,
        *,
        start: float = 0.0,
        seconds: float = 10.0,
        some: float = 0.4,
        full: float = 0.1,
        available: str | int = "5%",
    ) -> None:
        """From ``start`` for ``seconds`` tasks stall on memory ``some`` (and ``full``) of the
        time while MemAvailable stays at ``available`` (a size, or a percent of MemTotal):
        the page cache is read back as fast as it is evicted."""
        total = _kib(self.mem_total)
        if isinstance(available, str) and available.endswith("%"):
            avail = int(total * float(available[:-1]) / 100)
        else:
            avail = _kib(available)
        self._thrashes.append(_Thrash(start, start + seconds, some, full, avail))
        self._end = max(self._end, start + seconds)

    def fork_storm(
        self,
        parent: int,
        count: int,
        *,
        start: float = 0.0,
        seconds: float = 5.0,
        rss: str | int = "4MiB",
        lifetime: float = 0.5,
        comm: str = "worker",
    ) -> None:
        """``count`` children of ``parent`` appear evenly from ``start`` over ``seconds``,
        each living ``lifetime`` seconds."""
        first = max(self._processes, default=1000) + 1
        for i in range(count):
            at = round(start + seconds * i / count, 3)
            self.process(
                first + i, comm, rss=rss, at=at, exits=round(at + lifetime, 3), ppid=parent
            )

    def build(self) -> Trace:
        """The trace, as :func:`reapkit.testing.load_trace` would read it."""
        records = tuple(self._records())
        return Trace("<TraceBuilder>", self._header(), records[:-1], truncated=False, lost=0)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the trace to ``path`` in the format ``reapkit record`` writes, every record
        (here, not through the recorder's writer, which drops records rather than wait)."""
        write_trace(os.fspath(path), self._header(), self._records())

    def _header(self) -> dict[str, Any]:
        return {
            "k": "header", "format": FORMAT, "version": VERSION, "recording": "synthetic",
            "segment": 0, "started": 1_700_000_000.0, "hostname": "synthetic",
            "kernel": "synthetic", "page_size": _PAGE, "cmdline": True, "events": False,
            "cgroups": [], "window": None,
        }  # fmt: skip

    def _rss(self, p: _Process, t: float) -> int:
        grown = sum(
            leak.rate * (min(t, leak.until) - leak.start)
            for leak in self._leaks
            if leak.pid == p.pid and t > leak.start
        )
        return int(p.rss + grown) // 4 * 4  # whole pages

    def _records(self) -> Iterator[dict[str, Any]]:
        total = _kib(self.mem_total)
        base = _kib(self.mem_available)
        swap = _kib(self.swap_total)
        written: dict[int, dict[str, Any]] = {}
        some = full = 0.0
        last_psi: dict[str, Any] | None = None
        steps = round((self._end + self.interval) / self.interval)
        for step in range(steps + 1):
            t = round(step * self.interval, 3)
            alive = [
                p
                for p in self._processes.values()
                if p.appears <= t and (p.exits is None or t < p.exits)
            ]
            used = sum(self._rss(p, t) - (p.rss if p.appears == 0 else 0) for p in alive)
            avail = max(0, base - used)
            thrash = next((x for x in self._thrashes if x.start <= t < x.until), None)
            stall_some, stall_full = _reclaim_stall(avail, total)
            if thrash is not None:
                avail = min(avail, thrash.available)
                stall_some = max(stall_some, thrash.some)
                stall_full = max(stall_full, thrash.full)
            some += stall_some * self.interval * 1e6
            full += stall_full * self.interval * 1e6
            yield {
                "t": t, "k": "mem", "total": total, "avail": avail, "free": avail,
                "swap_total": swap, "swap_free": swap,
            }  # fmt: skip
            psi = {
                "res": "memory", "some": int(some), "full": int(full),
                "avg10": [round(100 * stall_some, 2), round(100 * stall_full, 2)],
            }  # fmt: skip
            if psi != last_psi:  # as ``record`` does: when the totals or averages moved
                last_psi = psi
                yield {"t": t, "k": "psi", **psi}
            for p in alive:
                rss = self._rss(p, t)
                fields = {
                    "comm": p.comm, "ppid": p.ppid, "state": "R" if rss != p.rss else "S",
                    "uid": p.uid, "rss": rss, "swap": 0,
                    "score": max(0, min(2000, 1000 * rss // total + p.adj)), "adj": p.adj,
                    "cgroup": f"0::{p.cgroup}\n",
                }  # fmt: skip
                before = written.get(p.pid)
                if before is None:
                    delta = {**fields, "exe": p.exe, "cmdline": p.cmdline}
                else:
                    delta = {k: v for k, v in fields.items() if before.get(k) != v}
                written[p.pid] = fields
                if delta:
                    yield {"t": t, "k": "proc", "pid": p.pid, "start": p.start, **delta}
            for pid in [pid for pid in written if pid not in {p.pid for p in alive}]:
                del written[pid]
                yield {"t": t, "k": "exit", "pid": pid, "start": self._processes[pid].start}
        yield {"t": round((steps + 1) * self.interval, 3), "k": "end"}

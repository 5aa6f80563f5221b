"""The live process table: which processes exist, kept current by the proc connector.

Seeded by one scan of ``/proc``, then updated from :mod:`proc connector events
<reapkit._sources.proc_connector>`: a fork adds the child (remembering its parent), an exit
removes the process, an exec or a name change marks it changed. Hot attributes (RSS,
``oom_score``, ...) are deliberately *not* kept: they go stale at once, so victim selection
reads them from ``/proc`` when it needs them. An entry is a pid and its parent, nothing more.

What "exists" means: a process that has not begun to exit. The kernel sends the exit event
once the process has set ``PF_EXITING`` and before it becomes a zombie, and an exiting process
is no candidate (the guard refuses it), so scans leave out ``/proc`` entries in state ``Z`` or
``X`` or with ``PF_EXITING``. This matters for correctness, not only for size: a zombie found
by a scan whose exit event came earlier would otherwise stay in the table forever (its reaping
sends no event).

Known limit, from the kernel's events: a process whose leader thread exited first
(``pthread_exit`` in ``main``) while other threads run on is reported gone at the leader's
exit; its ``/proc`` entry shows the leader as a zombie, so scans agree, and the table does not
list it although its threads still hold memory. (The last thread's exit carries no process
event, so keeping it would leak the entry.)

Races and ordering. :meth:`ProcessTable.serve` subscribes *before* the seed scan, so a fork
between the scan and the subscription cannot be missed; the events queued meanwhile are
applied after the scan, in kernel order, and applying them again to a state that already
includes them is harmless (a fork sets the entry, an exit removes it if present). After the
kernel dropped events (``ENOBUFS``) it still delivers what it had buffered *before* the loss,
possibly after the rescan: a fork whose exit was dropped would then add a process long gone.
So an event the kernel stamped before the last scan began is ignored: the scan already shows
its effect (a forked child is visible before its fork event is sent; a process whose exit
event was sent is exiting, a zombie or gone, all left out). The kernel stamps events with the
host's ``CLOCK_MONOTONIC``, which a time namespace offsets: the scan's time is translated by
the offset ``/proc/self/timens_offsets`` gives, and when it cannot be read the filter is off
(a stale fork may then add a process that is gone, until the next resync).

Without the connector (no ``CAP_NET_ADMIN``, not in the initial namespaces, netlink blocked)
the table says so once (a warning on the ``reapkit.table`` logger) and works in ``"scan"``
mode: every read rescans ``/proc``, at most once per ``min_rescan_interval`` (100 ms by
default; a read within that interval sees the previous scan). A table that is not being
served is in ``"scan"`` mode too.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import attrs
import trio

from ._errors import AccessDenied, NoSuchProcess, ProcFormatError
from ._procfs import DEAD_STATES, PF_EXITING, ProcFS
from ._sources.proc_connector import (
    ProcConnectorSource,
    ProcEvent,
    ProcEventsLost,
    ProcExit,
    ProcFork,
)

__all__ = ["ProcessTable", "TableStatistics"]

log = logging.getLogger("reapkit.table")

TableMode = Literal["connector", "scan"]


def monotonic_offset_ns(path: str = "/proc/self/timens_offsets") -> int | None:
    """How far this time namespace's ``CLOCK_MONOTONIC`` is ahead of the host's (0 without
    time namespaces); ``None`` when it cannot be told."""
    try:
        with open(path, "rb") as f:
            for line in f:
                name, seconds, nanoseconds = line.split()
                if name == b"monotonic":
                    return int(seconds) * 1_000_000_000 + int(nanoseconds)
    except FileNotFoundError:
        return 0  # a kernel without time namespaces
    except (OSError, ValueError):
        pass
    return None


@attrs.frozen
class TableStatistics:
    """A snapshot of a :class:`ProcessTable`'s counters."""

    #: Processes in the table.
    processes: int
    #: Process events applied (fork, exec, comm, exit).
    events_seen: int
    #: Times the kernel dropped events (:class:`~reapkit._sources.proc_connector.ProcEventsLost`).
    overruns: int
    #: Rescans of ``/proc`` made to recover from lost events.
    resyncs: int
    #: ``"connector"`` while kept current by events, ``"scan"`` while scanning on demand.
    mode: TableMode


@attrs.define(eq=False)
class ProcessTable:
    """The set of live processes, and the parent each was forked by.

    Run :meth:`serve` in a nursery (``table = await nursery.start(ProcessTable().serve)``);
    read with :meth:`pids`, ``pid in table``, ``len(table)``, :meth:`parent`.
    """

    #: Where to scan.
    procfs: ProcFS = attrs.field(factory=ProcFS)
    #: The event source :meth:`serve` runs (a test may give one with a tiny buffer).
    source: ProcConnectorSource = attrs.field(factory=ProcConnectorSource)
    #: Capacity of the channel between the source and the table.
    channel_size: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    #: In ``"scan"`` mode, reads rescan ``/proc`` at most this often (seconds).
    min_rescan_interval: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    #: This namespace's monotonic clock minus the host's, which stamps events (``None``:
    #: unknown, events are not compared with the last scan).
    monotonic_offset_ns: int | None = attrs.field(factory=monotonic_offset_ns)

    # pid -> the pid of its parent when it was forked or found by a scan (0: unknown or none).
    _parents: dict[int, int] = attrs.field(factory=dict, init=False)
    # pids forked, exec'd or renamed since the last take_changed().
    _changed: set[int] = attrs.field(factory=set, init=False)
    _mode: TableMode = attrs.field(default="scan", init=False)
    # Events were lost and no rescan happened since: rescan before the next read.
    _stale: bool = attrs.field(default=False, init=False)
    _last_scan: float = attrs.field(default=-math.inf, init=False)
    # CLOCK_MONOTONIC ns when the last scan began: events the kernel sent earlier are in it.
    _scanned_ns: int = attrs.field(default=0, init=False)
    _warned: bool = attrs.field(default=False, init=False)
    _events_seen: int = attrs.field(default=0, init=False)
    _overruns: int = attrs.field(default=0, init=False)
    _resyncs: int = attrs.field(default=0, init=False)

    # -- reading -------------------------------------------------------------------------------

    @property
    def mode(self) -> TableMode:
        return self._mode

    def pids(self) -> frozenset[int]:
        """The live processes (thread-group ids)."""
        return frozenset(self._current())

    def __contains__(self, pid: object) -> bool:
        return pid in self._current()

    def __len__(self) -> int:
        return len(self._current())

    def parent(self, pid: int) -> int | None:
        """The parent ``pid`` was forked by (or had when a scan found it); ``None`` if ``pid``
        is not in the table or its parent is unknown or none (pid 1 and ``kthreadd``).

        Not updated when the process is reparented (its parent exited): read ``stat`` for
        the current parent. Unknown after an ``execve`` from a thread other than the leader,
        which the kernel reports as the leader's exit followed by an exec.
        """
        return self._current().get(pid) or None

    def take_changed(self) -> frozenset[int]:
        """The processes that appeared, exec'd or changed their name since the last call
        (all of them after a rescan), and still exist; clears the set."""
        live = self._current()
        changed = frozenset(p for p in self._changed if p in live)
        self._changed = set()
        return changed

    def statistics(self) -> TableStatistics:
        return TableStatistics(
            processes=len(self._parents),
            events_seen=self._events_seen,
            overruns=self._overruns,
            resyncs=self._resyncs,
            mode=self._mode,
        )

    def _current(self) -> dict[int, int]:
        if self._mode == "connector":
            if self._stale:
                self.resync()
        elif time.monotonic() - self._last_scan >= self.min_rescan_interval:
            self._replace(self._scan())
        return self._parents

    # -- updating ------------------------------------------------------------------------------

    def apply(self, event: ProcEvent) -> None:
        """Apply one event. Idempotent for a state that already includes it.

        :class:`ProcEventsLost` marks the table stale: it is rescanned before the next read,
        or at the end of the current batch of events when served (one rescan per burst of
        losses, not one per loss).
        """
        if isinstance(event, ProcEventsLost):
            self._overruns += 1
            self._stale = True
            return
        if 0 < event.kernel_ns < self._scanned_ns and self.monotonic_offset_ns is not None:
            return  # sent before the last scan began: the scan shows its effect
        # Most frequent first: a storm is forks, execs and exits.
        if isinstance(event, ProcExit):
            self._events_seen += 1
            self._parents.pop(event.pid, None)
            self._changed.discard(event.pid)
        elif isinstance(event, ProcFork):
            self._events_seen += 1
            self._parents[event.child_pid] = event.parent_pid
            self._changed.add(event.child_pid)
        else:
            self._events_seen += 1
            # Unknown here only if its fork was lost or predates the table: the process
            # exists (it just acted), its parent is unknown.
            self._parents.setdefault(event.pid, 0)
            self._changed.add(event.pid)

    def resync(self) -> None:
        """Rescan ``/proc`` now and replace the table with what it found; counted as a resync."""
        self._resyncs += 1
        self._replace(self._scan())

    def _replace(self, found: dict[int, int]) -> None:
        self._parents = found
        self._changed = set(found)
        self._stale = False

    def _scan(self) -> dict[int, int]:
        """Every live process and its parent, from ``/proc/<pid>/stat``."""
        procfs = self.procfs
        found: dict[int, int] = {}
        self._scanned_ns = time.monotonic_ns() - (self.monotonic_offset_ns or 0)
        for pid in procfs.pids():
            try:
                stat = procfs.stat(pid)
            except NoSuchProcess:
                continue  # exited since the listing
            except (AccessDenied, ProcFormatError):
                found[pid] = 0  # it exists; its parent is unknown
                continue
            if stat.state not in DEAD_STATES and not stat.flags & PF_EXITING:
                found[pid] = stat.ppid
        self._last_scan = time.monotonic()
        return found

    # -- serving -------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[ProcessTable] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the table current until cancelled; ``started(self)`` once it is seeded.

        Without the connector (the source raised ``OSError``, e.g.
        :class:`~reapkit.AccessDenied`, before it started) logs one warning per table, starts
        in ``"scan"`` mode and waits to be cancelled. An error of the source after it started
        propagates. When it returns the table is back in ``"scan"`` mode.
        """
        send, receive = trio.open_memory_channel[ProcEvent](self.channel_size)
        async with trio.open_nursery() as nursery, receive:
            try:
                await nursery.start(self.source.run, send)
            except OSError as exc:  # AccessDenied is a PermissionError
                self._without_connector(exc)
                task_status.started(self)
                await trio.sleep_forever()
            try:
                # Subscribed first, then scanned: see the module docstring.
                self._replace(self._scan())
                self._mode = "connector"
                task_status.started(self)
                await self._consume(receive)
            finally:
                self._mode = "scan"
                self._last_scan = -math.inf  # the next read rescans
                nursery.cancel_scope.cancel()

    def _without_connector(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "the process table cannot use the proc connector (%s): it scans /proc on"
                " demand instead, at most every %g s",
                exc,
                self.min_rescan_interval,
            )
        self._mode = "scan"
        self._last_scan = -math.inf

    async def _consume(self, receive: trio.MemoryReceiveChannel[ProcEvent]) -> None:
        apply = self.apply
        receive_nowait = receive.receive_nowait
        while True:
            try:
                apply(await receive.receive())
                # Drain what is queued without a checkpoint per event.
                while True:
                    apply(receive_nowait())
            except trio.WouldBlock:
                pass
            except trio.EndOfChannel:
                return
            if self._stale:
                self.resync()

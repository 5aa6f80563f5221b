"""ProcessTable without the kernel: synthetic events, a fake /proc, a scripted source."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import reapkit._table as table_module
from reapkit._procfs import PF_EXITING, ProcFS
from reapkit._sources.proc_connector import (
    ProcComm,
    ProcEvent,
    ProcEventsLost,
    ProcExec,
    ProcExit,
    ProcFork,
)
from reapkit._table import ProcessTable, TableStatistics
from reapkit.testing import FakeProc

T = 0.0  # timestamps do not matter to the table


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path / "proc")
    fake.add_process(1, comm="init", ppid=0)
    fake.add_process(2, comm="kthreadd", ppid=0, flags=0x00200000)
    fake.add_process(100, comm="shell", ppid=1)
    return fake


def seeded(fake: FakeProc, **kwargs: object) -> ProcessTable:
    table = ProcessTable(procfs=ProcFS(fake.root), **kwargs)  # type: ignore[arg-type]
    table.resync()
    return table


def test_a_new_table_scans_on_demand(fake: FakeProc) -> None:
    table = ProcessTable(procfs=ProcFS(fake.root))
    assert table.mode == "scan"
    assert table.pids() == {1, 2, 100}
    assert table.statistics() == TableStatistics(
        processes=3, events_seen=0, overruns=0, resyncs=0, mode="scan"
    )


def test_the_scan_reads_parents_and_leaves_out_zombies(fake: FakeProc) -> None:
    fake.add_process(101, ppid=100, state="Z")
    fake.add_process(102, ppid=100, state="X")
    fake.add_process(103, ppid=100, state="D")
    fake.write("104/stat", b"garbage\n")  # unreadable: kept, parent unknown
    table = seeded(fake)
    assert table.pids() == {1, 2, 100, 103, 104}
    assert table.parent(100) == 1
    assert table.parent(103) == 100
    assert table.parent(104) is None
    assert table.parent(1) is None  # ppid 0: none
    assert table.parent(101) is None  # not in the table


def test_fork_adds_exit_removes(fake: FakeProc) -> None:
    table = seeded(fake)
    table._mode = "connector"  # as if served: reads do not rescan
    table.apply(ProcFork(T, parent_pid=100, child_pid=200))
    assert 200 in table
    assert table.parent(200) == 100
    assert len(table) == 4
    table.apply(ProcExit(T, pid=200, exit_code=0, exit_signal=17))
    assert 200 not in table
    assert table.parent(200) is None
    assert table.statistics().events_seen == 2


def test_events_are_idempotent(fake: FakeProc) -> None:
    table = seeded(fake)
    table._mode = "connector"
    table.apply(ProcFork(T, 100, 200))
    table.apply(ProcFork(T, 100, 200))
    assert table.pids() == {1, 2, 100, 200}
    table.apply(ProcExit(T, 200, 0, 17))
    table.apply(ProcExit(T, 200, 0, 17))
    table.apply(ProcExit(T, 999, 0, 17))  # never seen: nothing to remove
    assert table.pids() == {1, 2, 100}


def test_exec_and_comm_mark_changed(fake: FakeProc) -> None:
    table = seeded(fake)
    table._mode = "connector"
    assert table.take_changed() == {1, 2, 100}  # everything, after a scan
    assert table.take_changed() == frozenset()
    table.apply(ProcExec(T, 100))
    table.apply(ProcComm(T, 1, "init2"))
    table.apply(ProcFork(T, 100, 200))
    table.apply(ProcFork(T, 100, 201))
    table.apply(ProcExit(T, 201, 0, 17))  # gone: not reported
    assert table.take_changed() == {1, 100, 200}
    assert table.take_changed() == frozenset()
    assert table.statistics().events_seen == 5


def test_events_the_kernel_sent_before_the_last_scan_change_nothing(fake: FakeProc) -> None:
    # After ENOBUFS the kernel still delivers what it buffered before the loss, possibly after
    # the rescan: a fork whose exit was dropped must not add a process long gone.
    fake.add_process(101, ppid=100, flags=PF_EXITING)  # exit event sent, not yet a zombie
    fake.add_process(102, ppid=100, state="Z")
    table = seeded(fake)
    table._mode = "connector"
    assert table.pids() == {1, 2, 100}
    before = time.monotonic_ns() - 1_000_000
    table.apply(ProcFork(T, 100, 102, kernel_ns=before))
    table.apply(ProcExec(T, 102, kernel_ns=before))
    table.apply(ProcComm(T, 101, "x", kernel_ns=before))
    table.apply(ProcExit(T, 100, 0, 17, kernel_ns=before))
    assert table.pids() == {1, 2, 100}
    assert table.statistics().events_seen == 0
    after = time.monotonic_ns()
    table.apply(ProcFork(T, 100, 200, kernel_ns=after))
    table.apply(ProcExit(T, 200, 0, 17, kernel_ns=after))
    table.apply(ProcFork(T, 100, 201, kernel_ns=after))
    assert table.pids() == {1, 2, 100, 201}


@pytest.mark.parametrize(
    ("offsets", "expected"),
    [
        (b"monotonic           0         0\nboottime            0         0\n", 0),
        (b"monotonic        1000       500\nboottime            0         0\n", 1_000_000_000_500),
        (b"monotonic       -5         0\n", -5_000_000_000),
        (b"garbled\n", None),
        (None, 0),  # no such file: a kernel without time namespaces
    ],
)
def test_the_time_namespace_offset_is_read(
    tmp_path: Path, offsets: bytes | None, expected: int | None
) -> None:
    path = tmp_path / "timens_offsets"
    if offsets is not None:
        path.write_bytes(offsets)
    assert table_module.monotonic_offset_ns(str(path)) == expected


@pytest.mark.parametrize("offset", [1000 * 10**9, None])
def test_events_stamped_by_the_host_clock_count_inside_a_time_namespace(
    fake: FakeProc, offset: int | None
) -> None:
    # The kernel stamps events with the host's CLOCK_MONOTONIC; a time namespace 1000 s
    # ahead made every event look older than the scan, and the table never changed.
    table = seeded(fake, monotonic_offset_ns=offset)
    table._mode = "connector"
    host_now = time.monotonic_ns() - (offset or 0)
    table.apply(ProcFork(T, 100, 200, kernel_ns=host_now))
    assert 200 in table.pids()


def test_exec_of_an_unknown_process_adds_it(fake: FakeProc) -> None:
    table = seeded(fake)
    table._mode = "connector"
    table.apply(ProcExec(T, 300))
    table.apply(ProcComm(T, 301, "x"))
    assert {300, 301} <= table.pids()
    assert table.parent(300) is None
    table.apply(ProcFork(T, 100, 300))  # replayed after: the fork tells the parent
    assert table.parent(300) == 100


def test_lost_events_rescan_once_before_the_next_read(fake: FakeProc) -> None:
    table = seeded(fake)
    table._mode = "connector"
    table.apply(ProcFork(T, 100, 200))
    for _ in range(3):
        table.apply(ProcEventsLost(T))
    assert table.statistics().resyncs == 1  # only the seed so far: the rescan is lazy
    fake.add_process(300, ppid=100)
    fake.remove_process(100)
    assert table.pids() == {1, 2, 300}
    assert table.parent(300) == 100
    stats = table.statistics()
    assert (stats.overruns, stats.resyncs, stats.events_seen) == (3, 2, 1)
    table.pids()
    assert table.statistics().resyncs == 2  # not stale any more
    assert table.take_changed() == {1, 2, 300}


def test_scan_mode_rescans_at_most_once_per_interval(
    fake: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(table_module.time, "monotonic", lambda: now[0])
    table = ProcessTable(procfs=ProcFS(fake.root), min_rescan_interval=0.1)
    assert table.pids() == {1, 2, 100}
    fake.add_process(200)
    now[0] += 0.09
    assert 200 not in table  # the previous scan, 90 ms old
    now[0] += 0.02
    assert 200 in table
    assert table.statistics().resyncs == 0  # on-demand scans are not resyncs


def test_statistics_are_frozen(fake: FakeProc) -> None:
    stats = seeded(fake).statistics()
    assert stats == TableStatistics(processes=3, events_seen=0, overruns=0, resyncs=1, mode="scan")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.processes = 0  # type: ignore[misc]


# -- serve() with a scripted source ----------------------------------------------------------


@attrs.define
class ScriptedSource:
    """Stands in for ProcConnectorSource: starts, then forwards what the test gives it, in
    batches without a checkpoint between events (as the real one drains its socket)."""

    script: trio.MemoryReceiveChannel[ProcEvent]

    async def run(
        self,
        send: trio.MemorySendChannel[ProcEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with send, self.script:
            task_status.started()
            async for event in self.script:
                send.send_nowait(event)
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while True:
                        send.send_nowait(self.script.receive_nowait())


async def test_serve_seeds_then_applies_events_and_resyncs_once_per_burst(
    fake: FakeProc,
) -> None:
    script_send, script = trio.open_memory_channel[ProcEvent](100)
    table = ProcessTable(procfs=ProcFS(fake.root), source=ScriptedSource(script))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        assert await nursery.start(table.serve) is table
        assert table.mode == "connector"
        assert table.pids() == {1, 2, 100}
        # Events queued before the seed scan are applied again: harmless.
        script_send.send_nowait(ProcFork(T, 1, 100))
        script_send.send_nowait(ProcFork(T, 100, 200))
        await trio.testing.wait_all_tasks_blocked()
        assert table.pids() == {1, 2, 100, 200}
        assert table.parent(100) == 1

        fake.add_process(300, ppid=1)  # a fork the kernel dropped
        for _ in range(3):
            script_send.send_nowait(ProcEventsLost(T))
        script_send.send_nowait(ProcExit(T, 200, 0, 17))
        await trio.testing.wait_all_tasks_blocked()
        stats = table.statistics()
        assert (stats.overruns, stats.resyncs) == (3, 1)  # one rescan for the burst
        assert table.pids() == {1, 2, 100, 300}
        nursery.cancel_scope.cancel()
    assert table.mode == "scan"


async def test_serve_ends_when_the_source_ends(fake: FakeProc) -> None:
    script_send, script = trio.open_memory_channel[ProcEvent](100)
    table = ProcessTable(procfs=ProcFS(fake.root), source=ScriptedSource(script))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(table.serve)
        script_send.send_nowait(ProcFork(T, 1, 200))
        script_send.close()
    assert table.statistics().events_seen == 1
    assert table.mode == "scan"


# -- the seed race, as a property ------------------------------------------------------------


@attrs.frozen
class History:
    initial: dict[int, int]
    events: list[ProcEvent]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """A valid event history over a small pid space (so pids get reused)."""
    pid_space = range(10, 30)
    initial_pids = draw(st.sets(st.sampled_from(pid_space), max_size=8))
    live = {pid: 1 for pid in initial_pids}
    initial = dict(live)
    events: list[ProcEvent] = []
    for _ in range(draw(st.integers(0, 60))):
        free = [p for p in pid_space if p not in live]
        kinds = ["fork"] if free else []
        if live:
            kinds += ["exit", "exec", "comm"]
        if not kinds:
            break
        kind = draw(st.sampled_from(kinds))
        if kind == "fork":
            parent = draw(st.sampled_from([1, *live]))
            child = draw(st.sampled_from(free))
            live[child] = parent
            events.append(ProcFork(T, parent, child))
        else:
            pid = draw(st.sampled_from(sorted(live)))
            if kind == "exit":
                del live[pid]
                events.append(ProcExit(T, pid, 0, 17))
            elif kind == "exec":
                events.append(ProcExec(T, pid))
            else:
                events.append(ProcComm(T, pid, "x"))
    return History(initial, events)


def replay(initial: dict[int, int], events: list[ProcEvent]) -> dict[int, int]:
    live = dict(initial)
    for event in events:
        if isinstance(event, ProcFork):
            live[event.child_pid] = event.parent_pid
        elif isinstance(event, ProcExit):
            live.pop(event.pid, None)
    return live


@settings(max_examples=150, deadline=None)
@given(history=histories(), data=st.data())
def test_subscribe_then_scan_then_replay_is_exact(history: History, data: st.DataObject) -> None:
    """Subscribed at event j, scanned at event k >= j: applying events j.. to the scan gives
    the true final state, whatever j and k were."""
    n = len(history.events)
    k = data.draw(st.integers(0, n), label="scan after event")
    j = data.draw(st.integers(0, k), label="subscribed at event")
    at_scan = replay(history.initial, history.events[:k])
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeProc(tmp)
        for pid, ppid in at_scan.items():
            fake.add_process(pid, ppid=ppid)
        table = ProcessTable(procfs=ProcFS(fake.root), min_rescan_interval=math.inf)
        table.resync()
        table._mode = "connector"
        for event in history.events[j:]:
            table.apply(event)
        expected = replay(history.initial, history.events)
        assert table.pids() == set(expected)
        # The parent is the last fork's, or the scan's for processes older than the events.
        for pid, parent in expected.items():
            assert table.parent(pid) == parent

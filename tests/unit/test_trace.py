"""The trace format, its writer and reader, and replay over synthetic traces (no real kernel:
the served ``/proc`` is a directory, the clock is virtual)."""

from __future__ import annotations

import gzip
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reapkit._replay import replay_trace
from reapkit._testing._traces import TraceBuilder
from reapkit._trace import FORMAT, VERSION, TraceError, TraceWriter, read_trace, write_trace

HEADER = {"k": "header", "format": FORMAT, "version": VERSION, "recording": "r", "segment": 0}
KILL_AT_5 = """
[[rule]]
name = "low"
when = ["mem_available < 5%"]
scope = "system"
select = ["oom-score"]
actions = ["kill"]
"""


def _write(path: Path, records: list[dict[str, Any]], *, end: float | None = 9.0) -> None:
    writer = TraceWriter(str(path))
    writer.start(HEADER)
    for record in records:
        writer.write(record)
    if end is not None:
        writer.close(end)
    else:  # the writer's thread is a daemon: leave it, as a crash would, once it flushed
        _until(lambda: len(read_trace(str(path)).records) == len(records))


def _until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if done():
                return
        except TraceError:
            pass  # not flushed yet: not even its header
        assert time.monotonic() < deadline, "not within 10 s"
        time.sleep(0.05)


def _leak() -> TraceBuilder:
    trace = TraceBuilder(mem_total="8GiB", mem_available="6GiB")
    trace.process(100, "sshd", uid=0, rss="8MiB")
    trace.process(200, "editor", rss="400MiB")
    trace.process(300, "leaker", rss="100MiB")
    trace.leak(300, "1GiB", start=1.0, seconds=8.0)
    return trace


def test_a_trace_reads_back_as_written_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    path.write_bytes(b"")
    path.chmod(0o644)  # an existing file: its mode is made 0600 too
    _write(path, [{"t": 0.5, "k": "mem", "total": 8, "avail": 4, "free": 4, "swap_total": 0,
                   "swap_free": 0}])  # fmt: skip
    trace = read_trace(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert trace.header["recording"] == "r"
    assert [r["k"] for r in trace.records] == ["mem"]
    assert not trace.truncated and trace.lost == 0


def test_a_trace_cut_short_reads_up_to_its_last_flush(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    _write(path, [{"t": 0.1, "k": "exit", "pid": 5}], end=None)
    data = path.read_bytes()
    trace = read_trace(str(path))  # the writer never closed it: no end record
    assert trace.truncated and [r["k"] for r in trace.records] == ["exit"]
    path.write_bytes(data[: len(data) - 3])
    assert read_trace(str(path)).truncated


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not gzip at all", "not a gzip stream"),
        (gzip.compress(b""), "empty: not a reapkit trace"),
        (gzip.compress(b'{"k": "header", "format": "other"}\n'), "line 1: not a reapkit-trace"),
        (gzip.compress(json.dumps({**HEADER, "version": 99}).encode() + b"\n"), "version 99"),
        (gzip.compress(json.dumps(HEADER).encode() + b"\n{oops\n"), "line 2: not a JSON"),
        (gzip.compress(json.dumps(HEADER).encode() + b'\n{"t": 1, "k": "nope"}\n'), "line 2"),
        (gzip.compress(json.dumps(HEADER).encode() + b'\n{"t": 2, "k": "exit", "pid": 1}\n'
                       b'{"t": 1, "k": "exit", "pid": 1}\n'), "line 3: time 1"),
    ],
)  # fmt: skip
def test_a_malformed_trace_is_an_error_naming_file_and_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.trace"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=message) as info:
        read_trace(str(path))
    assert str(path) in str(info.value)


def test_a_missing_trace_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot open it"):
        read_trace(str(tmp_path / "nothing"))


def test_a_full_queue_loses_lines_and_says_so_in_a_gap_record(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    writer = TraceWriter(str(path), capacity=2)
    writer.open()  # the thread is not started yet: the queue fills
    for i in range(5):
        writer.write({"t": i / 10, "k": "exit", "pid": i + 1})
    assert writer.dropped == 3
    writer.start(HEADER)
    _until(lambda: writer.written == 3)  # the header and the two queued: the queue is empty
    writer.write({"t": 1.0, "k": "exit", "pid": 9})
    writer.close(2.0)
    trace = read_trace(str(path))
    assert [r["k"] for r in trace.records] == ["exit", "exit", "gap", "exit"]
    assert trace.lost == 3


def test_a_failed_write_ends_the_trace_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reapkit import _trace

    def full(self: object, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_trace._Segment, "write", full)
    writer = TraceWriter(str(tmp_path / "t.trace"))
    writer.start(HEADER)
    writer.close(1.0)
    assert writer.failed is not None and writer.failed.errno == 28
    writer.write({"t": 2.0, "k": "exit", "pid": 1})  # dropped quietly: failed already


def test_a_rolling_trace_reads_its_previous_segment_first(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    writer = TraceWriter(str(path))
    writer.start(HEADER)
    writer.write({"t": 1.0, "k": "exit", "pid": 1})
    writer.rotate({**HEADER, "segment": 1})
    writer.write({"t": 2.0, "k": "exit", "pid": 2})
    writer.close(3.0)
    assert (tmp_path / "t.trace.1").exists()
    assert [r["pid"] for r in read_trace(str(path)).records] == [1, 2]
    # A PATH.1 of another recording is not part of this trace.
    writer = TraceWriter(str(path))
    writer.start({**HEADER, "recording": "other"})
    writer.write({"t": 0.5, "k": "exit", "pid": 3})
    writer.close(1.0)
    assert [r["pid"] for r in read_trace(str(path)).records] == [3]


def test_a_builder_trace_round_trips_through_a_file(tmp_path: Path) -> None:
    built = _leak().build()
    path = tmp_path / "leak.trace"
    _leak().write(path)
    read = read_trace(str(path))
    assert [dict(r) for r in read.records] == [dict(r) for r in built.records]
    assert not read.truncated


def test_replay_kills_the_leaker_at_the_line_and_says_it_is_counterfactual() -> None:
    result = replay_trace(None, _leak().build(), text=KILL_AT_5)
    first = result.decisions[0]
    assert first.record.victim is not None and first.record.victim.comm == "leaker"
    assert first.record.outcome == "dry-run"
    # 6 GiB available, 5 % of 8 GiB = 410 MiB: crossed after ~5.6 s of 1 GiB/s from 1 s
    assert 6.4 < first.t < 6.8
    # The trace shows the leaker alive afterwards: the real machine did not make this kill.
    # Here the worlds part: later decisions are counterfactual, this one is not.
    assert first.happened is False and not first.counterfactual
    assert result.diverged_at == first.t
    assert all(d.counterfactual for d in result.decisions[1:])


def test_a_kill_the_trace_shows_happening_is_not_counterfactual() -> None:
    trace = _leak()
    trace.process(300, "leaker", rss="100MiB", exits=6.8)  # killed for real at 6.8 s
    result = replay_trace(None, trace.build(), text=KILL_AT_5)
    first = result.decisions[0]
    assert first.happened is True and not first.counterfactual
    assert result.diverged_at is None


def test_pressure_firings_come_from_the_recorded_totals() -> None:
    when = '["memory some 200ms/2s", "mem_available < 10%"]'
    policy = KILL_AT_5.replace('["mem_available < 5%"]', when)
    calm = TraceBuilder()
    calm.process(300, "reader", rss="1GiB")
    calm.thrashing_cache(start=1.0, seconds=5.0, some=0.05, available="8%")  # 100 ms per 2 s
    assert replay_trace(None, calm.build(), text=policy).decisions == ()
    thrash = TraceBuilder()
    thrash.process(300, "reader", rss="1GiB")
    thrash.thrashing_cache(start=1.0, seconds=5.0, some=0.4, available="8%")  # 800 ms per 2 s
    decisions = replay_trace(None, thrash.build(), text=policy).decisions
    assert decisions and decisions[0].record.victim is not None
    assert "memory some 200ms/2s (/proc/pressure/memory) fired" in decisions[0].record.condition
    assert 1.3 < decisions[0].t < 1.6  # 200 ms of stall takes 0.5 s at 40 %


def test_a_victim_of_replay_is_gone_from_the_served_proc() -> None:
    policy = KILL_AT_5.replace('actions = ["kill"]', 'actions = ["kill"]\ncooldown = "0s"')
    decisions = replay_trace(None, _leak().build(), text=policy).decisions
    victims = [d.record.victim.comm for d in decisions if d.record.victim is not None]
    assert victims[0] == "leaker"
    assert "leaker" not in victims[1:]  # the world without it: others next, counterfactual
    assert all(d.counterfactual for d in decisions[1:])


def test_a_fork_storm_appears_and_goes() -> None:
    trace = TraceBuilder()
    trace.process(1000, "shell")
    trace.fork_storm(1000, 20, start=1.0, seconds=1.0, lifetime=0.25)
    built = trace.build()
    appeared = {r["pid"] for r in built.records if r["k"] == "proc"} - {1000}
    exited = {r["pid"] for r in built.records if r["k"] == "exit"}
    assert len(appeared) == 20 and appeared == exited
    parents = {r["ppid"] for r in built.records if r["k"] == "proc" and r["pid"] in appeared}
    assert parents == {1000}


def _trace_file(path: Path, records: list[dict[str, Any]], **header: Any) -> str:
    write_trace(str(path), {**HEADER, "page_size": 4096, **header}, records)
    return str(path)


def _proc(t: float, pid: int, comm: str, **fields: Any) -> dict[str, Any]:
    return {"t": t, "k": "proc", "pid": pid, "start": 1000 + pid, "comm": comm, "ppid": 1,
            "state": "S", "uid": 1000, "rss": 102400, "score": 100, "adj": 0,
            "cgroup": "0::/user.slice\n", **fields}  # fmt: skip


def _mem(t: float, avail_kib: int, total_kib: int = 8 << 20) -> dict[str, Any]:
    return {"t": t, "k": "mem", "total": total_kib, "avail": avail_kib, "free": avail_kib,
            "swap_total": 0, "swap_free": 0}  # fmt: skip


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"t": 1, "k": "psi", "res": "../../../tmp/x", "some": 1}, "psi.res"),
        ({"t": 1, "k": "cgroup", "path": "a/../../..", "v": 2, "usage": 1, "limit": 2}, "path"),
        ({"t": 1, "k": "cgroup", "path": "/sys/../etc", "v": 2, "usage": 1, "limit": 2}, "'..'"),
        ({"t": 1, "k": "proc", "pid": 5, "start": 1, "rss": "x"}, "proc.rss"),
        ({"t": 1, "k": "proc", "pid": 5, "start": 1, "rss": -4}, "proc.rss"),
        ({"t": 1, "k": "proc", "pid": 5, "start": 1, "state": "RS"}, "one letter"),
        ({"t": 1, "k": "proc", "pid": 5, "start": 1, "comm": "a\0b"}, "without NUL"),
        ({"t": 1, "k": "proc", "pid": 5, "start": 1, "adj": 5000}, "proc.adj"),
        ({"t": 1, "k": "proc", "pid": -5, "start": 1}, "proc.pid"),
        ({"t": 1, "k": "proc", "pid": 5, "start": "abc"}, "proc.start"),
        ({"t": 1, "k": "exit"}, "without 'pid'"),
        ({"t": 1, "k": "mem", "total": 1, "avail": -1, "free": 1, "swap_total": 0,
          "swap_free": 0}, "mem.avail"),
    ],
)  # fmt: skip
def test_a_record_with_values_no_kernel_writes_is_an_error_naming_its_line(
    tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    path = _trace_file(tmp_path / "bad.trace", [_mem(0.5, 1 << 20), record])
    with pytest.raises(TraceError, match=message) as info:
        read_trace(path)
    assert "line 3" in str(info.value)


@pytest.mark.parametrize("header", [{"page_size": "x"}, {"cgroup_mounts": [
    {"mountpoint": "../../tmp", "version": 2, "controllers": [], "root": "/"}]}])  # fmt: skip
def test_a_header_with_values_no_recorder_writes_is_an_error(
    tmp_path: Path, header: dict[str, Any]
) -> None:
    with pytest.raises(TraceError, match="line 1"):
        read_trace(_trace_file(tmp_path / "bad.trace", [_mem(0.5, 1 << 20)], **header))


def test_a_time_that_is_not_a_number_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nan.trace"
    path.write_bytes(gzip.compress(json.dumps(HEADER).encode() + b'\n{"t": NaN, "k": "end"}\n'))
    with pytest.raises(TraceError, match="line 2: not a JSON object: NaN"):
        read_trace(str(path))


def test_replay_serves_only_below_its_own_directory(tmp_path: Path) -> None:
    # A policy naming a relative cgroup directory cannot climb out of the served tree.
    from reapkit._replay import _ServedHost, _ServedProcFS

    host = _ServedHost(_ServedProcFS(str(tmp_path / "proc"), 4096), str(tmp_path / "cg"), (), {})
    for directory in ("a/../../..", "/../../etc", "../x"):
        served = host.cgroup_directory(directory)
        assert os.path.commonpath([served, str(tmp_path / "cg")]) == str(tmp_path / "cg")


def test_a_stalled_disk_never_blocks_rotate_or_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reapkit import _trace

    stalled = threading.Event()
    monkeypatch.setattr(_trace._Segment, "write", lambda self, data: stalled.wait())
    writer = TraceWriter(str(tmp_path / "t.trace"), capacity=4)
    try:
        writer.start(HEADER)  # the thread hangs writing the header
        for i in range(10):
            writer.write({"t": i, "k": "exit", "pid": i + 1})
        assert writer.dropped >= 6
        assert writer.rotate({**HEADER, "segment": 1}) is False  # at once, not blocked
        began = time.monotonic()
        writer.close(20.0, timeout=0.3)
        assert time.monotonic() - began < 5  # the hung write is left behind
    finally:
        stalled.set()


def test_psi_totals_are_a_step_function_between_records(tmp_path: Path) -> None:
    # Flat for 10 s (written once), then 150 ms of stall in the last 100 ms: the kernel's
    # trigger (growth within 1 s >= 100 ms) fires; interpolating over the flat gap would not.
    records = [_proc(0.0, 300, "victim"),
               {"t": 0.0, "k": "psi", "res": "memory", "some": 0, "full": 0}]  # fmt: skip
    records += [_mem(i / 10, 100 << 10) for i in range(1, 101)]
    records.append({"t": 10.0, "k": "psi", "res": "memory", "some": 150_000, "full": 0})
    records.append(_mem(10.05, 100 << 10))
    policy = KILL_AT_5.replace('["mem_available < 5%"]', '["memory some 100ms/1s"]')
    decisions = replay_trace(None, read_trace(_trace_file(tmp_path / "t.trace", records)),
                             text=policy).decisions  # fmt: skip
    assert [d.t for d in decisions] == [10.0]


def test_a_cgroup_pressure_trigger_fires_from_the_recorded_cgroup(tmp_path: Path) -> None:
    app = "/sys/fs/cgroup/app"
    mount = {"mountpoint": "/sys/fs/cgroup", "version": 2, "controllers": ["memory"], "root": "/"}
    cgroup = {"k": "cgroup", "path": app, "v": 2, "usage": 1 << 20, "limit": 2 << 20}
    records = [_proc(0.0, 300, "worker", cgroup="0::/app\n"), _proc(0.0, 400, "other")]
    records += [{"t": i / 10, **cgroup, "pressure": {"some": i * 50_000, "full": 0}}
                for i in range(0, 30)]  # fmt: skip
    policy = (
        f'[[rule]]\nname = "app"\nwhen = ["memory some 100ms/1s"]\npressure_cgroup = "{app}"\n'
        f'scope = {{ cgroup = "{app}" }}\nselect = ["largest-rss"]\nactions = ["kill"]\n'
    )
    trace = read_trace(_trace_file(tmp_path / "t.trace", records, cgroup_mounts=[mount]))
    decisions = replay_trace(None, trace, text=policy).decisions
    assert decisions and decisions[0].record.victim is not None
    assert decisions[0].record.victim.comm == "worker"  # the scope is the recorded cgroup


def test_a_process_told_exited_is_not_brought_back_by_a_partial_record(tmp_path: Path) -> None:
    records = [_proc(0.0, 300, "gone", rss=9 << 20), _proc(0.0, 400, "stays"),
               {"t": 1.0, "k": "exit", "pid": 300},  # the connector: no start
               {"t": 1.0, "k": "proc", "pid": 300, "start": 1300, "rss": 9 << 20},  # read before
               *(_mem(2 + i / 10, 100 << 10) for i in range(20))]  # fmt: skip
    decisions = replay_trace(None, read_trace(_trace_file(tmp_path / "t.trace", records)),
                             text=KILL_AT_5).decisions  # fmt: skip
    assert [d.record.victim.comm for d in decisions if d.record.victim] == ["stays"]


def test_a_pid_reused_within_one_snapshot_is_the_new_process(tmp_path: Path) -> None:
    records = [_proc(0.0, 300, "old"),
               {"t": 1.0, "k": "exit", "pid": 300, "start": 1300},
               {**_proc(1.0, 300, "new"), "start": 5000},
               *(_mem(2 + i / 10, 100 << 10) for i in range(20))]  # fmt: skip
    decisions = replay_trace(None, read_trace(_trace_file(tmp_path / "t.trace", records)),
                             text=KILL_AT_5).decisions  # fmt: skip
    assert [d.record.victim.comm for d in decisions if d.record.victim] == ["new"]


def test_a_big_builder_trace_is_written_whole(tmp_path: Path) -> None:
    trace = TraceBuilder(interval=0.002)
    trace.process(1000, "shell")
    trace.fork_storm(1000, 2000, start=1.0, seconds=20.0, lifetime=1.0)
    built = trace.build()
    trace.write(tmp_path / "big.trace")
    read = read_trace(str(tmp_path / "big.trace"))
    assert len(read.records) == len(built.records) > 10_000 and read.lost == 0


def test_replay_output_keeps_a_hostile_name_on_one_line_without_control_characters() -> None:
    from reapkit.cli._replay import render

    trace = _leak()
    trace.process(2000, "\x1b[2Jevil\nname", rss="100MiB")
    trace.leak(2000, "1GiB", start=1.0, seconds=8.0)
    policy = KILL_AT_5.replace('select = ["oom-score"]', 'select = ["largest-rss"]')
    shown = render(replay_trace(None, trace.build(), text=policy))
    assert "\x1b" not in shown and "evil" in shown
    assert all(line.startswith((" ", "<")) for line in shown.splitlines())

"""The daemon's outputs: the records writer (rate limit, retries, whole lines) under the
autojump clock with a fake file, the records file's safe opening on real files, and the log
handler that drops instead of blocking (issue 11)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import stat
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from reapkit import OutputCounters
from reapkit._records import KillRecord, Timeline
from reapkit.cli import _output as output
from reapkit.cli._output import (
    OutputFileError,
    RecordsFile,
    RecordsWriter,
    _DroppingQueueHandler,
    open_output,
)

from ..conftest import require_root


@attrs.define
class FakeFile:
    """Collects lines; fails with ``failing`` (an errno) until ``until`` on the trio clock."""

    path: str = "fake.jsonl"
    lines: list[bytes] = attrs.field(factory=list)
    failing: int | None = None
    until: float = math.inf

    def write_line(self, line: bytes) -> None:
        if self.failing is not None and trio.current_time() < self.until:
            raise OSError(self.failing, os.strerror(self.failing))
        self.lines.append(line)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


async def _inline(fn: Any, *args: Any) -> Any:
    """The file called on the trio thread: deterministic under the autojump clock."""
    return fn(*args)


def _record(outcome: str = "no-candidate", rule: str = "r", n: int = 0) -> KillRecord:
    return KillRecord(rule, outcome, f"#{n}", "manual", Timeline(float(n)))  # type: ignore[arg-type]


async def _write(writer: RecordsWriter, records: list[KillRecord], then: float = 0) -> None:
    """Run the writer, send ``records``, sleep ``then`` seconds, close the channel."""
    send, receive = trio.open_memory_channel[KillRecord](len(records) + 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.serve, receive)
        async with send:
            for record in records:
                await send.send(record)
            await trio.sleep(then)


async def test_a_flood_of_non_kills_is_rate_limited_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    file, counters = FakeFile(), OutputCounters()
    writer = RecordsWriter(file, counters, per_minute=10, run=_inline)  # type: ignore[arg-type]
    flood = [_record(n=n) for n in range(100)]
    await _write(writer, flood, then=30)
    got = file.records()
    assert [r["reason"] for r in got[:10]] == [f"#{n}" for n in range(10)]
    # One token back after 6 s: the count of what was left out, in its own versioned shape.
    suppressed = got[10]
    assert suppressed == {
        "type": "suppressed", "version": 1, "rule": "r", "outcome": "no-candidate",
        "count": 90, "first": 10.0, "last": 99.0,
    }  # fmt: skip
    assert len(got) == 11 and counters.records_suppressed == 90


async def test_kills_are_never_rate_limited_and_each_key_has_its_own_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    file, counters = FakeFile(), OutputCounters()
    writer = RecordsWriter(file, counters, per_minute=2, run=_inline)  # type: ignore[arg-type]
    records = [_record("killed", n=n) for n in range(50)]
    records += [_record("refused", rule=rule, n=n) for n in range(5) for rule in ("a", "b")]
    await _write(writer, records)  # ends at once: the last word says what was suppressed
    got = file.records()
    assert sum(r.get("outcome") == "killed" and "type" not in r for r in got) == 50
    for rule in ("a", "b"):
        assert [r.get("count") for r in got if r["rule"] == rule] == [None, None, 3]
    assert counters.records_suppressed == 6


async def test_a_write_error_is_logged_once_counted_and_retried(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    file, counters = FakeFile(failing=errno.ENOSPC, until=10.5), OutputCounters()
    writer = RecordsWriter(file, counters, run=_inline)  # type: ignore[arg-type]
    await _write(writer, [_record("killed", n=n) for n in range(3)], then=12)
    assert [r["reason"] for r in file.records()] == ["#0", "#1", "#2"]
    assert counters.records_write_errors >= 10  # retried every second meanwhile
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()
    assert any("again after" in r.getMessage() for r in caplog.records)
    assert counters.records_lost == 0


async def test_the_retry_buffer_loses_the_oldest_and_counts_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    file, counters = FakeFile(failing=errno.EIO, until=2), OutputCounters()
    writer = RecordsWriter(file, counters, pending_max=3, run=_inline)  # type: ignore[arg-type]
    await _write(writer, [_record("killed", n=n) for n in range(5)], then=4)
    assert [r["reason"] for r in file.records()] == ["#2", "#3", "#4"]
    assert counters.records_lost == 2


async def test_records_still_failing_at_the_end_are_counted_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    file, counters = FakeFile(failing=errno.EDQUOT), OutputCounters()
    writer = RecordsWriter(file, counters, run=_inline)  # type: ignore[arg-type]
    await _write(writer, [_record("killed")])
    assert counters.records_lost == 1 and counters.records_write_errors >= 1


@attrs.define
class HangingFile(FakeFile):
    """A write that hangs (a stalled NFS server) until ``release`` is set."""

    release: threading.Event = attrs.field(factory=threading.Event)
    entered: bool = False
    returned: bool = False

    def write_line(self, line: bytes) -> None:
        self.entered = True
        self.release.wait(5)
        self.returned = True


@pytest.mark.parametrize("end", ["channel closed", "cancelled"])
async def test_a_hung_write_holds_up_neither_the_loop_nor_the_stop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, end: str
) -> None:
    monkeypatch.setattr(output, "RECORDS_STOP_TIMEOUT", 0.1)
    file, counters = HangingFile(), OutputCounters()
    writer = RecordsWriter(file, counters)  # type: ignore[arg-type]  # its own thread
    send, receive = trio.open_memory_channel[KillRecord](10)
    try:
        with trio.fail_after(30):  # a hang guard, not a timing assert
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.serve, receive)
                async with send:
                    for n in range(3):
                        await send.send(_record("killed", n=n))
                    while not file.entered:
                        await trio.sleep(0.01)
                    await trio.sleep(0.05)
                    assert not file.returned  # the loop ran while the write hung
                    if end == "cancelled":
                        nursery.cancel_scope.cancel()
        assert not file.returned  # the writer ended, abandoning the write
        assert counters.records_lost == 3
        said = [r.getMessage() for r in caplog.records if "rule r: killed" in r.getMessage()]
        assert len(said) == 3  # logged although never written
    finally:
        file.release.set()


def test_closing_while_a_write_hangs_closes_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "records.jsonl"
    file = RecordsFile.open(str(path))
    entered, release, real_write = threading.Event(), threading.Event(), os.write

    def hung(fd: int, data: Any) -> int:
        entered.set()
        release.wait(30)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", hung)
    writing = threading.Thread(target=file.write_line, args=(b"{}\n",))
    writing.start()
    try:
        assert entered.wait(30)
        file.close()
        os.fstat(file.fd)  # still open: its number is not reused under the write
    finally:
        release.set()
        writing.join(30)
    assert path.read_bytes() == b"{}\n"
    with pytest.raises(OSError, match="closed"):
        file.write_line(b"{}\n")
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(file.fd)  # closed by the write, when it ended


# -- the file ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("truncate", "left"),
    [
        (True, b'{"first":1}\n{"third":3}\n'),  # taken back
        (False, b'{"first":1}\n{"se\n{"third":3}\n'),  # not: a malformed line, ended
    ],
)
def test_a_line_cut_short_never_runs_into_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, truncate: bool, left: bytes
) -> None:
    path = tmp_path / "records.jsonl"
    file = RecordsFile.open(str(path))
    file.write_line(b'{"first":1}\n')
    real_write, calls = os.write, []

    def cut_short(fd: int, data: Any) -> int:  # the disk fills up after 4 bytes
        calls.append(data)
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:4])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", cut_short)
    if not truncate:
        monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(OSError, match="No space"):
        file.write_line(b'{"second":2}\n')
    monkeypatch.undo()
    file.write_line(b'{"third":3}\n')
    file.close()
    assert path.read_bytes() == left


def test_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    os.close(open_output(str(path)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.fixture
def world_writable(tmp_path: Path) -> Path:
    """A sticky world-writable directory, like /tmp."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


def test_a_planted_symlink_is_refused(world_writable: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    link = world_writable / "records.jsonl"
    link.symlink_to(target)
    with pytest.raises(OutputFileError, match="symbolic link"):
        open_output(str(link))
    assert target.read_text() == "keep\n"


def test_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "records.fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputFileError, match="not a regular file"):
        open_output(str(fifo))  # no reader: would block forever without O_NONBLOCK
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(OutputFileError, match=r"not a regular file \(a FIFO"):
            open_output(str(fifo))
    finally:
        os.close(reader)


def test_a_directory_and_a_hard_link_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputFileError):
        open_output(str(tmp_path))
    target = tmp_path / "records.jsonl"
    os.close(open_output(str(target)))
    os.link(target, tmp_path / "other-name")
    with pytest.raises(OutputFileError, match="hard link"):
        open_output(str(target))


def test_another_users_file_is_refused(world_writable: Path) -> None:
    require_root()
    planted = world_writable / "records.jsonl"
    planted.write_text("")
    os.chown(planted, 65534, 65534)
    with pytest.raises(OutputFileError, match="owned by uid 65534"):
        open_output(str(planted))


def test_a_failed_reopen_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    file = RecordsFile.open(str(path))
    path.rename(tmp_path / "records.jsonl.1")
    os.mkfifo(path)  # what logrotate would never do: the reopen is refused
    with pytest.raises(OutputFileError):
        file.reopen()
    file.write_line(b"{}\n")
    file.close()
    assert (tmp_path / "records.jsonl.1").read_bytes() == b"{}\n"


# -- the log -------------------------------------------------------------------------------------


def test_a_full_log_queue_drops_counts_and_says_so_when_it_flows() -> None:
    lines: queue.Queue[Any] = queue.Queue(2)
    counters = OutputCounters()
    handler = _DroppingQueueHandler(lines, counters)
    logger = logging.getLogger("reapkit.test-output")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for n in range(5):
            logger.warning("line %d", n)  # never blocks
        assert counters.log_lines_dropped == 3
        assert [lines.get_nowait().getMessage() for _ in range(2)] == ["line 0", "line 1"]
        logger.warning("line 5")
        said = [lines.get_nowait().getMessage() for _ in range(2)]
        assert said == ["dropped 3 log line(s): stderr did not take them", "line 5"]
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

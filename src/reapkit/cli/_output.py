"""The daemon's outputs, neither of which may stop it: the records file and the log.

Records (``--records``) are written by :class:`RecordsWriter`: whole lines, on a worker
thread (a hung disk holds up the file, never a decision), a failed write retried from a
bounded buffer, floods of non-kill records rate-limited. The log goes through
a bounded queue to a thread that writes stderr, so a stalled journal drops lines (counted)
instead of blocking the trio thread.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
import logging
import logging.handlers
import math
import os
import queue
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import attrs
import trio

from .._reaper import OutputCounters
from .._records import KillRecord
from ._status import UsageError

log = logging.getLogger("reapkit")

#: A symbolic link is refused (ELOOP); O_NONBLOCK: opening a FIFO must not wait for a reader.
RECORDS_FLAGS: Final = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    | os.O_CLOEXEC
)  # fmt: skip
#: Outcomes always written; the others are rate-limited per (rule, outcome).
KILL_OUTCOMES: Final = frozenset({"killed", "dry-run"})
#: Records of one (rule, outcome) written per minute beyond a burst of as many.
RECORDS_PER_MINUTE: Final = 10
#: Lines kept for retry while writes fail; beyond it the oldest is lost (counted).
PENDING_RECORDS: Final = 1024
#: Seconds between retries of a failing write; a write that takes longer is hung.
RETRY_EVERY: Final = 1.0
#: Seconds the stop waits for the records still to be written (a hung write is abandoned).
RECORDS_STOP_TIMEOUT: Final = 2.0
#: The version of the ``{"type": "suppressed"}`` line's shape.
SUPPRESSED_VERSION: Final = 1
#: Log lines queued for stderr; beyond it lines are dropped (counted).
LOG_QUEUE: Final = 1024
#: Decisions that changed nothing, logged at INFO; the others at WARNING.
QUIET_OUTCOMES: Final = frozenset({"dry-run", "abandoned"})

_KINDS: Final = {"p": "FIFO", "s": "socket", "c": "character device", "b": "block device"}


class OutputFileError(UsageError):
    """``--records`` or ``--heartbeat`` names a file the daemon must not write (exit status 2
    at start)."""


def open_output(path: str, option: str = "--records", flags: int = RECORDS_FLAGS) -> int:
    """Open ``path`` to write (created 0600): refuse a symbolic link, anything but a regular
    file, a file another user owns or one with other hard links."""
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        why = {
            errno.ELOOP: "it is a symbolic link",
            errno.ENXIO: "not a regular file (a FIFO or socket)",
        }.get(exc.errno or 0, exc.strerror)
        raise OutputFileError(f"{option} {path}: refused: {why}") from None
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = f"not a regular file (a {_KINDS.get(stat.filemode(st.st_mode)[0], 'directory')})"
    elif st.st_uid != os.geteuid():
        why = f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    elif st.st_nlink > 1:
        why = f"it has {st.st_nlink - 1} other hard link(s)"
    if why is not None:
        os.close(fd)
        raise OutputFileError(f"{option} {path}: refused: {why}")
    return fd


@attrs.define(eq=False)
class RecordsFile:
    """The open records file: whole lines appended, reopened by path on SIGHUP. Used from one
    thread at a time; :meth:`close` may come from another while a write hangs."""

    path: str
    fd: int
    #: A partial line could not be truncated away: the next write starts a new line.
    _torn: bool = False
    _guard: threading.Lock = attrs.field(factory=threading.Lock)
    _busy: bool = False
    _closing: bool = False

    @classmethod
    def open(cls, path: str) -> RecordsFile:
        return cls(path, open_output(path))

    def write_line(self, line: bytes) -> None:
        """Append ``line`` (with its newline) whole, or raise ``OSError`` leaving none of it."""
        with self._use():
            self._write(b"\n" + line if self._torn else line)

    @contextlib.contextmanager
    def _use(self) -> Iterator[None]:
        with self._guard:
            if self._closing:
                raise OSError(errno.EBADF, "the records file is closed")
            self._busy = True
        try:
            yield
        finally:
            if self._done():  # close() came while this call hung: the fd is closed only now
                os.close(self.fd)

    def _done(self) -> bool:
        with self._guard:
            self._busy = False
            return self._closing

    def _write(self, data: bytes) -> None:
        done = 0
        try:
            while done < len(data):
                done += os.write(self.fd, data[done:])
        except OSError:
            if done:
                self._take_back(done)
            raise
        self._torn = False

    def _take_back(self, written: int) -> None:
        try:  # after an O_APPEND write the offset is the end of what it wrote
            os.ftruncate(self.fd, os.lseek(self.fd, 0, os.SEEK_CUR) - written)
        except OSError:
            self._torn = True

    def reopen(self) -> None:
        """Open the path afresh (logrotate moved the file); on :class:`OutputFileError` the
        old file stays open."""
        with self._use():
            fd = open_output(self.path)
            os.close(self.fd)
            self.fd, self._torn = fd, False

    def close(self) -> None:
        """Close the file, or let the write in progress close it when it ends: its fd number
        must not be reused under it."""
        with self._guard:
            if self._closing:
                return
            self._closing, busy = True, self._busy
        if not busy:
            os.close(self.fd)


@attrs.define
class _Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved."""

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@attrs.define
class _Suppressed:
    count: int
    first: float
    last: float


@attrs.define(eq=False)
class _Line:
    data: bytes
    #: The record its WARNING line announces, until said (``None``: nothing left to say).
    record: KillRecord | None = None


#: How the writer calls the records file: ``run(fn, *args)``, on a worker thread by default.
Run = Callable[..., Awaitable[Any]]


@attrs.define(eq=False)
class RecordsWriter:
    """Logs each record and appends it to ``file``; never raises for a write, and never
    blocks the trio thread on the file: every call on it (write, truncate, reopen, close) runs
    on one worker thread, from the writer's own task, which a hung write holds up alone.

    A record's log line follows its write (readers follow the log), or comes at once while
    writes fail or one has hung for ``RETRY_EVERY``. Non-kill records beyond ``per_minute``
    per (rule, outcome) are counted, not written, and a ``{"type": "suppressed"}`` line says
    how many once that key may write again."""

    file: RecordsFile | None
    counters: OutputCounters
    per_minute: int = RECORDS_PER_MINUTE
    pending_max: int = PENDING_RECORDS
    #: Replaces the worker thread (a test's inline calls under the autojump clock).
    run: Run | None = None
    _pending: collections.deque[_Line] = attrs.field(factory=collections.deque)
    #: The line being written, and since when (trio time).
    _writing: _Line | None = None
    _since: float = math.inf
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _reopen: bool = False
    _ending: bool = False
    _closed: bool = False
    _buckets: dict[tuple[str, str], _Bucket] = attrs.field(factory=dict)
    _suppressed: dict[tuple[str, str], _Suppressed] = attrs.field(factory=dict)
    #: Since the first failed write of the current run of failures: (error, failed writes,
    #: records lost before it).
    _failing: tuple[str, int, int] | None = None

    async def serve(self, receive: trio.MemoryReceiveChannel[KillRecord]) -> None:
        """Take what ``receive`` brings until it ends (after the reaper stopped), then write
        the rest for at most ``RECORDS_STOP_TIMEOUT`` seconds and close the file; whatever is
        not written by then (or when cancelled) is counted lost."""
        run = self.run or functools.partial(
            trio.to_thread.run_sync, limiter=trio.CapacityLimiter(1), abandon_on_cancel=True
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_all, run)
                async with receive:
                    await self._receive_all(receive)
                for key in list(self._suppressed):
                    self._say_suppressed(key)
                self._ending = True
                self._wake.set()
                nursery.cancel_scope.deadline = trio.current_time() + RECORDS_STOP_TIMEOUT
        finally:
            self._finish()

    def add(self, record: KillRecord) -> None:
        key = (record.rule, record.outcome)
        when = record.timeline.trigger_seen + record.epoch_offset
        if record.outcome not in KILL_OUTCOMES and not self._bucket(key).take(trio.current_time()):
            held = self._suppressed.setdefault(key, _Suppressed(0, when, when))
            held.count += 1
            held.last = when
            self.counters.records_suppressed += 1
            return
        self._say_suppressed(key)
        line = _Line(record.to_json_line().encode() + b"\n", record)
        if self._stalled():
            _announce(line)
        self._queue(line)

    def tick(self) -> None:
        """Say what was suppressed where the key may write again, and the records waiting
        behind a failing or hung write."""
        now = trio.current_time()
        for key in [k for k in self._suppressed if self._bucket(k).take(now)]:
            self._say_suppressed(key)
        if self._stalled():
            for line in [self._writing, *self._pending]:
                _announce(line)

    def reopen(self) -> None:
        """SIGHUP: have the file reopened by its path (if that fails, the old one is kept)."""
        self._reopen = True
        self._wake.set()

    async def _receive_all(self, receive: trio.MemoryReceiveChannel[KillRecord]) -> None:
        while True:
            with trio.move_on_after(self._wait()):
                try:
                    record = await receive.receive()
                except trio.EndOfChannel:
                    return
                self.add(record)
            self.tick()

    async def _write_all(self, run: Run) -> None:
        """The writer's task: the only one that touches the file."""
        file = self.file
        while file is not None:
            if self._reopen:
                self._reopen = False
                await self._reopen_file(run, file)
            elif self._pending:
                line = self._pending.popleft()
                if not await self._write(run, file, line):
                    self._pending.appendleft(line)
                    if len(self._pending) > self.pending_max:
                        self._lose(self._pending.popleft())
                    await trio.sleep(RETRY_EVERY)
            elif self._ending:
                await run(file.close)
                self._closed = True
                return
            else:
                await self._wake.wait()
                self._wake = trio.Event()

    async def _write(self, run: Run, file: RecordsFile, line: _Line) -> bool:
        self._writing, self._since = line, trio.current_time()
        try:
            await run(file.write_line, line.data)
        except OSError as exc:
            self._failed(exc)
            written = False
        else:
            written = True
        self._writing, self._since = None, math.inf  # not when cancelled: then it is lost
        _announce(line)
        if written and self._failing is not None:
            error, failures, lost = self._failing
            log.warning(
                "records: writing to %s again after %d failed write(s) (%s); %d record(s)"
                " lost meanwhile", file.path, failures, error, self.counters.records_lost - lost,
            )  # fmt: skip
            self._failing = None
        return written

    async def _reopen_file(self, run: Run, file: RecordsFile) -> None:
        try:
            await run(file.reopen)
        except (OutputFileError, OSError) as exc:
            log.error("SIGHUP: keeping the records file open as it was: %s", exc)  # noqa: TRY400 - no traceback
            return
        log.info("SIGHUP: reopened %s", file.path)

    def _finish(self) -> None:
        """The last word, on the trio thread without I/O: what was not written is lost."""
        unwritten = [line for line in [self._writing, *self._pending] if line is not None]
        self._pending.clear()
        for line in unwritten:
            self._lose(line)
        if self.file is None or self._closed:
            return
        if unwritten:
            log.error("records: %d record(s) never written to %s", len(unwritten), self.file.path)
        self.file.close()  # at once if idle (the reaper has stopped), else when the write ends

    def _stalled(self) -> bool:
        return self._failing is not None or trio.current_time() - self._since >= RETRY_EVERY

    def _wait(self) -> float:
        if self._pending or self._writing is not None:
            return RETRY_EVERY
        return 60 / self.per_minute if self._suppressed else math.inf

    def _bucket(self, key: tuple[str, str]) -> _Bucket:
        burst = float(self.per_minute)
        return self._buckets.setdefault(key, _Bucket(burst / 60, burst, burst, trio.current_time()))

    def _say_suppressed(self, key: tuple[str, str]) -> None:
        held = self._suppressed.pop(key, None)
        if held is None:
            return
        rule, outcome = key
        log.warning(
            "rule %s: %d %s record(s) suppressed (more than %d a minute)",
            rule, held.count, outcome, self.per_minute,
        )  # fmt: skip
        line = {"type": "suppressed", "version": SUPPRESSED_VERSION, "rule": rule}
        line |= {"outcome": outcome, "count": held.count, "first": held.first, "last": held.last}
        self._queue(_Line(json.dumps(line, separators=(",", ":"), sort_keys=True).encode() + b"\n"))

    def _queue(self, line: _Line) -> None:
        if self.file is None:
            _announce(line)
            return
        if len(self._pending) >= self.pending_max:
            self._lose(self._pending.popleft())
        self._pending.append(line)
        self._wake.set()

    def _lose(self, line: _Line) -> None:
        self.counters.records_lost += 1
        _announce(line)

    def _failed(self, exc: OSError) -> None:
        self.counters.records_write_errors += 1
        if self._failing is not None:
            error, failures, lost = self._failing
            self._failing = (error, failures + 1, lost)
            return
        self._failing = (exc.strerror or str(exc), 1, self.counters.records_lost)
        log.error(
            "records: cannot write to %s: %s; retrying every %g s, keeping the last %d",
            self.file.path if self.file else None, exc.strerror or exc, RETRY_EVERY,
            self.pending_max,
        )  # fmt: skip


def _announce(line: _Line | None) -> None:
    if line is not None and line.record is not None:
        log_record(line.record)
        line.record = None


def log_record(record: KillRecord) -> None:
    """The decision's one line: at INFO when nothing was done (``QUIET_OUTCOMES``), else at
    WARNING. The whole record rides along (``kill_record``) for a JSON formatter."""
    v = record.victim
    victim = f"{v.comm!r} (pid {v.pid})" if v else "nobody"
    freed = f", {record.bytes_freed >> 20} MiB back" if record.bytes_freed else ""
    level = logging.INFO if record.outcome in QUIET_OUTCOMES else logging.WARNING
    log.log(
        level, "rule %s: %s %s: %s%s", record.rule, record.outcome, victim, record.reason, freed,
        extra={"kill_record": record},
    )  # fmt: skip


# -- the log -------------------------------------------------------------------------------------


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Formats on the caller's thread and never blocks: when the queue is full the line is
    dropped and counted, and the next line that fits follows a count of those dropped."""

    def __init__(self, lines: queue.Queue[Any], counters: OutputCounters) -> None:
        super().__init__(lines)
        self.lines = lines
        self.counters = counters
        self._unsaid = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self._unsaid:
                self.lines.put_nowait(self.prepare(_dropped(self._unsaid)))
                self._unsaid = 0
            self.lines.put_nowait(record)
        except queue.Full:
            self._unsaid += 1
            self.counters.log_lines_dropped += 1

    def handleError(self, record: logging.LogRecord) -> None:
        del record  # the default prints to stderr, which may be what is stalled
        self.counters.log_lines_dropped += 1


def _dropped(count: int) -> logging.LogRecord:
    return logging.LogRecord(
        "reapkit", logging.WARNING, __file__, 0,
        "dropped %d log line(s): stderr did not take them", (count,), None,
    )  # fmt: skip


class _StderrWriter(logging.Handler):
    """The listener's one handler: ``os.write`` to fd 2, holding neither this handler's lock
    (``logging.shutdown`` takes it) nor ``sys.stderr``'s (the interpreter's exit does)."""

    def handle(self, record: logging.LogRecord) -> bool:
        data = (record.getMessage() + "\n").encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(2, data) :]
        except OSError:
            pass  # stderr closed: nobody to tell
        return True


class LogListener(logging.handlers.QueueListener):
    """The thread that writes the queued lines to stderr (a daemon thread)."""

    def __init__(self, lines: queue.Queue[Any]) -> None:
        super().__init__(lines, _StderrWriter())
        self.lines = lines

    def stop_within(self, timeout: float) -> None:
        """Let the thread write what is queued, waiting at most ``timeout`` seconds: a stalled
        stderr must not hold up the exit."""
        thread, deadline = self._thread, time.monotonic() + timeout
        try:
            self.lines.put(getattr(self, "_sentinel", None), timeout=timeout)
        except queue.Full:
            return
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))


def start_logging(
    formatter: logging.Formatter, level: int, counters: OutputCounters
) -> LogListener:
    """Route every log line through a bounded queue to a thread that writes stderr."""
    lines: queue.Queue[Any] = queue.Queue(LOG_QUEUE)
    handler = _DroppingQueueHandler(lines, counters)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn writes sys.stderr itself, and would block
    listener = LogListener(lines)
    listener.start()
    return listener

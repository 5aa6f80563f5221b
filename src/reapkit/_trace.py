"""The trace format: what ``reapkit record`` and ``reapkit run --trace`` write, and its reader.

A trace is gzip-compressed JSON lines (format ``reapkit-trace``, version :data:`VERSION`,
documented in ``docs/replay.md``). The first line of each segment is a ``header``; every other
line is one record ``{"t": seconds since the recording started, "k": kind, ...}``, in time
order. Sizes are KiB. A process is named by ``pid`` and ``start`` (its start time in clock
ticks since boot, as ``/proc/<pid>/stat`` field 22), so a reused PID is a new process.

The writer runs on a thread of its own behind a bounded queue: a slow or full disk loses trace
lines (counted, and said in a ``gap`` record), never stalls the caller. It flushes the gzip
stream (``Z_SYNC_FLUSH``) at least every :data:`FLUSH_EVERY` seconds, so a trace cut short by
a crash reads up to its last flush. With a rolling ``window`` the recorder starts a new segment
every half window; the previous segment is kept as ``PATH.1``, so the last ``window`` (at
least half of it) is always on disk.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import attrs

from ._errors import InvalidValue

FORMAT: Final = "reapkit-trace"
VERSION: Final = 1
#: Pressure files a trace records (``/proc/pressure/<res>``).
PSI_RESOURCES: Final = ("memory", "io", "cpu")
#: The writer flushes the compressed stream at least this often (seconds).
FLUSH_EVERY: Final = 1.0
#: Records waiting for the writer thread before new ones are dropped.
QUEUE_LINES: Final = 20_000
#: The writer thread takes what waits at least this often (seconds), or at this many records.
BATCH_EVERY: Final = 0.1
BATCH_LINES: Final = 512


class TraceError(InvalidValue):
    """A file that is not a readable trace: names the file, the line and what is wrong."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


def segment_paths(path: str) -> list[str]:
    """The files of the trace at ``path``, oldest first: ``PATH.1`` (the previous segment of a
    rolling trace) when it exists, then ``PATH``."""
    older = f"{path}.1"
    if not os.path.exists(older):
        return [path]
    # A crash between the rotation's rename and the new file: the older segment alone.
    return [older, path] if os.path.exists(path) else [older]


@attrs.frozen
class Trace:
    """A trace as read: the first segment's header, every record in time order, and whether
    it ended cleanly (``end`` record) or was cut short (a crash, a daemon still running)."""

    #: The file read (its ``.1`` segment first, if any).
    path: str
    header: Mapping[str, Any]
    records: tuple[Mapping[str, Any], ...]
    truncated: bool
    #: Records the writer had to drop (the sum of the ``gap`` records).
    lost: int


def read_trace(path: str) -> Trace:
    """Read the trace at ``path`` (and ``PATH.1`` before it, if it belongs to the same
    recording). Raises :class:`TraceError` for a file that is not a trace or is corrupt."""
    header: Mapping[str, Any] | None = None
    records: list[Mapping[str, Any]] = []
    truncated = ended = False
    for segment in segment_paths(path):
        seg_header, seg_records, seg_truncated = _read_segment(segment)
        if header is None:
            header = seg_header
        elif seg_header.get("recording") != header.get("recording"):
            # PATH.1 left over from another recording: the newer file alone is the trace.
            header, records, truncated = seg_header, [], False
        records.extend(r for r in seg_records if r["k"] != "end")
        ended = any(r["k"] == "end" for r in seg_records)
        truncated = seg_truncated
    assert header is not None
    lost = sum(int(r.get("lost", 0)) for r in records if r["k"] == "gap")
    return Trace(path, header, tuple(records), truncated or not ended, lost)


def _read_segment(path: str) -> tuple[Mapping[str, Any], list[Mapping[str, Any]], bool]:
    try:
        raw = gzip.open(path, "rb")  # noqa: SIM115 (closed below; errors mapped per line)
    except OSError as exc:
        raise TraceError(path, None, f"cannot open it: {exc.strerror or exc}") from None
    records: list[Mapping[str, Any]] = []
    truncated = False
    with raw:
        lines = _Lines(raw, path)
        for number, line in enumerate(lines, 1):
            if not line.endswith(b"\n"):
                truncated = True  # the last line was cut short
                break
            records.append(_record(line, path, number))
        truncated = truncated or lines.truncated
    if not records:
        raise TraceError(path, None, "empty: not a reapkit trace")
    header = records[0]
    if header.get("k") != "header" or header.get("format") != FORMAT:
        raise TraceError(path, 1, f"not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise TraceError(
            path, 1, f"format version {header.get('version')!r}; this reapkit reads {VERSION}"
        )
    last = -1.0
    for n, record in enumerate(records[1:], 2):
        t = record.get("t")
        if not isinstance(t, int | float) or t < last:
            raise TraceError(path, n, f"time {t!r} is not a number at or after {last}")
        last = float(t)
    return header, records[1:], truncated


class _Lines:
    """The lines of a gzip stream; a stream cut short ends the iteration and sets
    ``truncated``; corrupt data raises :class:`TraceError`."""

    def __init__(self, raw: Iterable[bytes], path: str) -> None:
        self.raw, self.path, self.truncated = raw, path, False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.raw
        except EOFError:
            self.truncated = True
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise TraceError(self.path, None, f"not a gzip stream, or corrupt: {exc}") from None


def _record(line: bytes, path: str, number: int) -> Mapping[str, Any]:
    try:
        record = json.loads(line, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TraceError(path, number, f"not a JSON object: {exc}") from None
    if not isinstance(record, dict) or record.get("k") not in _FIELDS:
        kind = record.get("k") if isinstance(record, dict) else None
        raise TraceError(path, number, f"not a trace record (kind {kind!r})")
    for key, (check, required) in _FIELDS[record["k"]].items():
        if key not in record:
            if required:
                raise TraceError(path, number, f"a {record['k']!r} record without {key!r}")
            continue
        why = check(record[key])
        if why:
            value = repr(record[key])
            shown = value if len(value) <= 60 else value[:57] + "..."
            raise TraceError(path, number, f"{record['k']}.{key} = {shown}: {why}")
    return record


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a trace holds")


# -- what each record holds: a check per field (its complaint, or "" if the value is fine) ----

Check = Callable[[Any], str]


def _int(low: int, high: int | None = None) -> Check:
    def check(v: Any) -> str:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
        ok = ok and (high is None or v <= high)
        return "" if ok else f"expected an integer {low}..{'' if high is None else high}"

    return check


def _maybe(check: Check) -> Check:
    return lambda v: "" if v is None else check(v)


def _text(v: Any) -> str:
    return "" if isinstance(v, str) and "\0" not in v else "expected text without NUL"


def _words(v: Any) -> str:
    ok = isinstance(v, list) and all(isinstance(a, str) and "\0" not in a for a in v)
    return "" if ok else "expected a list of texts without NUL"


def _absolute(v: Any) -> str:
    ok = isinstance(v, str) and v.startswith("/") and "\0" not in v
    return "" if ok and ".." not in v.split("/") else "expected an absolute path without '..'"


def _letter(v: Any) -> str:
    ok = isinstance(v, str) and len(v) == 1 and v.isascii() and v.isalpha()
    return "" if ok else "expected one letter"


def _finite(v: Any) -> str:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return "" if ok else "expected a finite number, at least 0"


def _pair(v: Any) -> str:
    ok = isinstance(v, list) and len(v) == 2 and all(v_ is None or not _finite(v_) for v_ in v)
    return "" if ok else "expected [some, full]"


def _counts(v: Any) -> str:
    ok = isinstance(v, dict) and all(isinstance(k, str) and not _int(0)(n) for k, n in v.items())
    return "" if ok else "expected names and counts"


def _pressure(v: Any) -> str:
    if not isinstance(v, dict):
        return "expected a pressure record"
    return _int(0)(v.get("some")) or _maybe(_int(0))(v.get("full"))


def _one_of(*values: object) -> Check:
    return lambda v: "" if v in values else f"expected one of {', '.join(map(repr, values))}"


def _mounts(v: Any) -> str:
    if not isinstance(v, list):
        return "expected a list of mounts"
    for m in v:
        if not isinstance(m, dict):
            return "expected a list of mounts"
        why = (
            _absolute(m.get("mountpoint")) or _one_of(1, 2)(m.get("version"))
            or _words(m.get("controllers")) or _absolute(m.get("root"))
        )  # fmt: skip
        if why:
            return why
    return ""


def _table(v: Any) -> str:
    return "" if isinstance(v, dict) else "expected an object"


_T: Final = (_finite, True)
_PID: Final = (_int(1), True)
_SIZE: Final = (_int(0), True)
#: Per kind (every kind a trace holds): field → (check, required).
_FIELDS: Final[Mapping[str, Mapping[str, tuple[Check, bool]]]] = {
    "header": {"page_size": (_int(1), False), "cgroup_mounts": (_mounts, False)},
    "mem": {"t": _T, **dict.fromkeys(("total", "avail", "free", "swap_total", "swap_free"), _SIZE)},
    "psi": {"t": _T, "res": (_one_of(*PSI_RESOURCES), True), "some": _SIZE,
            "full": (_maybe(_int(0)), False), "avg10": (_maybe(_pair), False)},
    "cgroup": {"t": _T, "path": (_absolute, True), "v": (_one_of(1, 2), True), "usage": _SIZE,
               "limit": _SIZE, "events": (_maybe(_counts), False),
               "pressure": (_maybe(_pressure), False)},
    "proc": {"t": _T, "pid": _PID, "start": _SIZE, "comm": (_text, False),
             "cmdline": (_words, False), "exe": (_text, False), "uid": (_int(0), False),
             "cgroup": (_text, False), "ppid": (_int(0), False), "state": (_letter, False),
             "rss": (_int(0), False), "swap": (_int(0), False), "score": (_int(0, 2000), False),
             "adj": (_int(-1000, 1000), False)},
    "exit": {"t": _T, "pid": _PID, "start": (_int(0), False)},
    "fork": {"t": _T, "pid": _PID, "ppid": (_int(0), False)},
    "exec": {"t": _T, "pid": _PID},
    "comm": {"t": _T, "pid": _PID, "comm": (_text, True)},
    "kill": {"t": _T, "record": (_table, True)},
    "gap": {"t": _T, "lost": _SIZE},
    "end": {"t": _T},
}  # fmt: skip


@attrs.define
class TraceWriter:
    """Writes trace records to ``path`` (mode 0600) from a thread of its own.

    :meth:`write` never blocks: records wait in a buffer that the thread takes in batches (a
    wake-up per :data:`BATCH_EVERY` seconds or :data:`BATCH_LINES` lines, not per record).
    Past ``capacity`` waiting records it drops the record and counts it; the next record
    written is preceded by a ``gap`` record. A write that fails (a full disk) ends the
    writing: :attr:`failed` holds the error, later records are dropped.
    """

    path: str
    #: Records waiting for the thread before new ones are dropped.
    capacity: int = QUEUE_LINES
    _waiting: collections.deque[tuple[str, Any]] = attrs.field(
        factory=collections.deque, init=False
    )
    _wake: threading.Event = attrs.field(factory=threading.Event, init=False)
    _thread: threading.Thread | None = attrs.field(default=None, init=False)
    _stream: _Segment | None = attrs.field(default=None, init=False)
    _dropped: int = attrs.field(default=0, init=False)
    _last_t: float = attrs.field(default=0.0, init=False)
    #: Lines written and lines dropped so far.
    written: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)
    failed: OSError | None = attrs.field(default=None, init=False)

    def open(self) -> None:
        """Create the file: ``OSError`` here, in the caller, if it cannot be."""
        if self._stream is None:
            self._stream = _open(self.path)

    def start(self, header: Mapping[str, Any]) -> None:
        """Start the writer thread, the file beginning with ``header`` (created now unless
        :meth:`open` did it)."""
        self.open()
        stream, self._stream = self._stream, None
        assert stream is not None
        self._thread = threading.Thread(
            target=self._run, args=(stream, dict(header)), name="reapkit-trace", daemon=True
        )
        self._thread.start()

    def write(self, record: Mapping[str, Any]) -> None:
        """Queue ``record``. Its ``t`` is raised to the last one written if it is earlier (a
        snapshot stamped before it was read, an event that arrived meanwhile): a trace's times
        never go back."""
        if self.failed is not None:
            return
        if record["t"] < self._last_t:
            record = {**record, "t": self._last_t}
        self._last_t = record["t"]
        if self._dropped:
            gap = {"t": record["t"], "k": "gap", "lost": self._dropped}
            if not self._put(("line", gap)):
                self._dropped += 1
                self.dropped += 1
                return
            self._dropped = 0
        if not self._put(("line", record)):
            self._dropped += 1
            self.dropped += 1

    def rotate(self, header: Mapping[str, Any]) -> bool:
        """Keep the current segment as ``PATH.1`` and start a new one with ``header`` (the
        caller then writes a keyframe: every process and figure afresh). Never blocks: with
        the buffer full (a stalled disk) the segment goes on, and this returns False."""
        if self.failed is not None or not self._put(("rotate", dict(header))):
            return False
        self._wake.set()
        return True

    def close(self, t: float, *, timeout: float = 5.0) -> None:
        """Write the ``end`` record and wait at most ``timeout`` for the thread to finish; a
        thread stuck in a write (a stalled disk) is left behind (a daemon thread)."""
        if self._thread is None:
            return
        self._waiting.append(("close", {"t": max(t, self._last_t), "k": "end"}))
        self._wake.set()
        self._thread.join(timeout)

    def _put(self, item: tuple[str, Any]) -> bool:
        if len(self._waiting) >= self.capacity:
            return False
        self._waiting.append(item)  # thread-safe, as popleft in the thread
        if len(self._waiting) >= BATCH_LINES:
            self._wake.set()
        return True

    def _run(self, stream: _Segment, header: dict[str, Any]) -> None:
        last_flush = time.monotonic()
        try:
            self._line(stream, header)
            while True:
                self._wake.wait(BATCH_EVERY)
                self._wake.clear()
                while self._waiting:
                    op, payload = self._waiting.popleft()
                    if op == "line":
                        self._line(stream, payload)
                    elif op == "rotate":
                        stream.close()
                        os.replace(self.path, f"{self.path}.1")
                        stream = _open(self.path)
                        self._line(stream, payload)
                    else:  # close
                        self._line(stream, payload)
                        return
                now = time.monotonic()
                if now - last_flush >= FLUSH_EVERY:
                    stream.flush()
                    last_flush = now
        except OSError as exc:
            self.failed = exc
        finally:
            try:
                stream.close()
            except OSError as exc:
                self.failed = self.failed or exc

    def _line(self, stream: _Segment, record: Mapping[str, Any]) -> None:
        stream.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self.written += 1


def write_trace(path: str, header: Mapping[str, Any], records: Iterable[Mapping[str, Any]]) -> None:
    """Write a whole trace at once, every record (a synthetic one: ``TraceBuilder.write``)."""
    segment = _open(path)
    try:
        for record in (header, *records):
            segment.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
    finally:
        segment.close()


class _Segment:
    """A gzip stream over a file it owns (``GzipFile`` does not close a file it was given)."""

    def __init__(self, path: str) -> None:
        # Mode 0600 (a trace holds command lines); an existing file keeps its mode through
        # O_CREAT, hence the fchmod.
        # O_NOFOLLOW: a link planted at the path (the daemon writes as root) is refused.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            self.file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        self.gzip = gzip.GzipFile(fileobj=self.file, mode="wb", compresslevel=6)

    def write(self, data: bytes) -> None:
        self.gzip.write(data)

    def flush(self) -> None:
        self.gzip.flush()  # Z_SYNC_FLUSH: all written so far can be read back

    def close(self) -> None:
        try:
            self.gzip.close()
        finally:
            self.file.close()


def _open(path: str) -> _Segment:
    return _Segment(path)

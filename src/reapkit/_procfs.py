"""Readers for ``/proc``, with the root an explicit parameter.

psutil's own regret (its ``docs/DEVNOTES.md``) was a global ``/proc`` path and mutable records;
here the root is given to :class:`ProcFS` and every record is an ``attrs`` frozen class, so tests
point a :class:`ProcFS` at a fake tree (``reapkit.testing.FakeProc``).

Two layers:

* ``parse_*`` functions take the bytes of one file and return a record. They are pure (usable
  with hypothesis); input they cannot turn into a record (empty, truncated, garbled) raises
  :class:`~reapkit._errors.ProcFormatError` and no other exception. Only the fields that are
  used are checked: garbage in a ``stat`` field after rss, or in a status line not read, passes.
* :class:`ProcFS` reads the files with ``os.open`` + ``os.read`` (no ``open()``, no buffering
  layer) and maps ``OSError`` the way psutil's ``wrap_exceptions`` does: a vanished process is
  :class:`~reapkit._errors.NoSuchProcess`, a refused read :class:`~reapkit._errors.AccessDenied`.

Every size is in bytes: pages are multiplied by the page size, ``kB`` by 1024.

Every text file the kernel generates here ends with a newline; a missing final newline means a
truncated read and is a :class:`~reapkit._errors.ProcFormatError` (otherwise ``rss 1234``
truncated to ``rss 12`` would parse silently). ``cmdline`` is the exception: it is raw argv
memory, not a text record.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import types
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

import attrs

from ._errors import AccessDenied, NoSuchProcess, ProcFormatError

log = logging.getLogger("reapkit.procfs")

__all__ = [
    "DEAD_STATES",
    "FILES_SPARE",
    "MAX_ANCESTRY",
    "OOM_SCORE_ADJ_MAX",
    "OOM_SCORE_ADJ_MIN",
    "PF_EXITING",
    "PF_KTHREAD",
    "REAL_PROC",
    "CgroupEntry",
    "KeptScoreFiles",
    "MemInfo",
    "ProcFS",
    "ProcStat",
    "ProcStatm",
    "ProcStatus",
    "ProcessInfo",
    "in_subtree",
    "parse_boot_time",
    "parse_cgroup",
    "parse_cmdline",
    "parse_comm",
    "parse_meminfo",
    "parse_oom_score",
    "parse_oom_score_adj",
    "parse_stat",
    "parse_statm",
    "parse_status",
]

PF_KTHREAD = 0x00200000
"""``task_struct.flags`` bit of a kernel thread (include/linux/sched.h), ``stat`` field 9."""
PF_EXITING = 0x00000004
"""``task_struct.flags`` bit set at the start of ``do_exit()``, before the exit event is sent."""
DEAD_STATES = frozenset({"Z", "X"})
"""``stat`` states of a task that has exited (fs/proc/array.c ``task_state_array``)."""
OOM_SCORE_ADJ_MIN = -1000
"""``oom_score_adj`` of a process the kernel never kills (include/uapi/linux/oom.h)."""
OOM_SCORE_ADJ_MAX = 1000
"""The highest ``oom_score_adj``: killed first (include/uapi/linux/oom.h)."""
REAL_PROC = "/proc"
"""The kernel's ``/proc``: a :class:`ProcFS` rooted anywhere else reads a copy or a fake."""
MAX_ANCESTRY = 4096
"""A deeper parent chain than any real tree: :func:`in_subtree` stops walking there."""

# 2**64 - 1 has 20 digits. The cap also keeps garbage far below int()'s 4300-digit limit, whose
# ValueError would otherwise leak out of the parsers.
_MAX_DIGITS = 20

# Bytes asked of the first read(). procfs seq_files fill the whole buffer unless they reach EOF,
# so a short read is the end of the file and most files take one read() call.
_SMALL_READ = 4096  # stat (< 1.2 KiB with 52 fields and a 64-byte comm), statm, oom_score, comm
_BIG_READ = 16384  # status, meminfo, cgroup, cmdline: may exceed one page


def _decode(raw: bytes) -> str:
    # comm, cmdline and cgroup paths are arbitrary bytes: keep them lossless and never raise.
    return raw.decode("utf-8", "surrogateescape")


def _show(raw: bytes) -> str:
    return repr(raw[:40]) + ("..." if len(raw) > 40 else "")


def _uint(field: bytes, path: str, what: str) -> int:
    # bytes.isdigit() is ASCII-only, unlike str.isdigit(); it is False for b"".
    if not field.isdigit() or len(field) > _MAX_DIGITS:
        raise ProcFormatError(path, f"{what}: expected a decimal number, got {_show(field)}")
    return int(field)


def _int(field: bytes, path: str, what: str) -> int:
    if field.startswith(b"-"):
        return -_uint(field[1:], path, what)
    return _uint(field, path, what)


def _body(data: bytes, path: str) -> bytes:
    """The file without its final newline; an empty or unterminated file is an error."""
    if not data:
        raise ProcFormatError(path, "empty file")
    if not data.endswith(b"\n"):
        raise ProcFormatError(path, "no final newline (truncated read?)")
    return data[:-1]


def _kb(value: bytes, path: str, what: str) -> int:
    """``"    1600 kB"`` (status and meminfo format) -> bytes."""
    parts = value.split()
    if len(parts) != 2 or parts[1] != b"kB":
        raise ProcFormatError(path, f"{what}: expected '<number> kB', got {_show(value)}")
    return _uint(parts[0], path, what) * 1024


# --------------------------------------------------------------------------------------------
# Records


@attrs.frozen
class ProcStat:
    """``/proc/<pid>/stat``, the fields victim selection and identity checks use.

    Times are in clock ticks (``os.sysconf("SC_CLK_TCK")``); ``start_time`` counts from boot and,
    with the pid, identifies a process across PID reuse. ``vsize`` and ``rss`` are in bytes.
    """

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    utime: int
    stime: int
    num_threads: int
    start_time: int
    vsize: int
    rss: int

    @property
    def is_kernel_thread(self) -> bool:
        """Kernel threads have no user memory to free: never OOM victims."""
        return bool(self.flags & PF_KTHREAD)


@attrs.frozen
class ProcStatm:
    """``/proc/<pid>/statm`` in bytes (all zero for kernel threads and zombies: no mm)."""

    size: int
    resident: int
    shared: int
    text: int
    data: int


@attrs.frozen
class ProcStatus:
    """``/proc/<pid>/status``, the identity, credential and memory lines.

    ``uids`` and ``gids`` are (real, effective, saved, filesystem). ``vm_rss`` and ``vm_swap``
    are ``None`` for tasks without an mm (kernel threads, zombies): the kernel omits the Vm lines.
    """

    name: str
    state: str
    tgid: int
    pid: int
    ppid: int
    uids: tuple[int, int, int, int]
    gids: tuple[int, int, int, int]
    threads: int
    vm_rss: int | None
    vm_swap: int | None
    #: Private anonymous memory (``RssAnon``): what the process's exit frees for sure.
    rss_anon: int | None = None


@attrs.frozen
class CgroupEntry:
    """One line of ``/proc/<pid>/cgroup``: ``hierarchy-id:controllers:path``.

    The cgroup v2 line is ``0::<path>`` (``controllers == ()``); v1 named hierarchies keep their
    ``name=...`` entry as it is.
    """

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


def frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy, for mapping fields of frozen records."""
    return types.MappingProxyType(dict(value))


@attrs.frozen
class MemInfo:
    """``/proc/meminfo`` in bytes.

    ``total`` and ``available`` are required (MemAvailable exists since Linux 3.14); the others
    are 0 when their line is missing. ``fields`` holds every line, in bytes, except the unitless
    counts (``HugePages_Total`` ...) which keep their raw number; it is read-only and left out of
    the hash and the repr.
    """

    total: int
    free: int
    available: int
    buffers: int
    cached: int
    swap_total: int
    swap_free: int
    fields: Mapping[str, int] = attrs.field(
        converter=frozen_mapping, hash=False, repr=False, factory=dict
    )


@attrs.frozen
class ProcessInfo:
    """What victim selection needs about one process, from two reads: ``stat`` and
    ``oom_score``. ``rss`` is in bytes; ``start_time`` (ticks since boot) guards against PID
    reuse between selection and kill."""

    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    start_time: int
    rss: int
    oom_score: int

    @property
    def is_kernel_thread(self) -> bool:
        """Kernel threads have no user memory to free: never OOM victims."""
        return bool(self.flags & PF_KTHREAD)


# --------------------------------------------------------------------------------------------
# Parsers: bytes in, record or ProcFormatError out.

# Fields after the comm, counted from field 3 (state); field 24 (rss) is the last one needed.
_STAT_FIELDS_NEEDED = 24 - 2


def _split_stat(data: bytes, path: str, pid: int | None) -> tuple[int, bytes, list[bytes]]:
    """Split ``stat`` into (pid, comm, [field 3, field 4, ...])."""
    body = _body(data, path)
    # The comm (field 2) may contain spaces, parentheses and newlines (prctl(PR_SET_NAME) takes
    # any bytes but NUL), so "1 (a) Z 1 () S ..." is legal: the comm ends at the LAST ')'
    # (psutil and procps do the same). Fields 3 onwards are numbers, never ')'.
    lparen = body.find(b" (")
    rparen = body.rfind(b")")
    if lparen < 0 or rparen < lparen + 2:
        raise ProcFormatError(path, "no '(comm)' after the pid")
    file_pid = _uint(body[:lparen], path, "pid (field 1)")
    if pid is not None and file_pid != pid:
        raise ProcFormatError(path, f"pid field is {file_pid}, expected {pid}")
    if body[rparen + 1 : rparen + 2] != b" ":
        raise ProcFormatError(path, "no field after the comm")
    # maxsplit: fields 25..52 stay one unsplit tail, ~30 fewer bytes objects per call.
    fields = body[rparen + 2 :].split(b" ", _STAT_FIELDS_NEEDED)
    if len(fields) < _STAT_FIELDS_NEEDED:
        raise ProcFormatError(
            path, f"{len(fields) + 2} fields, at least 24 needed (truncated read?)"
        )
    return file_pid, body[lparen + 2 : rparen], fields


def _stat_state(field: bytes, path: str) -> str:
    # One letter: R S D Z T t X I P ... (fs/proc/array.c task_state_array).
    if len(field) != 1 or not field.isalpha():
        raise ProcFormatError(path, f"state (field 3): expected one letter, got {_show(field)}")
    return field.decode("ascii")


def parse_stat(data: bytes, *, path: str, page_size: int, pid: int | None = None) -> ProcStat:
    """Parse ``/proc/<pid>/stat``; if *pid* is given the file's pid field must equal it."""
    file_pid, comm, f = _split_stat(data, path, pid)
    # f[n - 3] is field n of proc_pid_stat(5).
    return ProcStat(
        pid=file_pid,
        comm=_decode(comm),
        state=_stat_state(f[0], path),
        ppid=_uint(f[1], path, "ppid (field 4)"),
        pgrp=_uint(f[2], path, "pgrp (field 5)"),
        session=_uint(f[3], path, "session (field 6)"),
        flags=_uint(f[6], path, "flags (field 9)"),
        utime=_uint(f[11], path, "utime (field 14)"),
        stime=_uint(f[12], path, "stime (field 15)"),
        num_threads=_uint(f[17], path, "num_threads (field 20)"),
        start_time=_uint(f[19], path, "starttime (field 22)"),
        vsize=_uint(f[20], path, "vsize (field 23)"),
        rss=_uint(f[21], path, "rss (field 24)") * page_size,
    )


def parse_statm(data: bytes, *, path: str, page_size: int) -> ProcStatm:
    """Parse ``/proc/<pid>/statm`` (``size resident shared text lib data dt``, in pages)."""
    f = _body(data, path).split(b" ")
    if len(f) < 6:
        raise ProcFormatError(path, f"{len(f)} fields, at least 6 needed (truncated read?)")
    return ProcStatm(
        size=_uint(f[0], path, "size") * page_size,
        resident=_uint(f[1], path, "resident") * page_size,
        shared=_uint(f[2], path, "shared") * page_size,
        text=_uint(f[3], path, "text") * page_size,
        # f[4] is "lib", always 0 since Linux 2.6.
        data=_uint(f[5], path, "data") * page_size,
    )


def _unescape_name(raw: bytes) -> bytes:
    # status writes the comm through seq_escape_str(..., ESCAPE_SPACE | ESCAPE_SPECIAL, "\n\\")
    # (fs/proc/array.c proc_task_name): only newline -> "\n" and backslash -> "\\".
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        pair = raw[i : i + 2]
        if pair == b"\\n":
            out += b"\n"
            i += 2
        elif pair == b"\\\\":
            out += b"\\"
            i += 2
        else:
            out += raw[i : i + 1]
            i += 1
    return bytes(out)


def _ids(value: bytes, path: str, what: str) -> tuple[int, int, int, int]:
    parts = value.split()
    if len(parts) != 4:
        raise ProcFormatError(path, f"{what}: expected 4 numbers, got {_show(value)}")
    return (
        _uint(parts[0], path, what),
        _uint(parts[1], path, what),
        _uint(parts[2], path, what),
        _uint(parts[3], path, what),
    )


def parse_status(data: bytes, *, path: str) -> ProcStatus:
    """Parse ``/proc/<pid>/status`` (``Key:\\tvalue`` lines)."""
    values: dict[bytes, bytes] = {}
    for line in _body(data, path).split(b"\n"):
        key, sep, value = line.partition(b":")
        if not sep or not key:
            raise ProcFormatError(path, f"not a 'Key:\\tvalue' line: {_show(line)}")
        # The kernel writes "Key:\t"; drop only that tab (the Name may end with spaces).
        values[key] = value.removeprefix(b"\t")

    def need(key: bytes) -> bytes:
        try:
            return values[key]
        except KeyError:
            raise ProcFormatError(path, f"no {key.decode()} line") from None

    state = need(b"State").split(b" ", 1)[0]  # "S (sleeping)"
    if len(state) != 1 or not state.isalpha():
        raise ProcFormatError(path, f"State: expected a letter, got {_show(state)}")
    rss = values.get(b"VmRSS")
    swap = values.get(b"VmSwap")
    anon = values.get(b"RssAnon")
    return ProcStatus(
        name=_decode(_unescape_name(need(b"Name"))),
        state=state.decode("ascii"),
        tgid=_uint(need(b"Tgid").strip(), path, "Tgid"),
        pid=_uint(need(b"Pid").strip(), path, "Pid"),
        ppid=_uint(need(b"PPid").strip(), path, "PPid"),
        uids=_ids(need(b"Uid"), path, "Uid"),
        gids=_ids(need(b"Gid"), path, "Gid"),
        threads=_uint(need(b"Threads").strip(), path, "Threads"),
        # No mm (kernel thread, zombie): task_mem() is not called and the Vm lines are absent.
        vm_rss=None if rss is None else _kb(rss, path, "VmRSS"),
        vm_swap=None if swap is None else _kb(swap, path, "VmSwap"),
        rss_anon=None if anon is None else _kb(anon, path, "RssAnon"),
    )


def parse_cgroup(data: bytes, *, path: str) -> tuple[CgroupEntry, ...]:
    """Parse ``/proc/<pid>/cgroup``: one :class:`CgroupEntry` per line, in file order.

    The kernel does not escape cgroup names: a path containing a newline cannot be told apart
    from two lines, and such a file will not parse. A removed v2 cgroup is shown with a
    ``" (deleted)"`` suffix (kernel/cgroup/cgroup.c proc_cgroup_show), kept in ``path``.
    """
    entries: list[CgroupEntry] = []
    for line in _body(data, path).split(b"\n"):
        hid, sep1, rest = line.partition(b":")
        controllers, sep2, cg_path = rest.partition(b":")  # the path itself may contain ':'
        if not (sep1 and sep2) or not cg_path.startswith(b"/"):
            raise ProcFormatError(path, f"not an 'id:controllers:/path' line: {_show(line)}")
        # The v2 line has no controllers: b"".split(b",") would give (b"",), not ().
        names = tuple(_decode(c) for c in controllers.split(b",")) if controllers else ()
        entries.append(
            CgroupEntry(
                hierarchy_id=_uint(hid, path, "hierarchy id"),
                controllers=names,
                path=_decode(cg_path),
            )
        )
    return tuple(entries)


def parse_cmdline(data: bytes) -> tuple[str, ...]:
    """Parse ``/proc/<pid>/cmdline`` into argv; never fails.

    Empty for kernel threads and zombies (no mm). The argv area is process memory, and
    setproctitle()-style rewriting breaks the NUL-separated layout; like psutil:

    * trailing NULs are padding of a shortened argv area and are dropped (so a genuinely empty
      last argument is lost);
    * with no NUL at all (the terminator was overwritten) the text is split at spaces;
    * a single NUL-terminated string containing spaces is split at spaces too (Chrome,
      ``nginx: worker process``; psutil#1179). A real one-element argv with a space in it
      (``/opt/My App/app`` run without arguments) is split as well: it cannot be told apart.
    """
    body = data.rstrip(b"\0")
    if not body:
        return ()
    args = body.split(b"\0")
    if len(args) == 1 and b" " in body:
        args = [a for a in body.split(b" ") if a]
    return tuple(_decode(a) for a in args)


def parse_comm(data: bytes, *, path: str) -> str:
    """Parse ``/proc/<pid>/comm``: the name with only its final newline removed.

    The name may itself be empty or contain newlines and spaces (prctl(PR_SET_NAME)).
    """
    return _decode(_body(data, path))


def parse_oom_score(data: bytes, *, path: str) -> int:
    """Parse ``/proc/<pid>/oom_score`` (0 to 2000 since Linux 5.9, unsigned always)."""
    return _uint(_body(data, path), path, "oom_score")


def parse_oom_score_adj(data: bytes, *, path: str) -> int:
    """Parse ``/proc/<pid>/oom_score_adj`` (-1000 to 1000)."""
    value = _int(_body(data, path), path, "oom_score_adj")
    if not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
        raise ProcFormatError(path, f"oom_score_adj {value} outside [-1000, 1000]")
    return value


def parse_meminfo(data: bytes, *, path: str) -> MemInfo:
    """Parse ``/proc/meminfo``; ``kB`` values become bytes, unitless values stay as they are."""
    fields: dict[str, int] = {}
    for line in _body(data, path).split(b"\n"):
        key, sep, value = line.partition(b":")
        parts = value.split()
        if not sep or not key or not parts:
            raise ProcFormatError(path, f"not a 'Key: value' line: {_show(line)}")
        name = _decode(key)
        if len(parts) == 1:
            # Lines without a unit are counts, not sizes (mm/hugetlb.c hugetlb_report_meminfo).
            fields[name] = _uint(parts[0], path, name)
        else:
            fields[name] = _kb(value, path, name)
    for required in ("MemTotal", "MemAvailable"):
        if required not in fields:
            raise ProcFormatError(path, f"no {required} line")
    return MemInfo(
        total=fields["MemTotal"],
        free=fields.get("MemFree", 0),
        available=fields["MemAvailable"],
        buffers=fields.get("Buffers", 0),
        cached=fields.get("Cached", 0),
        swap_total=fields.get("SwapTotal", 0),
        swap_free=fields.get("SwapFree", 0),
        fields=fields,
    )


def parse_boot_time(data: bytes, *, path: str) -> float:
    """The ``btime`` line of ``/proc/stat``: boot time in seconds since the epoch."""
    for line in _body(data, path).split(b"\n"):
        if line.startswith(b"btime "):
            return float(_uint(line[6:].strip(), path, "btime"))
    raise ProcFormatError(path, "no btime line")


# --------------------------------------------------------------------------------------------
# Reading


def read_file(path: str) -> bytes:
    """A whole small file (``/proc``, cgroup and pressure files) with raw system calls:
    ``OSError`` propagates unmapped."""
    return _read(path, _BIG_READ)


def _read(path: str, bufsize: int) -> bytes:
    """Read a whole file with raw syscalls; ``OSError`` propagates unmapped."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, bufsize)
        if len(data) < bufsize:
            # procfs fills the buffer unless it reached EOF (seq_read_iter, and
            # proc_pid_cmdline_read loops page by page): one read() is enough.
            return data
        chunks = [data]
        while chunk := os.read(fd, bufsize):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def in_subtree(pid: int, root: int, parent_of: Callable[[int], int], memo: dict[int, bool]) -> bool:
    """Whether ``pid`` is ``root`` or descends from it, walking up its parents.

    ``parent_of`` gives a PID's parent (``0`` where unknown); what it raises (an ancestor
    vanished) is raised, with the PIDs walked until then remembered as outside. The walk ends
    at PID 1 or a parent of 0 (PID 1 and kthreadd have parent 0 as their namespace sees
    them), at a loop (a PID reused while the chain was walked) and after
    :data:`MAX_ANCESTRY` steps. ``memo`` keeps the answer for each PID walked, for the next
    call with the same ``root``: a walk stops at the first PID it knows."""
    chain: list[int] = []
    inside = False
    try:
        while pid > 0 and len(chain) < MAX_ANCESTRY:
            if pid == root:
                inside = True
                break
            known = memo.get(pid)
            if known is not None:
                inside = known
                break
            chain.append(pid)
            if pid == 1:
                break
            memo[pid] = False  # until known: a loop back here ends the walk outside
            pid = parent_of(pid)
    finally:
        for step in chain:
            memo[step] = inside
    return inside


class ProcFS:
    """A ``/proc`` tree: the real one by default, or any directory laid out like it.

    Per-process readers raise :class:`~reapkit._errors.NoSuchProcess` when the process is gone
    (ENOENT, or ESRCH from a read racing with exit), :class:`~reapkit._errors.AccessDenied`
    when a read is refused, and :class:`~reapkit._errors.ProcFormatError` for unexpected content.
    A process can vanish between any two reads: callers walking :meth:`pids` skip
    ``NoSuchProcess``.
    """

    __slots__ = ("page_size", "root")

    def __init__(
        self, root: str | os.PathLike[str] = REAL_PROC, *, page_size: int | None = None
    ) -> None:
        self.root: str = os.fspath(root).rstrip("/") or "/"
        if page_size is None:
            page_size = os.sysconf("SC_PAGE_SIZE")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size: int = page_size

    def __repr__(self) -> str:
        return f"ProcFS({self.root!r}, page_size={self.page_size})"

    @property
    def is_real(self) -> bool:
        """Whether this reads the kernel's own ``/proc`` (not a copy or a fake tree): only
        then may what it shows be acted on (signals, kept-open files, pidfds)."""
        return self.root == REAL_PROC

    # -- file access ---------------------------------------------------------------------------

    def _read_pid(self, pid: int, name: str, bufsize: int = _SMALL_READ) -> tuple[str, bytes]:
        path = f"{self.root}/{pid}/{name}"
        try:
            return path, _read(path, bufsize)
        except (FileNotFoundError, ProcessLookupError):
            # ENOENT: the /proc/<pid> directory is gone (exited and reaped). ESRCH: the open
            # succeeded but the task exited before the read (psutil's wrap_exceptions).
            raise NoSuchProcess(pid) from None
        except PermissionError:
            raise AccessDenied(pid, path) from None

    def _read_global(self, name: str, bufsize: int = _BIG_READ) -> tuple[str, bytes]:
        path = f"{self.root}/{name}"
        try:
            return path, _read(path, bufsize)
        except FileNotFoundError:
            raise ProcFormatError(
                path, f"does not exist: is a proc filesystem mounted at {self.root}?"
            ) from None
        except PermissionError:
            raise AccessDenied(None, path) from None

    def read_bytes(self, relpath: str) -> bytes:
        """The raw content of ``<root>/<relpath>``, errors mapped as for the readers.

        A path whose first component is a number is a per-process file.
        """
        relpath = relpath.lstrip("/")
        first, _, rest = relpath.partition("/")
        if rest and first.isascii() and first.isdigit():
            return self._read_pid(int(first), rest, _BIG_READ)[1]
        return self._read_global(relpath)[1]

    # -- whole system --------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The process ids (thread-group leaders) listed in the root, sorted."""
        # str.isdigit() accepts non-ASCII digits such as "²": require ASCII as well.
        return sorted(int(n) for n in os.listdir(self.root) if n.isascii() and n.isdigit())

    def pid_exists(self, pid: int) -> bool:
        """Whether *pid* is a live or zombie process (not merely a thread id).

        ``/proc/<tid>`` exists for every thread although only leaders are listed, so the
        ``Tgid`` of ``status`` must equal *pid* (psutil#687).
        """
        if pid <= 0:
            return False
        try:
            return self.status(pid).tgid == pid
        except NoSuchProcess:
            return False
        except (AccessDenied, ProcFormatError):
            return os.path.isdir(f"{self.root}/{pid}")

    def meminfo(self) -> MemInfo:
        """``<root>/meminfo``."""
        path, data = self._read_global("meminfo")
        return parse_meminfo(data, path=path)

    def boot_time(self) -> float:
        """Boot time in seconds since the epoch (``btime`` of ``<root>/stat``)."""
        path, data = self._read_global("stat")
        return parse_boot_time(data, path=path)

    # -- per process ---------------------------------------------------------------------------

    def stat(self, pid: int) -> ProcStat:
        """``<root>/<pid>/stat``."""
        path, data = self._read_pid(pid, "stat")
        return parse_stat(data, path=path, page_size=self.page_size, pid=pid)

    def statm(self, pid: int) -> ProcStatm:
        """``<root>/<pid>/statm``."""
        path, data = self._read_pid(pid, "statm")
        return parse_statm(data, path=path, page_size=self.page_size)

    def status(self, pid: int) -> ProcStatus:
        """``<root>/<pid>/status``."""
        path, data = self._read_pid(pid, "status", _BIG_READ)
        return parse_status(data, path=path)

    def vm_swap(self, pid: int) -> int | None:
        """``VmSwap`` of ``<root>/<pid>/status`` in bytes, without parsing the rest; ``None``
        for a task without memory (kernel thread, zombie). The ``Name`` line cannot fake the
        line: the kernel escapes a newline in it."""
        path, data = self._read_pid(pid, "status", _BIG_READ)
        start = data.find(b"\nVmSwap:")
        if start < 0:
            return None
        end = data.find(b"\n", start + 1)
        return _kb(data[start + 8 : end if end >= 0 else None].strip(), path, "VmSwap")

    def oom_score(self, pid: int) -> int:
        """``<root>/<pid>/oom_score``: the kernel's badness, 0 to 2000."""
        path, data = self._read_pid(pid, "oom_score")
        return parse_oom_score(data, path=path)

    def oom_score_adj(self, pid: int) -> int:
        """``<root>/<pid>/oom_score_adj``: -1000 (never kill) to 1000."""
        path, data = self._read_pid(pid, "oom_score_adj")
        return parse_oom_score_adj(data, path=path)

    def cgroup(self, pid: int) -> tuple[CgroupEntry, ...]:
        """``<root>/<pid>/cgroup``."""
        path, data = self._read_pid(pid, "cgroup", _BIG_READ)
        return parse_cgroup(data, path=path)

    def cmdline(self, pid: int) -> tuple[str, ...]:
        """``<root>/<pid>/cmdline`` as argv; ``()`` for kernel threads and zombies."""
        return parse_cmdline(self._read_pid(pid, "cmdline", _BIG_READ)[1])

    def comm(self, pid: int) -> str:
        """``<root>/<pid>/comm`` without its final newline."""
        path, data = self._read_pid(pid, "comm")
        return parse_comm(data, path=path)

    def exe(self, pid: int) -> str:
        """The executable's path (``<root>/<pid>/exe``), only if it is verified: the file at
        that path in the reader's mount namespace is the file the process runs. ``""`` for a
        file bind-mounted or private to another mount namespace, deleted or replaced
        (``" (deleted)"``), for kernel threads, vanished processes, or where it cannot be read
        (another user's process without CAP_SYS_PTRACE)."""
        link = f"{self.root}/{pid}/exe"
        try:
            running = os.stat(link)  # the file the process runs, wherever it was mounted
            path = os.readlink(link)
            on_disk = os.lstat(path) if path.startswith("/") else None  # a link is no proof
        except OSError:
            return ""
        return path if on_disk is not None and os.path.samestat(running, on_disk) else ""

    def selection_stat(self, pid: int) -> tuple[int, str, int, str, int, int]:
        """From one read of ``stat``: (start_time, comm, ppid, state, rss in bytes, flags) —
        what a :class:`~reapkit.Candidate` holds beside its ``oom_score``."""
        path, data = self._read_pid(pid, "stat")
        # Built straight from the split fields: no intermediate ProcStat on this hot path.
        _, comm, f = _split_stat(data, path, pid)
        return (
            _uint(f[19], path, "starttime (field 22)"),
            _decode(comm),
            _uint(f[1], path, "ppid (field 4)"),
            _stat_state(f[0], path),
            _uint(f[21], path, "rss (field 24)") * self.page_size,
            _uint(f[6], path, "flags (field 9)"),
        )

    def oom_scores(
        self, pids: Iterable[int], kept: KeptScoreFiles | None = None
    ) -> list[tuple[int, int]]:
        """``(pid, oom_score)`` of each of ``pids`` that still exists and can be read, in
        order: one small read per process (one ``pread`` with ``kept`` files), the cheapest
        view of a whole scope. A process that vanished or is unreadable is left out."""
        if kept is not None:
            return kept.read(pids)
        out: list[tuple[int, int]] = []
        _read_scores(self.root, pids, out)
        return out

    def process_info(self, pid: int) -> ProcessInfo:
        """The victim-selection view of *pid*, from exactly two reads: ``stat``, ``oom_score``.

        The two reads are not atomic: the process may exit between them (NoSuchProcess), and
        in theory its pid could be reused in between. The ``start_time`` returned is the one to
        check against when the victim's pidfd is opened.
        """
        start_time, comm, ppid, state, rss, flags = self.selection_stat(pid)
        score_path, score = self._read_pid(pid, "oom_score")
        return ProcessInfo(
            pid=pid,
            comm=comm,
            state=state,
            ppid=ppid,
            flags=flags,
            start_time=start_time,
            rss=rss,
            oom_score=parse_oom_score(score, path=score_path),
        )


def _read_scores(root: str, pids: Iterable[int], out: list[tuple[int, int]]) -> None:
    for pid in pids:
        try:
            out.append((pid, _score(_read(f"{root}/{pid}/oom_score", _SMALL_READ), root, pid)))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone, or not ours to read
        except ProcFormatError as exc:  # not from a kernel; a broken fake tree
            log.debug("%s", exc)


def _score(data: bytes, root: str, pid: int) -> int:
    """``parse_oom_score``, with a fast path for what the kernel writes: digits, newline."""
    digits = data[:-1]
    if data[-1:] == b"\n" and digits.isdigit() and len(digits) <= _MAX_DIGITS:
        return int(digits)
    return parse_oom_score(data, path=f"{root}/{pid}/oom_score")


#: Open files left for everything else when ``oom_score`` files are kept open.
FILES_SPARE = 256
#: Kept files given back when the descriptors run out all the same.
_SPARE_ON_EMFILE = 64


class KeptScoreFiles:
    """``/proc/<pid>/oom_score`` files kept open between decisions, so that reading a
    scope's scores costs one ``pread`` per process instead of ``open`` + ``read`` +
    ``close`` (about 2.5x faster here).

    The price is kernel memory: procfs allocates a 4 KiB buffer for an open file at its first
    read and keeps it until the file is closed — about 4.3 KiB of unreclaimable memory per
    process kept (43 MiB for 10,000). Hence a limit on the files kept (``limit``; past it the
    rest is read the plain way) and :meth:`retain`, which closes the files of processes no
    longer in any scope.

    An open file stays bound to the process it was opened for (procfs holds its ``struct
    pid``): once that process is gone, a read fails with ``ESRCH`` rather than reading a
    process that reused the PID. The file is closed and the PID read afresh; a newcomer's own
    file is opened at the next read.
    """

    __slots__ = ("_fds", "_procfs", "limit")

    def __init__(self, procfs: ProcFS, limit: int) -> None:
        self._procfs = procfs
        self._fds: dict[int, int] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._fds)

    def _open(self, pid: int) -> int | None:
        try:
            fd = os.open(f"{self._procfs.root}/{pid}/oom_score", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            # Out of file descriptors (a lower soft limit than planned, or the whole system):
            # give back a spare for the program and the plain reads, keep the rest, say so.
            self.limit = max(0, len(self._fds) - _SPARE_ON_EMFILE)
            for kept in list(self._fds)[self.limit :]:
                os.close(self._fds.pop(kept))
            log.warning(
                "keeping %d oom_score files open, not more: %s (RLIMIT_NOFILE soft limit"
                " %d); the others are read afresh",
                self.limit, os.strerror(exc.errno), resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )  # fmt: skip
            return None
        self._fds[pid] = fd
        return fd

    def read(self, pids: Iterable[int]) -> list[tuple[int, int]]:
        """``(pid, oom_score)`` for each of ``pids`` that can be read, as
        :meth:`ProcFS.oom_scores`."""
        fds, pread, root = self._fds, os.pread, self._procfs.root
        out: list[tuple[int, int]] = []
        for pid in pids:
            fd = fds.get(pid)
            if fd is None and len(fds) < self.limit:
                fd = self._open(pid)
            if fd is not None:
                try:
                    out.append((pid, _score(pread(fd, _SMALL_READ, 0), root, pid)))
                    continue
                except OSError:
                    # ESRCH: opened for a process that is gone, and the PID may be another's
                    # by now; or any other failure of this file. Read the PID afresh (its own
                    # file is opened at the next decision).
                    os.close(fds.pop(pid))
                except ProcFormatError as exc:
                    log.debug("%s", exc)
                    continue
            _read_scores(root, (pid,), out)
        return out

    def retain(self, pids: Container[int]) -> None:
        """Close the files of processes not in ``pids``."""
        for pid in [p for p in self._fds if p not in pids]:
            os.close(self._fds.pop(pid))

    def close(self) -> None:
        """Close every file kept."""
        self.retain(())

"""A fake ``/proc`` tree for tests (earlyoom's ``mockProc`` idea).

:class:`FakeProc` writes files laid out and formatted as the kernel writes them, so that
``ProcFS(fake.root)`` reads them back exactly. It refuses combinations the kernel cannot
produce (a zombie with resident memory, a NUL in a name); :meth:`FakeProc.write` puts any bytes
anywhere for hostile-input tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from .._procfs import DEAD_STATES, OOM_SCORE_ADJ_MAX, OOM_SCORE_ADJ_MIN, PF_KTHREAD

__all__ = ["FakeProc"]

# fs/proc/array.c task_state_array, plus the letters older kernels used.
_STATE_NAMES = {
    "R": "running",
    "S": "sleeping",
    "D": "disk sleep",
    "T": "stopped",
    "t": "tracing stop",
    "X": "dead",
    "Z": "zombie",
    "P": "parked",
    "I": "idle",
}

# Line order and defaults of /proc/meminfo (fs/proc/meminfo.c), in bytes. set_meminfo's keyword
# arguments replace these; other names are appended.
_MEMINFO_LINES = (
    "MemTotal",
    "MemFree",
    "MemAvailable",
    "Buffers",
    "Cached",
    "SwapCached",
    "Active",
    "Inactive",
    "Active(anon)",
    "Inactive(anon)",
    "Active(file)",
    "Inactive(file)",
    "Unevictable",
    "Mlocked",
    "SwapTotal",
    "SwapFree",
    "Dirty",
    "Writeback",
    "AnonPages",
    "Mapped",
    "Shmem",
    "Slab",
    "SReclaimable",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "CommitLimit",
    "Committed_AS",
    "HugePages_Total",
    "HugePages_Free",
    "HugePages_Rsvd",
    "HugePages_Surp",
    "Hugepagesize",
)
# Printed without " kB": page counts (mm/hugetlb.c hugetlb_report_meminfo).
_MEMINFO_UNITLESS = frozenset(
    {"HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "HugePages_Surp"}
)
_MEMINFO_DEFAULTS = {"Hugepagesize": 2048 * 1024}

_U64_MAX = 2**64 - 1


def _escape_status_name(name: bytes) -> bytes:
    # fs/proc/array.c proc_task_name(escape=true): only "\n" and "\\" are escaped.
    return name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class FakeProc:
    """A directory laid out like ``/proc``.

    Creating one writes ``<root>/stat`` (with ``btime``) and a default ``<root>/meminfo``
    (8 GiB total, 4 GiB available); :meth:`add_process` writes ``<root>/<pid>/``.
    Sizes given to its methods are in bytes and must be whole pages (or kB) as in the kernel.
    """

    def __init__(self, root: str | os.PathLike[str], *, boot_time: int = 1_700_000_000) -> None:
        self.root: str = os.fspath(root)
        self.page_size: int = os.sysconf("SC_PAGE_SIZE")
        os.makedirs(self.root, exist_ok=True)
        self.write(
            "stat",
            "cpu  0 0 0 0 0 0 0 0 0 0\n"
            "cpu0 0 0 0 0 0 0 0 0 0 0\n"
            "intr 0\n"
            "ctxt 0\n"
            f"btime {boot_time}\n"
            "processes 1\n"
            "procs_running 1\n"
            "procs_blocked 0\n"
            "softirq 0 0 0 0 0 0 0 0 0 0 0\n",
        )
        self.set_meminfo(total=8 << 30, available=4 << 30)

    def __repr__(self) -> str:
        return f"FakeProc({self.root!r})"

    def write(self, relpath: str, data: bytes | str) -> None:
        """Write ``<root>/<relpath>`` as it is (``str`` as UTF-8), creating directories."""
        path = os.path.join(self.root, relpath.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_encode(data) if isinstance(data, str) else data)

    def _pages(self, size: int, what: str) -> int:
        if size < 0 or size % self.page_size:
            raise ValueError(f"{what}={size} is not a whole number of {self.page_size}-byte pages")
        return size // self.page_size

    def add_process(
        self,
        pid: int,
        *,
        comm: str = "proc",
        state: str = "S",
        ppid: int = 1,
        pgrp: int | None = None,
        session: int | None = None,
        flags: int = 0,
        utime: int = 0,
        stime: int = 0,
        start_time: int = 1000,
        rss: int = 0,
        vsize: int = 0,
        shared: int = 0,
        text: int = 0,
        data: int = 0,
        oom_score: int = 0,
        oom_score_adj: int = 0,
        uid: int = 0,
        gid: int = 0,
        cgroup: str = "0::/\n",
        cmdline: Sequence[str] | None = None,
        threads: int = 1,
        swap: int = 0,
    ) -> None:
        """Write ``<root>/<pid>/{stat,statm,status,oom_score,oom_score_adj,cgroup,cmdline,comm}``.

        Sizes (``rss``, ``vsize``, ``shared``, ``text``, ``data``, ``swap``) are in bytes.
        ``pgrp`` and ``session`` default to *pid*. ``cgroup`` is written as it is, except that a
        bare path such as ``"/a/b"`` means the v2 line ``0::/a/b``. ``cmdline`` defaults to
        ``(comm,)``.

        Kernel threads (``flags & PF_KTHREAD``) and zombies (state ``Z`` or ``X``) have no mm:
        their memory must be 0 and their cmdline empty, and ``status`` gets no Vm lines.
        Writing an existing pid again replaces it (PID reuse).
        """
        if pid <= 0:
            raise ValueError(f"pid must be positive, got {pid}")
        if len(state) != 1 or not state.isascii() or not state.isalpha():
            raise ValueError(f"state must be one ASCII letter, got {state!r}")
        raw_comm = _encode(comm)
        if b"\0" in raw_comm:
            raise ValueError("comm cannot contain NUL: the kernel stores it as a C string")
        if swap < 0 or swap % 1024:
            raise ValueError(f"swap={swap} is not a whole number of kB")
        if not OOM_SCORE_ADJ_MIN <= oom_score_adj <= OOM_SCORE_ADJ_MAX:
            raise ValueError(f"oom_score_adj={oom_score_adj} outside [-1000, 1000]")
        has_mm = not (flags & PF_KTHREAD) and state not in DEAD_STATES
        if cmdline is None:
            cmdline = (comm,) if has_mm else ()
        if not has_mm and (rss or vsize or shared or text or data or swap or cmdline):
            raise ValueError(
                "kernel threads and zombies have no mm: rss, vsize, shared, text, data, swap"
                " must be 0 and cmdline empty"
            )
        rss_pages = self._pages(rss, "rss")
        statm = [
            self._pages(vsize, "vsize"),
            rss_pages,
            self._pages(shared, "shared"),
            self._pages(text, "text"),
            0,  # lib, always 0 since 2.6
            self._pages(data, "data"),
            0,  # dt, always 0 since 2.6
        ]
        pgrp = pid if pgrp is None else pgrp
        session = pid if session is None else session
        user = 0x400000 if has_mm else 0  # code, data, stack addresses; 0 without an mm

        # Fields 3..52 of proc_pid_stat(5) in order, as fs/proc/array.c do_task_stat writes them.
        fields: list[object] = [
            state,  # 3 state
            ppid,  # 4
            pgrp,  # 5
            session,  # 6
            0,  # 7 tty_nr
            -1,  # 8 tpgid
            flags,  # 9
            0,  # 10 minflt
            0,  # 11 cminflt
            0,  # 12 majflt
            0,  # 13 cmajflt
            utime,  # 14
            stime,  # 15
            0,  # 16 cutime
            0,  # 17 cstime
            20,  # 18 priority
            0,  # 19 nice
            threads,  # 20 num_threads
            0,  # 21 itrealvalue
            start_time,  # 22 starttime
            vsize,  # 23 vsize (bytes)
            rss_pages,  # 24 rss (pages)
            _U64_MAX if has_mm else 0,  # 25 rsslim (RLIM_INFINITY)
            user,  # 26 startcode
            user + 0x1000 if has_mm else 0,  # 27 endcode
            user + 0x7F000000 if has_mm else 0,  # 28 startstack
            0,  # 29 kstkesp
            0,  # 30 kstkeip
            0,  # 31 signal
            0,  # 32 blocked
            0,  # 33 sigignore
            0,  # 34 sigcatch
            0,  # 35 wchan
            0,  # 36 nswap
            0,  # 37 cnswap
            17,  # 38 exit_signal (SIGCHLD)
            0,  # 39 processor
            0,  # 40 rt_priority
            0,  # 41 policy
            0,  # 42 delayacct_blkio_ticks
            0,  # 43 guest_time
            0,  # 44 cguest_time
            user + 0x2000 if has_mm else 0,  # 45 start_data
            user + 0x3000 if has_mm else 0,  # 46 end_data
            user + 0x4000 if has_mm else 0,  # 47 start_brk
            user + 0x7F001000 if has_mm else 0,  # 48 arg_start
            user + 0x7F002000 if has_mm else 0,  # 49 arg_end
            user + 0x7F002000 if has_mm else 0,  # 50 env_start
            user + 0x7F003000 if has_mm else 0,  # 51 env_end
            0,  # 52 exit_code
        ]
        assert len(fields) == 50  # fields 3..52
        stat = b"%d (%s) %s\n" % (pid, raw_comm, " ".join(map(str, fields)).encode())

        ids = "\t".join([str(uid)] * 4)
        gids = "\t".join([str(gid)] * 4)
        status = [
            b"Name:\t" + _escape_status_name(raw_comm),
            b"Umask:\t0022",
            f"State:\t{state} ({_STATE_NAMES.get(state, 'unknown')})".encode(),
            f"Tgid:\t{pid}".encode(),
            b"Ngid:\t0",
            f"Pid:\t{pid}".encode(),
            f"PPid:\t{ppid}".encode(),
            b"TracerPid:\t0",
            f"Uid:\t{ids}".encode(),
            f"Gid:\t{gids}".encode(),
            b"FDSize:\t64",
            b"Groups:\t ",
            f"NStgid:\t{pid}".encode(),
            f"NSpid:\t{pid}".encode(),
            f"NSpgid:\t{pgrp}".encode(),
            f"NSsid:\t{session}".encode(),
            f"Kthread:\t{1 if flags & PF_KTHREAD else 0}".encode(),
        ]
        if has_mm:
            # fs/proc/task_mmu.c task_mem(): "Key:\t%8lu kB".
            kb = {
                "VmPeak": vsize,
                "VmSize": vsize,
                "VmLck": 0,
                "VmPin": 0,
                "VmHWM": rss,
                "VmRSS": rss,
                "RssAnon": rss,
                "RssFile": 0,
                "RssShmem": 0,
                "VmData": data,
                "VmStk": 132 * 1024,
                "VmExe": text,
                "VmLib": 0,
                "VmPTE": 4096,
                "VmSwap": swap,
                "HugetlbPages": 0,
            }
            status += [f"{key}:\t{size // 1024:8d} kB".encode() for key, size in kb.items()]
        status += [
            f"Threads:\t{threads}".encode(),
            b"SigQ:\t0/96365",
            b"SigPnd:\t0000000000000000",
            b"ShdPnd:\t0000000000000000",
            b"Cpus_allowed_list:\t0-1",
            b"voluntary_ctxt_switches:\t0",
            b"nonvoluntary_ctxt_switches:\t0",
        ]

        cgroup_text = f"0::{cgroup}\n" if cgroup.startswith("/") else cgroup
        argv = [_encode(a) for a in cmdline]
        if any(b"\0" in a for a in argv):
            raise ValueError("cmdline arguments cannot contain NUL")

        base = str(pid)
        self.write(f"{base}/stat", stat)
        self.write(f"{base}/statm", " ".join(map(str, statm)) + "\n")
        self.write(f"{base}/status", b"\n".join(status) + b"\n")
        self.write(f"{base}/oom_score", f"{oom_score}\n")
        self.write(f"{base}/oom_score_adj", f"{oom_score_adj}\n")
        self.write(f"{base}/cgroup", cgroup_text)
        self.write(f"{base}/cmdline", b"".join(a + b"\0" for a in argv))
        self.write(f"{base}/comm", raw_comm + b"\n")

    def remove_process(self, pid: int) -> None:
        """Remove ``<root>/<pid>``, as when the process is reaped."""
        shutil.rmtree(os.path.join(self.root, str(pid)))

    def set_meminfo(
        self,
        *,
        total: int,
        available: int,
        free: int | None = None,
        swap_total: int = 0,
        swap_free: int = 0,
        **extra: int,
    ) -> None:
        """Write ``<root>/meminfo``. Sizes are bytes (whole kB); ``free`` defaults to
        ``available``. ``extra`` sets other lines by their kernel name, e.g.
        ``Cached=1 << 30`` or ``**{"Active(anon)": 4096}``; ``HugePages_*`` are counts."""
        values: dict[str, int] = dict.fromkeys(_MEMINFO_LINES, 0)
        values.update(_MEMINFO_DEFAULTS)
        values.update(
            MemTotal=total,
            MemFree=available if free is None else free,
            MemAvailable=available,
            SwapTotal=swap_total,
            SwapFree=swap_free,
        )
        values.update(extra)
        lines = []
        for key, value in values.items():
            if key in _MEMINFO_UNITLESS:
                shown = f"{value:8d}"
            else:
                if value < 0 or value % 1024:
                    raise ValueError(f"meminfo {key}={value} is not a whole number of kB")
                shown = f"{value // 1024:8d} kB"
            # fs/proc/meminfo.c show_val_kb(): the name padded to 16 columns, "%8lu kB".
            lines.append(f"{key + ':':<16}{shown}\n")
        self.write("meminfo", "".join(lines))

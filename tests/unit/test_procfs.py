"""Tests for reapkit._procfs (the /proc readers) and reapkit.testing.FakeProc (the fake tree).

Most tests build a tree with FakeProc under tmp_path; the last ones read the real /proc
(read-only). Tests run as root, so permission errors are simulated by patching os.open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reapkit._errors import AccessDenied, NoSuchProcess, ProcFormatError
from reapkit._procfs import (
    MAX_ANCESTRY,
    PF_KTHREAD,
    REAL_PROC,
    CgroupEntry,
    MemInfo,
    ProcessInfo,
    ProcFS,
    ProcStat,
    ProcStatm,
    ProcStatus,
    in_subtree,
    parse_boot_time,
    parse_cgroup,
    parse_cmdline,
    parse_comm,
    parse_meminfo,
    parse_oom_score,
    parse_oom_score_adj,
    parse_stat,
    parse_statm,
    parse_status,
)
from reapkit.testing import FakeProc

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
GiB = 1 << 30

# A stat line as Linux 6.18 writes it (52 fields), for prefix and corruption tests.
VALID_STAT = (
    b"2636 (cat) R 2634 2634 2147 0 -1 4194304 99 0 0 0 0 0 0 0 20 0 1 0 56913 3133440 394"
    b" 18446744073709551615 93909885018112 93909885037993 140726967548592 0 0 0 0 0 0 0 0 0"
    b" 17 1 0 0 0 0 0 93909885054000 93909885055616 93909900673024 140726967552736"
    b" 140726967552756 140726967552756 140726967554027 0\n"
)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


@pytest.fixture
def fs(fake: FakeProc) -> ProcFS:
    return ProcFS(fake.root)


def _stat_with(**fields: bytes) -> bytes:
    """VALID_STAT with some fields (by 1-based number, as ``f4=b"..."``) replaced."""
    parts = VALID_STAT[:-1].split(b" ")
    for key, value in fields.items():
        parts[int(key[1:]) - 1] = value
    return b" ".join(parts) + b"\n"


# --------------------------------------------------------------------------------------------
# Round trips through FakeProc


def test_round_trip_every_reader(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(
        4242,
        comm="worker",
        state="D",
        ppid=17,
        pgrp=4000,
        session=3999,
        flags=0x400040,
        utime=123,
        stime=45,
        start_time=987654,
        rss=300 * PAGE,
        vsize=1000 * PAGE,
        shared=20 * PAGE,
        text=5 * PAGE,
        data=200 * PAGE,
        oom_score=812,
        oom_score_adj=-500,
        uid=1000,
        gid=100,
        cgroup="12:memory:/user.slice/a:b\n0::/user.slice/app.scope\n",
        cmdline=("/usr/bin/worker", "--name", "two words", "x"),
        threads=7,
        swap=64 * 1024,
    )
    assert fs.pids() == [4242]
    assert fs.pid_exists(4242)
    assert fs.stat(4242) == ProcStat(
        pid=4242,
        comm="worker",
        state="D",
        ppid=17,
        pgrp=4000,
        session=3999,
        flags=0x400040,
        utime=123,
        stime=45,
        num_threads=7,
        start_time=987654,
        vsize=1000 * PAGE,
        rss=300 * PAGE,
    )
    assert fs.statm(4242) == ProcStatm(
        size=1000 * PAGE, resident=300 * PAGE, shared=20 * PAGE, text=5 * PAGE, data=200 * PAGE
    )
    assert fs.status(4242) == ProcStatus(
        name="worker",
        state="D",
        tgid=4242,
        pid=4242,
        ppid=17,
        uids=(1000, 1000, 1000, 1000),
        gids=(100, 100, 100, 100),
        threads=7,
        vm_rss=300 * PAGE,
        vm_swap=64 * 1024,
        rss_anon=300 * PAGE,
    )
    assert fs.oom_score(4242) == 812
    assert fs.oom_score_adj(4242) == -500
    assert fs.cgroup(4242) == (
        CgroupEntry(12, ("memory",), "/user.slice/a:b"),
        CgroupEntry(0, (), "/user.slice/app.scope"),
    )
    assert fs.cmdline(4242) == ("/usr/bin/worker", "--name", "two words", "x")
    assert fs.comm(4242) == "worker"
    info = fs.process_info(4242)
    assert info == ProcessInfo(
        pid=4242,
        comm="worker",
        state="D",
        ppid=17,
        flags=0x400040,
        start_time=987654,
        rss=300 * PAGE,
        oom_score=812,
    )
    assert not info.is_kernel_thread


def test_round_trip_defaults(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(7)
    st_ = fs.stat(7)
    assert (st_.comm, st_.state, st_.ppid, st_.pgrp, st_.session) == ("proc", "S", 1, 7, 7)
    assert (st_.start_time, st_.rss, st_.vsize, st_.num_threads) == (1000, 0, 0, 1)
    assert fs.cmdline(7) == ("proc",)
    assert fs.cgroup(7) == (CgroupEntry(0, (), "/"),)
    assert fs.status(7).vm_rss == 0
    assert fs.status(7).vm_swap == 0


def test_cgroup_bare_path_is_a_v2_line(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(5, cgroup="/a/b")
    assert fs.cgroup(5) == (CgroupEntry(0, (), "/a/b"),)
    fake.add_process(6, cgroup="9:name=systemd:/\n2:cpu,cpuacct:/x\n0::/\n")
    assert fs.cgroup(6) == (
        CgroupEntry(9, ("name=systemd",), "/"),
        CgroupEntry(2, ("cpu", "cpuacct"), "/x"),
        CgroupEntry(0, (), "/"),
    )


def test_meminfo_round_trip(fake: FakeProc, fs: ProcFS) -> None:
    fake.set_meminfo(
        total=16 * GiB,
        available=3 * GiB,
        free=1 * GiB,
        swap_total=2 * GiB,
        swap_free=512 * MiB,
        Buffers=64 * MiB,
        Cached=2 * GiB,
        HugePages_Total=16,
        **{"Active(anon)": 12 * 1024, "NewCounter": 4096},
    )
    mi = fs.meminfo()
    assert mi == MemInfo(
        total=16 * GiB,
        free=1 * GiB,
        available=3 * GiB,
        buffers=64 * MiB,
        cached=2 * GiB,
        swap_total=2 * GiB,
        swap_free=512 * MiB,
        fields=mi.fields,
    )
    assert mi.fields["HugePages_Total"] == 16  # a count, not kB
    assert mi.fields["Hugepagesize"] == 2 * MiB
    assert mi.fields["Active(anon)"] == 12 * 1024
    assert mi.fields["NewCounter"] == 4096
    assert mi.fields["MemTotal"] == mi.total


def test_meminfo_column_alignment_matches_the_kernel(fake: FakeProc) -> None:
    fake.set_meminfo(total=24684096 * 1024, available=24470216 * 1024, free=24571140 * 1024)
    text = Path(fake.root, "meminfo").read_text()
    assert text.startswith(
        "MemTotal:       24684096 kB\nMemFree:        24571140 kB\nMemAvailable:   24470216 kB\n"
    )
    assert "HugePages_Total:       0\n" in text
    assert "Hugepagesize:       2048 kB\n" in text


def test_meminfo_is_immutable_and_hashable(fs: ProcFS) -> None:
    mi = fs.meminfo()
    with pytest.raises(TypeError):
        mi.fields["MemTotal"] = 1  # type: ignore[index]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        mi.total = 1  # type: ignore[misc]
    assert hash(mi) == hash(fs.meminfo())
    # A dict passed in is copied: changing it later does not change the record.
    src = {"MemTotal": 1}
    rec = MemInfo(1, 0, 1, 0, 0, 0, 0, fields=src)
    src["MemTotal"] = 2
    assert rec.fields["MemTotal"] == 1


def test_records_are_frozen(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(3)
    for record in (fs.stat(3), fs.statm(3), fs.status(3), fs.process_info(3), fs.cgroup(3)[0]):
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            record.pid = 1  # type: ignore[union-attr]


def test_boot_time(tmp_path: Path) -> None:
    FakeProc(tmp_path, boot_time=1_234_567_890)
    assert ProcFS(tmp_path).boot_time() == 1_234_567_890.0


def test_pids_sorted_numeric_only(fake: FakeProc, fs: ProcFS) -> None:
    for pid in (300, 2, 1000, 45):
        fake.add_process(pid)
    fake.write("self/stat", VALID_STAT)
    fake.write("sys/kernel/pid_max", "4194304\n")
    fake.write("\u00b2/stat", VALID_STAT)  # "²".isdigit() is True, but it is no pid
    fake.write("12a/stat", VALID_STAT)
    assert fs.pids() == [2, 45, 300, 1000]


def test_root_accepts_pathlike_and_page_size(fake: FakeProc) -> None:
    fake.add_process(9, rss=3 * PAGE, vsize=4 * PAGE)
    fs1 = ProcFS(Path(fake.root), page_size=1)
    assert fs1.root == fake.root
    assert fs1.stat(9).rss == 3  # pages, with a page size of 1
    assert fs1.statm(9).size == 4
    assert "page_size=1" in repr(fs1)
    with pytest.raises(ValueError, match="page_size"):
        ProcFS(fake.root, page_size=0)


def test_read_bytes(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(8, oom_score=3)
    assert fs.read_bytes("8/oom_score") == b"3\n"
    assert fs.read_bytes("/8/oom_score") == b"3\n"
    assert fs.read_bytes("meminfo").startswith(b"MemTotal:")
    with pytest.raises(NoSuchProcess):
        fs.read_bytes("9/oom_score")


def test_big_files_read_past_one_buffer(fake: FakeProc, fs: ProcFS) -> None:
    args = tuple(f"arg{i:06d}" for i in range(10_000))  # ~100 KB, several read() calls
    fake.add_process(11, cmdline=args)
    assert fs.cmdline(11) == args
    lines = "".join(f"{i}:c{i}:/{'x' * 100}/{i}\n" for i in range(1, 400)) + "0::/\n"
    fake.write("11/cgroup", lines)
    assert len(fs.cgroup(11)) == 400


def test_file_of_exactly_one_buffer(fake: FakeProc, fs: ProcFS) -> None:
    # A read() returning exactly bufsize is not taken as EOF.
    fake.add_process(12)
    arg = "a" * (16384 - 1)
    fake.write("12/cmdline", arg + "\0")
    assert fs.cmdline(12) == (arg,)
    fake.write("12/cmdline", arg + "\0" + "tail\0")
    assert fs.cmdline(12) == (arg, "tail")


# --------------------------------------------------------------------------------------------
# Hostile names and input


HOSTILE_COMMS = [
    "a) Z 1 (",
    "foo) Z ",
    ")",
    "((",
    "()",
    ") R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23",
    "with spaces ",
    " lead",
    "new\nline",
    "\n",
    "back\\slash\\n",
    "tab\there",
    "",
    "\udcff\udcfe x",  # the bytes ff fe: not UTF-8, kept by surrogateescape
    "日本語",
]


@pytest.mark.parametrize("comm", HOSTILE_COMMS)
def test_hostile_comm(fake: FakeProc, fs: ProcFS, comm: str) -> None:
    fake.add_process(77, comm=comm, state="S", ppid=3, rss=2 * PAGE, start_time=555)
    stat = fs.stat(77)
    assert stat.comm == comm
    assert (stat.pid, stat.state, stat.ppid, stat.start_time, stat.rss) == (
        77,
        "S",
        3,
        555,
        2 * PAGE,
    )
    assert fs.status(77).name == comm
    assert fs.comm(77) == comm
    info = fs.process_info(77)
    assert (info.comm, info.state, info.ppid, info.rss) == (comm, "S", 3, 2 * PAGE)


def test_status_name_escapes(fake: FakeProc) -> None:
    fake.add_process(78, comm="a\\b\nc")
    first = Path(fake.root, "78/status").read_bytes().split(b"\n")[0]
    assert first == b"Name:\ta\\\\b\\nc"  # what Linux writes (seen here with prctl)


def test_every_strict_prefix_of_stat_is_rejected() -> None:
    full = parse_stat(VALID_STAT, path="stat", page_size=PAGE)
    assert full.rss == 394 * PAGE
    for n in range(len(VALID_STAT)):
        with pytest.raises(ProcFormatError):
            parse_stat(VALID_STAT[:n], path="stat", page_size=PAGE)
    # Even newline-terminated, a prefix that drops field 24 (rss) is rejected.
    rss_start = VALID_STAT.index(b" 394 ") + 1
    for n in range(rss_start + 1):
        with pytest.raises(ProcFormatError):
            parse_stat(VALID_STAT[:n] + b"\n", path="stat", page_size=PAGE)


def test_stat_needs_fields_up_to_rss() -> None:
    fields = VALID_STAT[:-1].split(b" ")
    exactly_24 = b" ".join(fields[:24]) + b"\n"
    assert parse_stat(exactly_24, path="stat", page_size=PAGE).rss == 394 * PAGE
    with pytest.raises(ProcFormatError, match="at least 24"):
        parse_stat(b" ".join(fields[:23]) + b"\n", path="stat", page_size=PAGE)
    more = VALID_STAT[:-1] + b" 1 2 3\n"  # a future kernel adding fields
    assert parse_stat(more, path="stat", page_size=PAGE) == parse_stat(
        VALID_STAT, path="stat", page_size=PAGE
    )


@pytest.mark.parametrize(
    "bad",
    [b"", b"1x", b"-1", b"+5", b"0x10", b"1_000", b"1.5", b" 1", "\u0661".encode(), b"9" * 21],
)
@pytest.mark.parametrize("field", ["f1", "f4", "f5", "f6", "f9", "f14", "f20", "f22", "f24"])
def test_garbled_stat_numbers(field: str, bad: bytes) -> None:
    if field == "f1":
        data = bad + VALID_STAT[VALID_STAT.index(b" (") :]
    else:
        data = _stat_with(**{field: bad})
    with pytest.raises(ProcFormatError):
        parse_stat(data, path="/proc/1/stat", page_size=PAGE)


@pytest.mark.parametrize(
    "data",
    [
        b"2636 cat R 2634\n",
        b"2636 (cat R 2634 " + b"0 " * 30 + b"\n",
        b"(cat) R" + b" 0" * 30 + b"\n",
        b"2636 (cat)R" + b" 0" * 30 + b"\n",
        b"2636 (cat)\n",
        b"2636 (cat) RR" + b" 0" * 30 + b"\n",
        b"2636 (cat) 5" + b" 0" * 30 + b"\n",
        b"2636  (cat) R" + b" 0" * 30 + b"\n",
        b"2636 (cat) R  0" + b" 0" * 30 + b"\n",
        VALID_STAT[:-1],
    ],
)
def test_malformed_stat(data: bytes) -> None:
    with pytest.raises(ProcFormatError):
        parse_stat(data, path="stat", page_size=PAGE)


def test_stat_pid_must_match() -> None:
    assert parse_stat(VALID_STAT, path="stat", page_size=PAGE, pid=2636).pid == 2636
    with pytest.raises(ProcFormatError, match="expected 1"):
        parse_stat(VALID_STAT, path="stat", page_size=PAGE, pid=1)


def test_error_names_the_path(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(5)
    fake.write("5/stat", b"garbage\n")
    with pytest.raises(ProcFormatError) as info:
        fs.stat(5)
    assert info.value.path == f"{fake.root}/5/stat"
    assert str(info.value).startswith(f"{fake.root}/5/stat: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("name", "reader"),
    [
        ("stat", ProcFS.stat),
        ("statm", ProcFS.statm),
        ("status", ProcFS.status),
        ("oom_score", ProcFS.oom_score),
        ("oom_score_adj", ProcFS.oom_score_adj),
        ("cgroup", ProcFS.cgroup),
        ("comm", ProcFS.comm),
        ("stat", ProcFS.process_info),
        ("oom_score", ProcFS.process_info),
    ],
)
def test_empty_files_are_format_errors(
    fake: FakeProc, fs: ProcFS, name: str, reader: Callable[[ProcFS, int], object]
) -> None:
    fake.add_process(6)
    fake.write(f"6/{name}", b"")
    with pytest.raises(ProcFormatError, match="empty"):
        reader(fs, 6)


def test_empty_cmdline_is_not_an_error(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(6)
    fake.write("6/cmdline", b"")
    assert fs.cmdline(6) == ()


def test_garbled_statm() -> None:
    assert parse_statm(b"765 415 387 5 0 123 0\n", path="statm", page_size=PAGE) == ProcStatm(
        765 * PAGE, 415 * PAGE, 387 * PAGE, 5 * PAGE, 123 * PAGE
    )
    for bad in [b"765 415 387 5 0\n", b"765 415 387 5 0 12x 0\n", b"765 415 387 5 0 123 0", b"\n"]:
        with pytest.raises(ProcFormatError):
            parse_statm(bad, path="statm", page_size=PAGE)


@pytest.mark.parametrize(("data", "value"), [(b"0\n", 0), (b"2000\n", 2000), (b"666\n", 666)])
def test_oom_score(data: bytes, value: int) -> None:
    assert parse_oom_score(data, path="p") == value


@pytest.mark.parametrize("data", [b"", b"\n", b"-1\n", b"12", b"1 2\n", b"abc\n", b"12\n\n"])
def test_oom_score_garbled(data: bytes) -> None:
    with pytest.raises(ProcFormatError):
        parse_oom_score(data, path="p")


def test_oom_score_adj() -> None:
    assert parse_oom_score_adj(b"-1000\n", path="p") == -1000
    assert parse_oom_score_adj(b"1000\n", path="p") == 1000
    assert parse_oom_score_adj(b"0\n", path="p") == 0
    for bad in [b"1001\n", b"-1001\n", b"--5\n", b"-\n", b"+5\n", b""]:
        with pytest.raises(ProcFormatError):
            parse_oom_score_adj(bad, path="p")


def _status_without(fake: FakeProc, key: bytes) -> bytes:
    data = Path(fake.root, "1/status").read_bytes()
    return b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(key))


@pytest.mark.parametrize(
    "key", [b"Name:", b"State:", b"Tgid:", b"Pid:", b"PPid:", b"Uid:", b"Gid:", b"Threads:"]
)
def test_status_required_lines(fake: FakeProc, key: bytes) -> None:
    fake.add_process(1)
    with pytest.raises(ProcFormatError, match="no "):
        parse_status(_status_without(fake, key), path="status")


def test_status_garbled(fake: FakeProc) -> None:
    fake.add_process(1, rss=PAGE)
    good = Path(fake.root, "1/status").read_bytes()
    assert parse_status(good, path="status").vm_rss == PAGE
    for old, new in [
        (b"Uid:\t0\t0\t0\t0", b"Uid:\t0\t0\t0"),
        (b"Gid:\t0\t0\t0\t0", b"Gid:\t0\tx\t0\t0"),
        (b"VmRSS:\t       4 kB", b"VmRSS:\t       4 MB"),
        (b"VmRSS:\t       4 kB", b"VmRSS:\t"),
        (b"VmSwap:\t       0 kB", b"VmSwap:\t  -1 kB"),
        (b"State:\tS (sleeping)", b"State:\t? (what)"),
        (b"Threads:\t1", b"Threads:\tmany"),
        (b"Umask:\t0022", b"Umask 0022"),
    ]:
        assert old in good
        with pytest.raises(ProcFormatError):
            parse_status(good.replace(old, new), path="status")
    with pytest.raises(ProcFormatError):
        parse_status(good[:-1], path="status")


def test_cmdline_variants() -> None:
    assert parse_cmdline(b"") == ()
    assert parse_cmdline(b"\0") == ()
    assert parse_cmdline(b"a\0b\0") == ("a", "b")
    assert parse_cmdline(b"a\0b") == ("a", "b")  # the final NUL overwritten
    assert parse_cmdline(b"a\0\0b\0") == ("a", "", "b")  # an empty argument in the middle
    assert parse_cmdline(b"title\0\0\0\0\0") == ("title",)  # setproctitle padding
    # argv rewritten as one string with spaces (psutil#1179), with or without a NUL.
    assert parse_cmdline(b"nginx: worker process\0\0\0") == ("nginx:", "worker", "process")
    assert parse_cmdline(b"chrome --type=renderer  --lang=en") == (
        "chrome",
        "--type=renderer",
        "--lang=en",
    )
    assert parse_cmdline(b"sh\0-c\0echo a b\0") == ("sh", "-c", "echo a b")
    assert parse_cmdline(b"\xff\0") == ("\udcff",)


def test_meminfo_required_fields() -> None:
    base = b"MemTotal:       1000 kB\nMemFree:         500 kB\nMemAvailable:    700 kB\n"
    mi = parse_meminfo(base, path="meminfo")
    assert (mi.total, mi.free, mi.available) == (1000 * 1024, 500 * 1024, 700 * 1024)
    assert (mi.buffers, mi.cached, mi.swap_total, mi.swap_free) == (0, 0, 0, 0)
    for required in (b"MemTotal", b"MemAvailable"):
        data = b"".join(line for line in base.splitlines(True) if not line.startswith(required))
        with pytest.raises(ProcFormatError, match=required.decode()):
            parse_meminfo(data, path="meminfo")


@pytest.mark.parametrize(
    "line",
    [b"Foo: 12 MB", b"Foo 12 kB", b"Foo:", b": 12 kB", b"Foo: 12 kB extra", b"Foo: x kB", b""],
)
def test_meminfo_garbled_line(line: bytes) -> None:
    data = b"MemTotal: 1 kB\nMemAvailable: 1 kB\n" + line + b"\n"
    with pytest.raises(ProcFormatError):
        parse_meminfo(data, path="meminfo")


def test_meminfo_missing_file_names_the_path(tmp_path: Path) -> None:
    fs = ProcFS(tmp_path)
    with pytest.raises(ProcFormatError, match="meminfo: does not exist") as info:
        fs.meminfo()
    assert info.value.path == f"{tmp_path}/meminfo"


def test_cgroup_garbled() -> None:
    for bad in [b"", b"0::/\n\n", b"x::/\n", b"0:/\n", b"0::relative\n", b"0::/", b"-1::/\n"]:
        with pytest.raises(ProcFormatError):
            parse_cgroup(bad, path="cgroup")


def test_boot_time_garbled() -> None:
    assert parse_boot_time(b"cpu 1\nbtime 12\n", path="stat") == 12.0
    for bad in [b"cpu 1\n", b"btime\n", b"btime x\n", b"btime 12"]:
        with pytest.raises(ProcFormatError):
            parse_boot_time(bad, path="stat")


def test_comm_needs_its_newline() -> None:
    assert parse_comm(b"\n", path="comm") == ""
    assert parse_comm(b"a\n\n", path="comm") == "a\n"
    with pytest.raises(ProcFormatError):
        parse_comm(b"abc", path="comm")


# --------------------------------------------------------------------------------------------
# Kernel threads and zombies


def test_kernel_thread(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(2, comm="kthreadd", ppid=0, flags=PF_KTHREAD | 0x8040)
    assert fs.stat(2).is_kernel_thread
    assert fs.process_info(2).is_kernel_thread
    assert fs.statm(2) == ProcStatm(0, 0, 0, 0, 0)
    status = fs.status(2)
    assert (status.vm_rss, status.vm_swap) == (None, None)
    assert fs.cmdline(2) == ()
    assert b"Vm" not in Path(fake.root, "2/status").read_bytes()


def test_zombie(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(50, state="Z", comm="defunct")
    assert fs.stat(50).state == "Z"
    assert not fs.stat(50).is_kernel_thread
    assert fs.status(50).state == "Z"
    assert fs.status(50).vm_rss is None
    assert fs.cmdline(50) == ()
    assert fs.process_info(50).rss == 0
    assert fs.pid_exists(50)  # a zombie exists until it is reaped


@pytest.mark.parametrize(
    "kwargs",
    [
        {"state": "Z", "rss": PAGE},
        {"state": "Z", "cmdline": ("x",)},
        {"flags": PF_KTHREAD, "vsize": PAGE},
        {"flags": PF_KTHREAD, "swap": 1024},
        {"rss": PAGE + 1},
        {"swap": 100},
        {"comm": "a\0b"},
        {"state": "ZZ"},
        {"oom_score_adj": 1001},
    ],
)
def test_fakeproc_refuses_impossible_processes(fake: FakeProc, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        fake.add_process(60, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Vanishing processes and OS errors

PER_PID_READERS: list[Callable[[ProcFS, int], object]] = [
    ProcFS.stat,
    ProcFS.statm,
    ProcFS.status,
    ProcFS.oom_score,
    ProcFS.oom_score_adj,
    ProcFS.cgroup,
    ProcFS.cmdline,
    ProcFS.comm,
    ProcFS.process_info,
]


@pytest.mark.parametrize("reader", PER_PID_READERS)
def test_vanished_process(
    fake: FakeProc, fs: ProcFS, reader: Callable[[ProcFS, int], object]
) -> None:
    fake.add_process(31)
    reader(fs, 31)
    fake.remove_process(31)
    with pytest.raises(NoSuchProcess) as info:
        reader(fs, 31)
    assert info.value.pid == 31
    assert isinstance(info.value, ProcessLookupError)
    assert not fs.pid_exists(31)
    assert fs.pids() == []


def test_pid_exists(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(40)
    assert fs.pid_exists(40)
    assert not fs.pid_exists(41)
    assert not fs.pid_exists(0)
    assert not fs.pid_exists(-1)
    # /proc/<tid> of a non-leader thread exists but its Tgid is the leader's (psutil#687).
    fake.write(
        "41/status", Path(fake.root, "40/status").read_bytes().replace(b"Pid:\t40", b"Pid:\t41")
    )
    assert not fs.pid_exists(41)
    # An unreadable status of an existing directory: it exists.
    fake.write("42/status", b"garbage")
    assert fs.pid_exists(42)


def test_esrch_during_read_is_no_such_process(
    fake: FakeProc, fs: ProcFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading /proc/<pid>/stat of a task that exits after the open fails with ESRCH.
    fake.add_process(32)
    closed: list[int] = []
    real_close = os.close

    def dying_read(fd: int, n: int) -> bytes:
        raise ProcessLookupError(errno.ESRCH, "No such process")

    def counting_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "read", dying_read)
    monkeypatch.setattr(os, "close", counting_close)
    for reader in PER_PID_READERS:
        with pytest.raises(NoSuchProcess):
            reader(fs, 32)
    assert len(closed) == len(PER_PID_READERS)  # the fd is closed on the error path


@pytest.mark.parametrize("reader", PER_PID_READERS)
def test_permission_error_is_access_denied(
    fake: FakeProc,
    fs: ProcFS,
    monkeypatch: pytest.MonkeyPatch,
    reader: Callable[[ProcFS, int], object],
) -> None:
    fake.add_process(33)

    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(AccessDenied) as info:
        reader(fs, 33)
    assert info.value.pid == 33
    assert f"{fake.root}/33/" in str(info.value)
    assert isinstance(info.value, PermissionError)


def test_permission_error_on_a_global_file(fs: ProcFS, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(AccessDenied) as info:
        fs.meminfo()
    assert info.value.pid is None
    assert "meminfo" in str(info.value)


def test_other_os_errors_propagate(
    fake: FakeProc, fs: ProcFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add_process(34)

    def eio(fd: int, n: int) -> bytes:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "read", eio)
    with pytest.raises(OSError, match="I/O error") as info:
        fs.stat(34)
    assert type(info.value) is OSError


def test_process_info_does_exactly_two_opens(
    fake: FakeProc, fs: ProcFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add_process(35, rss=5 * PAGE, oom_score=12)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: str, flags: int, mode: int = 0o777) -> int:
        opened.append(path)
        assert flags & os.O_CLOEXEC
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", counting_open)
    info = fs.process_info(35)
    assert (info.rss, info.oom_score) == (5 * PAGE, 12)
    assert opened == [f"{fake.root}/35/stat", f"{fake.root}/35/oom_score"]


def test_process_info_agrees_with_stat(fake: FakeProc, fs: ProcFS) -> None:
    fake.add_process(36, comm="x y", state="R", ppid=9, flags=0x40, start_time=77, rss=PAGE)
    stat = fs.stat(36)
    info = fs.process_info(36)
    for name in ("pid", "comm", "state", "ppid", "flags", "start_time", "rss"):
        assert getattr(info, name) == getattr(stat, name)


# --------------------------------------------------------------------------------------------
# Hypothesis: any bytes give a record or ProcFormatError, nothing else


PARSERS: dict[str, Callable[[bytes], object]] = {
    "stat": lambda d: parse_stat(d, path="stat", page_size=PAGE),
    "stat_pid": lambda d: parse_stat(d, path="stat", page_size=PAGE, pid=1),
    "statm": lambda d: parse_statm(d, path="statm", page_size=PAGE),
    "status": lambda d: parse_status(d, path="status"),
    "cgroup": lambda d: parse_cgroup(d, path="cgroup"),
    "cmdline": parse_cmdline,
    "comm": lambda d: parse_comm(d, path="comm"),
    "meminfo": lambda d: parse_meminfo(d, path="meminfo"),
    "oom_score": lambda d: parse_oom_score(d, path="oom_score"),
    "oom_score_adj": lambda d: parse_oom_score_adj(d, path="oom_score_adj"),
    "boot_time": lambda d: parse_boot_time(d, path="stat"),
}

# Valid files to mutate: random bytes alone rarely get past the first check.
SAMPLES: dict[str, bytes] = {
    "stat": VALID_STAT,
    "stat_pid": VALID_STAT.replace(b"2636 (", b"1 ("),
    "statm": b"765 415 387 5 0 123 0\n",
    "status": (
        b"Name:\tcat\nState:\tR (running)\nTgid:\t1\nPid:\t1\nPPid:\t0\nUid:\t0\t0\t0\t0\n"
        b"Gid:\t0\t0\t0\t0\nVmRSS:\t    1600 kB\nVmSwap:\t       0 kB\nThreads:\t1\n"
    ),
    "cgroup": b"9:name=systemd:/\n4:memory:/a/b\n1:cpu,cpuacct:/\n0::/\n",
    "cmdline": b"python\0-m\0pytest\0",
    "comm": b"cat\n",
    "meminfo": (
        b"MemTotal:       24684096 kB\nMemFree:        24571140 kB\n"
        b"MemAvailable:   24470216 kB\nHugePages_Total:       0\n"
    ),
    "oom_score": b"666\n",
    "oom_score_adj": b"-1000\n",
    "boot_time": b"cpu 1 2\nbtime 1795630001\n",
}


def _call(parser: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(ProcFormatError):
        parser(data)


@pytest.mark.parametrize("name", sorted(PARSERS))
@given(data=st.binary(max_size=2048))
@example(data=b"\n")
@example(data=b"9" * 5000 + b"\n")  # beyond int()'s 4300-digit limit
@example(data=_stat_with(f24=b"9" * 5000))
def test_any_bytes_give_a_record_or_format_error(name: str, data: bytes) -> None:
    _call(PARSERS[name], data)


@pytest.mark.parametrize("name", sorted(PARSERS))
@given(
    start=st.integers(0, 4096),
    length=st.integers(0, 2048),
    insert=st.binary(max_size=32),
)
def test_mutated_files_give_a_record_or_format_error(
    name: str, start: int, length: int, insert: bytes
) -> None:
    sample = SAMPLES[name]
    start = start % (len(sample) + 1)
    assert PARSERS[name](sample) is not None
    _call(PARSERS[name], sample[:start] + insert + sample[start + length :])


u64 = st.integers(0, 2**64 - 1)
comm_text = st.text(st.characters(exclude_characters="\0"), min_size=1, max_size=64)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(
    comm=comm_text,
    pid=st.integers(1, 2**22),
    state=st.sampled_from("RSDTtXZPI"),
    ppid=st.integers(0, 2**22),
    pgrp=st.integers(0, 2**22),
    session=st.integers(0, 2**22),
    flags=st.integers(0, 2**32 - 1),
    utime=u64,
    stime=u64,
    threads=st.integers(1, 2**22),
    start_time=u64,
    vsize_pages=st.integers(0, 2**40),
    rss_pages=st.integers(0, 2**40),
)
def test_stat_round_trip(
    tmp_path: Path,
    comm: str,
    pid: int,
    state: str,
    ppid: int,
    pgrp: int,
    session: int,
    flags: int,
    utime: int,
    stime: int,
    threads: int,
    start_time: int,
    vsize_pages: int,
    rss_pages: int,
) -> None:
    # tmp_path is shared by the examples: add_process overwrites the same pid's files.
    fake = FakeProc(tmp_path / "proc")
    has_mm = not (flags & PF_KTHREAD) and state not in "ZX"
    vsize = vsize_pages * PAGE if has_mm else 0
    rss = rss_pages * PAGE if has_mm else 0
    fake.add_process(
        pid,
        comm=comm,
        state=state,
        ppid=ppid,
        pgrp=pgrp,
        session=session,
        flags=flags,
        utime=utime,
        stime=stime,
        threads=threads,
        start_time=start_time,
        vsize=vsize,
        rss=rss,
    )
    fs = ProcFS(fake.root)
    assert fs.stat(pid) == ProcStat(
        pid, comm, state, ppid, pgrp, session, flags, utime, stime, threads, start_time, vsize, rss
    )
    assert fs.comm(pid) == comm
    assert fs.status(pid).name == comm
    assert fs.process_info(pid) == ProcessInfo(
        pid, comm, state, ppid, flags, start_time, rss, oom_score=0
    )


@given(
    comm=st.binary(max_size=64).filter(lambda b: b"\0" not in b),
    rest=st.lists(u64, min_size=22, max_size=60),
)
def test_stat_round_trip_raw_comm_bytes(comm: bytes, rest: list[int]) -> None:
    data = b"12 (" + comm + b") S " + b" ".join(b"%d" % v for v in rest[1:]) + b"\n"
    stat = parse_stat(data, path="stat", page_size=PAGE)
    assert stat.comm.encode("utf-8", "surrogateescape") == comm
    assert stat.state == "S"
    assert (stat.ppid, stat.rss) == (rest[1], rest[21] * PAGE)


cgroup_path = st.text(
    st.characters(exclude_characters="\0\n", exclude_categories=["Cs"]), max_size=80
).map(lambda s: "/" + s)
controller = st.text("abcdefghijklmnopqrstuvwxyz_=", min_size=1, max_size=12)


@given(
    lines=st.lists(
        st.tuples(st.integers(1, 2**31), st.lists(controller, min_size=1, max_size=4), cgroup_path),
        max_size=12,
    ),
    v2_path=cgroup_path,
)
def test_cgroup_round_trip(lines: list[tuple[int, list[str], str]], v2_path: str) -> None:
    text = "".join(f"{hid}:{','.join(ctrl)}:{path}\n" for hid, ctrl, path in lines)
    text += f"0::{v2_path}\n"
    entries = parse_cgroup(text.encode(), path="cgroup")
    expected = tuple(CgroupEntry(hid, tuple(ctrl), path) for hid, ctrl, path in lines)
    assert entries == (*expected, CgroupEntry(0, (), v2_path))


@given(
    args=st.lists(
        st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b), min_size=2, max_size=8
    )
)
def test_cmdline_round_trip(args: list[bytes]) -> None:
    # Two or more non-empty arguments survive exactly, spaces included.
    data = b"".join(a + b"\0" for a in args)
    assert parse_cmdline(data) == tuple(a.decode("utf-8", "surrogateescape") for a in args)


# --------------------------------------------------------------------------------------------
# The real /proc (read-only)


def test_real_stat_of_self() -> None:
    fs = ProcFS()
    stat = fs.stat(os.getpid())
    assert stat.pid == os.getpid()
    assert stat.ppid == os.getppid()
    assert stat.pgrp == os.getpgrp()
    assert stat.session == os.getsid(0)
    assert stat.state == "R"
    assert not stat.is_kernel_thread
    assert stat.rss > 0
    assert stat.vsize >= stat.rss
    assert stat.comm == fs.comm(os.getpid())


def test_real_process_info_consistent_with_stat() -> None:
    fs = ProcFS()
    info = fs.process_info(os.getpid())
    stat = fs.stat(os.getpid())
    assert (info.pid, info.comm, info.ppid, info.start_time) == (
        stat.pid,
        stat.comm,
        stat.ppid,
        stat.start_time,
    )
    assert info.flags & ~0xFF == stat.flags & ~0xFF  # low bits can flip between reads
    assert abs(info.rss - stat.rss) < 64 * MiB
    assert 0 <= info.oom_score <= 2000


def test_real_kthreadd_is_a_kernel_thread() -> None:
    fs = ProcFS()
    try:
        comm = fs.comm(2)
    except NoSuchProcess:
        pytest.skip("no pid 2 here (a PID namespace?)")
    if comm != "kthreadd":
        pytest.skip(f"pid 2 is {comm!r}, not kthreadd (a PID namespace?)")
    assert fs.stat(2).is_kernel_thread
    assert fs.process_info(2).is_kernel_thread
    assert fs.status(2).vm_rss is None
    assert fs.statm(2) == ProcStatm(0, 0, 0, 0, 0)
    assert fs.cmdline(2) == ()


def test_real_status_cmdline_cgroup_of_self() -> None:
    fs = ProcFS()
    me = os.getpid()
    status = fs.status(me)
    assert (status.pid, status.tgid, status.ppid) == (me, me, os.getppid())
    assert status.uids == (*os.getresuid(), os.geteuid())
    assert status.gids[0] == os.getgid()
    assert status.vm_rss is not None
    assert status.vm_rss > 0
    assert fs.cmdline(me) == tuple(sys.orig_argv)
    cgroups = fs.cgroup(me)
    assert any(e.hierarchy_id == 0 and e.controllers == () for e in cgroups)
    assert -1000 <= fs.oom_score_adj(me) <= 1000
    assert fs.pid_exists(me)
    assert me in fs.pids()


def test_real_meminfo_and_boot_time() -> None:
    fs = ProcFS()
    mi = fs.meminfo()
    assert 0 < mi.available <= mi.total
    assert mi.free <= mi.total
    assert mi.fields["MemTotal"] == mi.total
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert abs(fs.boot_time() - (time.time() - uptime)) < 2


def test_real_every_process_parses() -> None:
    fs = ProcFS()
    seen = 0
    for pid in fs.pids():
        try:
            fs.stat(pid)
            fs.statm(pid)
            fs.status(pid)
            fs.oom_score(pid)
            fs.oom_score_adj(pid)
            fs.cgroup(pid)
            fs.cmdline(pid)
            fs.comm(pid)
            fs.process_info(pid)
        except NoSuchProcess:
            continue  # exited while we read: normal
        seen += 1
    assert seen > 1


@settings(max_examples=60)
@given(name=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=15))
def test_vm_swap_reads_what_status_says(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    """The quick VmSwap reader agrees with the full parser, whatever the process is named
    (a name such as 'x\\nVmSwap:\\t1 kB' cannot fake the line: the kernel escapes it)."""
    fake = FakeProc(tmp_path_factory.mktemp("proc"))
    fake.add_process(10, comm=name, rss=8 << 20, swap=3 << 20)
    fake.add_process(11, comm="x\nVmSwap:\t1 kB", rss=8 << 20, swap=5 << 20)
    fake.add_process(12, comm="kworker/0:1", flags=PF_KTHREAD)
    fs = ProcFS(fake.root)
    for pid in (10, 11, 12):
        assert fs.vm_swap(pid) == fs.status(pid).vm_swap
    assert (fs.vm_swap(10), fs.vm_swap(11), fs.vm_swap(12)) == (3 << 20, 5 << 20, None)


# -- the process tree and the real /proc: one home each (issue 15) ------------------------------


def test_in_subtree_walks_parents_with_a_memo() -> None:
    # 1 ← 10 ← 11 ← 12, and 1 ← 20; 30's parent is unknown (0).
    parents = {10: 1, 11: 10, 12: 11, 20: 1, 30: 0}
    asked: list[int] = []

    def parent_of(pid: int) -> int:
        asked.append(pid)
        return parents.get(pid, 0)

    memo: dict[int, bool] = {}
    assert in_subtree(12, 10, parent_of, memo)
    assert in_subtree(10, 10, parent_of, memo)  # the root itself
    assert memo == {12: True, 11: True}
    asked.clear()
    assert in_subtree(12, 10, parent_of, memo)
    assert asked == []  # known: nothing walked again
    assert not in_subtree(20, 10, parent_of, memo)
    assert not in_subtree(30, 10, parent_of, memo)
    assert in_subtree(20, 1, parent_of, {})  # PID 1 as the root
    assert not in_subtree(0, 0, parent_of, {})  # no PID 0 to descend from
    assert 1 not in asked  # the walk ends at PID 1 without asking for its parent


def test_in_subtree_ends_at_a_loop_a_vanished_ancestor_and_a_chain_too_deep() -> None:
    loop = {5: 6, 6: 5}
    assert not in_subtree(5, 99, lambda p: loop[p], {})

    def vanished(pid: int) -> int:
        if pid == 7:
            raise NoSuchProcess(7)
        return 7

    memo: dict[int, bool] = {}
    with pytest.raises(NoSuchProcess):
        in_subtree(8, 99, vanished, memo)
    assert memo == {8: False, 7: False}
    deep = MAX_ANCESTRY + 10
    assert not in_subtree(deep, 1, lambda p: p - 1, {})
    assert in_subtree(MAX_ANCESTRY - 1, 1, lambda p: p - 1, {})


def test_procfs_is_real_only_at_the_kernels_proc(fake: FakeProc) -> None:
    assert ProcFS().is_real
    assert ProcFS("/proc/").is_real
    assert not ProcFS(fake.root).is_real
    assert ProcFS().root == REAL_PROC

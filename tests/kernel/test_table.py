"""The process table against the real kernel: storms, lost events, the scan fallback.

Every process these tests start runs in a sandbox memory cgroup (and, for the storms, a pids
cgroup with a small limit) created here and removed afterwards; storms are stopped by removing
their cgroup (SandboxCgroup.remove kills the members through their pidfds).

Comparisons with ``/proc`` tolerate the rest of the machine, which may fork and exit at any
moment: take scan A, then the table T, then scan B; every pid in A∩B must be in T and every
pid in T in A∪B. A transient difference is retried a few times; a real one (a pid the table
lost or kept) persists and fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

import reapkit._sources.proc_connector as proc_connector_module
from reapkit import AccessDenied, Unsupported
from reapkit._sources.proc_connector import ProcConnectorSource
from reapkit._table import ProcessTable
from reapkit.testing import SandboxCgroup

from ..conftest import Spawn, live_pids, need, require_root

pytestmark = pytest.mark.kernel

#: Each loop forks, execs and reaps /bin/true as fast as the shell can.
STORM = "while :; do /bin/true; done"
STORM_SECONDS = 20.0


def forks_since_boot() -> int:
    """The ``processes`` line of /proc/stat: forks (and clones) since boot."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"processes "):
                return int(line.split()[1])
    raise AssertionError("no processes line in /proc/stat")


async def assert_matches_proc(table: ProcessTable, *, attempts: int = 5) -> None:
    missing: set[int] = set()
    extra: set[int] = set()
    for _ in range(attempts):
        before = live_pids()
        await trio.sleep(0.05)  # let the table apply what the kernel sent until now
        seen = set(table.pids())
        after = live_pids()
        missing = (before & after) - seen
        extra = seen - (before | after)
        if not missing and not extra:
            return
        await trio.sleep(0.2)
    pytest.fail(f"the table differs from /proc: missing {sorted(missing)}, extra {sorted(extra)}")


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


@pytest.fixture
def pids_cgroup() -> Iterator[SandboxCgroup]:
    """A pids cgroup allowing 64 tasks: a storm with a bug cannot become a fork bomb."""
    require_root()
    try:
        cgroup = SandboxCgroup.create("pids", prefix="reapkit-test")
    except Unsupported as exc:
        need(exc.feature)
    try:
        with open(os.path.join(cgroup.directory, "pids.max"), "w") as f:
            f.write("64")
        yield cgroup
    finally:
        cgroup.remove()


@pytest.fixture
def no_connector(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*, rcvbuf: int | None = None) -> None:
        raise AccessDenied(None, "binding to the proc connector needs CAP_NET_ADMIN")

    monkeypatch.setattr(proc_connector_module, "open_proc_connector", refuse)


def stop(storm: SandboxCgroup, children: list[subprocess.Popen[bytes]]) -> None:
    storm.remove()  # kills every member through its pidfd, waits until the cgroup is empty
    for child in children:
        child.wait(10)


# ------------------------------------------------------------------------------------------


async def test_the_table_follows_a_child(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    async with trio.open_nursery() as nursery:
        table: ProcessTable = await nursery.start(ProcessTable().serve)
        assert table.mode == "connector"
        assert os.getpid() in table
        assert 1 in table
        child = spawn(cgroups=[memory_cgroup])
        await wait_for(lambda: child.pid in table)
        assert table.parent(child.pid) == os.getpid()
        assert child.pid in table.take_changed()  # forked, then exec'd
        child.kill()
        child.wait()
        await wait_for(lambda: child.pid not in table)
        assert table.parent(child.pid) is None
        assert child.pid not in table.take_changed()
        stats = table.statistics()
        assert stats.mode == "connector"
        assert stats.events_seen >= 3  # fork, exec (the trampoline; sleep too if in time), exit
        assert stats.overruns == stats.resyncs == 0
        await assert_matches_proc(table)
        nursery.cancel_scope.cancel()
    assert table.mode == "scan"


async def test_exec_from_a_thread_keeps_the_process(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    # The kernel reports the old leader's exit, then the exec, under the same pid
    # (test_proc_connector.py shows the sequence): the exec puts the process back.
    code = (
        "import os, threading\n"
        "t = threading.Thread(target=os.execv, args=('/bin/sleep', ['sleep', '600']))\n"
        "t.start()\n"
        "t.join()\n"
    )
    async with trio.open_nursery() as nursery:
        table: ProcessTable = await nursery.start(ProcessTable().serve)
        child = spawn([sys.executable, "-c", code], cgroups=[memory_cgroup])

        def running_sleep() -> bool:
            with open(f"/proc/{child.pid}/comm") as f:
                return f.read() == "sleep\n"

        await wait_for(running_sleep)
        await trio.sleep(0.1)  # the table has applied the exit and the exec
        assert child.pid in table
        nursery.cancel_scope.cancel()


async def test_serving_and_cancelling_closes_every_fd() -> None:
    require_root()
    before = sorted(os.listdir("/proc/self/fd"))
    async with trio.open_nursery() as nursery:
        table = await nursery.start(ProcessTable().serve)
        assert len(os.listdir("/proc/self/fd")) == len(before) + 1  # the netlink socket
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert table.mode == "scan"
    await assert_matches_proc(table)  # and it still answers, by scanning


@pytest.mark.slow
async def test_storm_from_both_cores_leaves_the_table_equal_to_a_scan(
    spawn: Spawn, memory_cgroup: SandboxCgroup, pids_cgroup: SandboxCgroup
) -> None:
    async with trio.open_nursery() as nursery:
        table: ProcessTable = await nursery.start(ProcessTable().serve)
        assert table.source.rcvbuf == 8 << 20
        await assert_matches_proc(table)
        forks_before = forks_since_boot()
        started = trio.current_time()
        storms = [
            # stderr: sh reports "Killed" for the /bin/true killed with it at the end.
            spawn(
                ["sh", "-c", STORM],
                cgroups=[memory_cgroup, pids_cgroup],
                stderr=subprocess.DEVNULL,
            )
            for _ in range(os.cpu_count() or 2)
        ]
        await trio.sleep(STORM_SECONDS)
        mid = table.statistics()
        stop(memory_cgroup, storms)
        elapsed = trio.current_time() - started
        forks = forks_since_boot() - forks_before
        await trio.sleep(0.5)  # settle: the last events of the storm
        await assert_matches_proc(table)
        for child in storms:
            assert child.pid not in table
        stats = table.statistics()
        source = table.source.statistics()
        nursery.cancel_scope.cancel()
    print(
        f"\nstorm: {elapsed:.1f} s, {forks} forks on the machine ({forks / elapsed:.0f}/s),"
        f" {stats.events_seen} events seen ({stats.events_seen / elapsed:.0f}/s),"
        f" {source.datagrams} datagrams in {source.wakeups} wakeups,"
        f" overruns {stats.overruns}, resyncs {stats.resyncs}"
    )
    assert stats.overruns == 0, "the 8 MiB buffer overflowed during the storm"
    assert stats.resyncs == 0
    assert source.decode_errors == 0
    # Every process of the storm is a fork, an exec and an exit; threads and forks elsewhere
    # only add to `forks`, so this is a loose bound that still catches a table that stalled.
    assert stats.events_seen >= forks
    assert mid.events_seen > 10_000, "no storm to speak of"


async def test_lost_events_lead_to_a_resync_and_a_consistent_table(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    # SO_RCVBUF(FORCE) 1 gives the kernel's minimum buffer: a few datagrams.
    table = ProcessTable(source=ProcConnectorSource(rcvbuf=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(table.serve)
        assert table.statistics().overruns == 0
        # The trio loop is blocked while the shell forks 200 short-lived children: nobody
        # reads the socket, the kernel drops what does not fit.
        child = spawn(
            ["sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done"],
            cgroups=[memory_cgroup],
        )
        assert child.wait(30) == 0
        await wait_for(lambda: table.statistics().resyncs >= 1)
        assert table.statistics().overruns >= 1
        # Every overrun the socket saw is one the table handled (with rcvbuf=1, the rest of
        # the machine's forks can cause more meanwhile: the two counts meet, not freeze).
        await wait_for(lambda: table.source.statistics().overruns == table.statistics().overruns)
        await assert_matches_proc(table)
        # Events flow again after the loss.
        again = spawn(cgroups=[memory_cgroup])
        await wait_for(lambda: again.pid in table)
        nursery.cancel_scope.cancel()


async def follow_a_child(table: ProcessTable, spawn: Spawn, cgroup: SandboxCgroup) -> None:
    child = spawn(cgroups=[cgroup])
    await wait_for(lambda: child.pid in table)
    assert table.parent(child.pid) == os.getpid()
    child.kill()
    child.wait()
    await wait_for(lambda: child.pid not in table)


async def test_without_the_connector_the_table_scans_and_says_so_once(
    no_connector: None,
    spawn: Spawn,
    memory_cgroup: SandboxCgroup,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="reapkit.table")
    table = ProcessTable(min_rescan_interval=0.1)
    for _ in range(2):  # served twice: still one warning
        async with trio.open_nursery() as nursery:
            assert await nursery.start(table.serve) is table
            assert table.mode == "scan"
            await assert_matches_proc(table)
            await follow_a_child(table, spawn, memory_cgroup)
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.name == "reapkit.table"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "scans /proc on demand" in message
    assert "CAP_NET_ADMIN" in message
    stats = table.statistics()
    assert stats.mode == "scan"
    assert stats.events_seen == 0


async def test_scan_mode_rescans_at_most_once_per_interval(
    no_connector: None, spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    table = ProcessTable(min_rescan_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(table.serve)
        assert os.getpid() in table  # the first read scans
        child = spawn(cgroups=[memory_cgroup])
        assert child.pid not in table  # within the interval: the previous scan
        table.min_rescan_interval = 0
        assert child.pid in table
        nursery.cancel_scope.cancel()
    with contextlib.suppress(ProcessLookupError):
        child.kill()


#: Forks N children that exit at once and leaves them unreaped (zombies) until a line on
#: stdin; prints their PIDs, then reaps them and says so.
ZOMBIES = r"""
import os, sys
kids = []
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    kids.append(pid)
print(" ".join(map(str, kids)), flush=True)
sys.stdin.readline()
for pid in kids:
    os.waitpid(pid, 0)
print("reaped", flush=True)
sys.stdin.readline()
"""


async def test_after_an_overflow_the_table_converges_without_zombies(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    # A buffer of a few hundred datagrams: after ENOBUFS the kernel still delivers what it
    # had buffered before the loss (forks whose exits were dropped), more than one batch of
    # the source, so some of those stale events arrive after the rescan.
    table = ProcessTable(source=ProcConnectorSource(rcvbuf=64 << 10, max_batch=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(table.serve)
        parent = spawn(
            [sys.executable, "-c", ZOMBIES, "1500"],
            cgroups=[memory_cgroup],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert parent.stdin is not None and parent.stdout is not None
        # The trio loop is blocked meanwhile: nobody reads the socket, events are lost.
        zombies = set(map(int, parent.stdout.readline().split()))
        await wait_for(lambda: table.statistics().resyncs >= 1)
        await trio.sleep(0.5)  # every datagram the kernel kept is delivered and applied
        assert not zombies & table.pids(), "exited children stayed in the table"
        await assert_matches_proc(table)
        parent.stdin.write(b"\n")
        parent.stdin.flush()
        assert parent.stdout.readline() == b"reaped\n"  # reaping zombies sends no event
        await trio.sleep(0.2)
        assert not zombies & table.pids()
        await assert_matches_proc(table)
        parent.stdin.write(b"\n")
        parent.stdin.flush()
        assert parent.wait(10) == 0
        nursery.cancel_scope.cancel()

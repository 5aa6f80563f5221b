"""The proc connector source against the real kernel, on children the tests start.

Every child runs in a sandbox memory cgroup and is ended by its own ``Popen`` (its pid) or by
closing its stdin; events of the rest of the machine arrive too and are filtered by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio

import reapkit._sources.proc_connector as proc_connector_module
from reapkit import AccessDenied
from reapkit._sources.proc_connector import (
    ProcComm,
    ProcConnectorSource,
    ProcEvent,
    ProcEventsLost,
    ProcExec,
    ProcExit,
    ProcFork,
)
from reapkit.testing import SandboxCgroup

from ..conftest import Spawn, need, require_root

pytestmark = pytest.mark.kernel


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def about(event: ProcEvent, pid: int) -> bool:
    if isinstance(event, ProcFork):
        return pid in (event.child_pid, event.parent_pid)
    return getattr(event, "pid", None) == pid


def exit_of(pid: int) -> Callable[[ProcEvent], bool]:
    return lambda event: isinstance(event, ProcExit) and event.pid == pid


async def events_until(
    receive: trio.MemoryReceiveChannel[ProcEvent],
    done: Callable[[ProcEvent], bool],
    timeout: float = 10.0,
) -> list[ProcEvent]:
    got: list[ProcEvent] = []
    with trio.fail_after(timeout):
        async for event in receive:
            got.append(event)
            if done(event):
                return got
    raise AssertionError("the channel was closed")


def python_child(spawn: Spawn, cgroup: SandboxCgroup, code: str) -> subprocess.Popen[bytes]:
    """A Python child in ``cgroup`` running ``code``; it exits when its stdin is closed."""
    return spawn(
        [sys.executable, "-c", code + "\nsys.stdin.read()\n"],
        cgroups=[cgroup],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


@pytest.fixture
def root() -> None:
    require_root()


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 256])
async def test_fork_exec_exit_of_a_child(
    spawn: Spawn, memory_cgroup: SandboxCgroup, max_batch: int
) -> None:
    source = ProcConnectorSource(max_batch=max_batch)
    send, receive = trio.open_memory_channel[ProcEvent](4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        child = spawn(
            ["sh", "-c", "read x; exit 3"], cgroups=[memory_cgroup], stdin=subprocess.PIPE
        )
        assert child.stdin is not None
        child.stdin.close()
        events = await events_until(receive, exit_of(child.pid))
        nursery.cancel_scope.cancel()
    assert child.wait() == 3

    mine = [e for e in events if about(e, child.pid)]
    fork, *execs, end = mine
    assert fork == ProcFork(fork.timestamp, os.getpid(), child.pid, fork.kernel_ns)
    # The spawn trampoline (python) execs, then sh.
    assert execs == [ProcExec(e.timestamp, child.pid, e.kernel_ns) for e in execs]
    assert len(execs) == 2
    assert isinstance(end, ProcExit)
    assert os.waitstatus_to_exitcode(end.exit_code) == 3
    assert end.exit_signal == signal.SIGCHLD
    times = [e.timestamp for e in mine]
    assert times == sorted(times)
    assert all(isinstance(t, float) for t in times)
    # The kernel's own stamps are on the clock of time.monotonic_ns(), in kernel order.
    stamps = [e.kernel_ns for e in mine]
    assert stamps == sorted(stamps) and 0 < stamps[0] < time.monotonic_ns()


async def test_threads_are_not_processes(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    source = ProcConnectorSource()
    send, receive = trio.open_memory_channel[ProcEvent](4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        child = python_child(
            spawn,
            memory_cgroup,
            "import ctypes, sys, threading\n"
            "libc = ctypes.CDLL(None)\n"
            "tids = []\n"
            "def work():\n"
            "    tids.append(threading.get_native_id())\n"
            "    libc.prctl(15, b'reapkit-thread', 0, 0, 0)\n"  # PR_SET_NAME on the thread
            "threads = [threading.Thread(target=work) for _ in range(4)]\n"
            "for t in threads: t.start()\n"
            "for t in threads: t.join()\n"
            "print(*tids, flush=True)\n",
        )
        assert child.stdout is not None and child.stdin is not None
        tids = {int(t) for t in child.stdout.readline().split()}
        assert len(tids) == 4
        assert child.pid not in tids
        child.stdin.close()
        events = await events_until(receive, exit_of(child.pid))
        nursery.cancel_scope.cancel()
    child.wait()

    forks = [e for e in events if isinstance(e, ProcFork) and e.child_pid == child.pid]
    exits = [e for e in events if isinstance(e, ProcExit) and e.pid == child.pid]
    assert len(forks) == len(exits) == 1
    for tid in tids:
        assert not [e for e in events if about(e, tid)]
    assert not [e for e in events if isinstance(e, ProcComm) and e.comm == "reapkit-thread"]
    stats = source.statistics()
    # 4 thread forks, 4 thread exits and 4 thread renames were received and not sent.
    assert stats.datagrams - stats.events >= 12


#: A thread other than the leader calls execve: the kernel kills the other threads, the leader
#: included, and the exec'ing thread takes over the leader's pid (fs/exec.c de_thread).
EXEC_FROM_A_THREAD = (
    "import os, threading\n"
    "t = threading.Thread(target=os.execv, args=('/bin/sleep', ['sleep', '600']))\n"
    "t.start()\n"
    "t.join()\n"
)


async def test_exec_from_a_thread_reports_the_leaders_exit_first(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    """A kernel behaviour to know: the old leader's exit comes with pid == tgid, so it looks
    like the process's exit, although the process goes on under the same pid (new program)."""
    source = ProcConnectorSource()
    send, receive = trio.open_memory_channel[ProcEvent](4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        child = spawn([sys.executable, "-c", EXEC_FROM_A_THREAD], cgroups=[memory_cgroup])
        await events_until(receive, exit_of(child.pid))
        after = await events_until(
            receive, lambda e: isinstance(e, ProcExec) and e.pid == child.pid
        )
        nursery.cancel_scope.cancel()
    assert not [e for e in after if isinstance(e, ProcFork) and e.child_pid == child.pid]
    assert child.poll() is None  # alive, running sleep
    with open(f"/proc/{child.pid}/comm") as f:
        assert f.read() == "sleep\n"


async def test_a_hostile_name_does_not_crash_the_source(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    # Not UTF-8: a strict decoding (pyroute2's, once) would raise here.
    name = b"\xff\xfebad"
    source = ProcConnectorSource()
    send, receive = trio.open_memory_channel[ProcEvent](4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        child = python_child(
            spawn, memory_cgroup, f"import ctypes, sys\nctypes.CDLL(None).prctl(15, {name!r})"
        )
        renamed = await events_until(
            receive, lambda e: isinstance(e, ProcComm) and e.pid == child.pid
        )
        assert isinstance(renamed[-1], ProcComm)
        assert renamed[-1].comm.encode("utf-8", "surrogateescape") == name
        with open(f"/proc/{child.pid}/comm", "rb") as f:
            assert f.read() == name + b"\n"
        assert child.stdin is not None
        child.stdin.close()
        await events_until(receive, exit_of(child.pid))  # still running
        nursery.cancel_scope.cancel()
    child.wait()
    assert source.statistics().decode_errors == 0


@pytest.mark.parametrize("blocked_on", ["the kernel", "a full channel"])
async def test_cancelling_closes_every_fd_and_the_channel(
    spawn: Spawn, memory_cgroup: SandboxCgroup, blocked_on: str
) -> None:
    before = open_fds()
    source = ProcConnectorSource()
    send, receive = trio.open_memory_channel[ProcEvent](0 if blocked_on == "a full channel" else 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        assert len(open_fds()) == len(before) + 1  # the netlink socket
        if blocked_on == "a full channel":
            child = spawn(cgroups=[memory_cgroup])  # events nobody reads
            child.kill()
            child.wait()
            with trio.fail_after(5):
                while not source.statistics().datagrams:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert open_fds() == before
    with trio.fail_after(1):
        async for _ in receive:  # what was buffered, then EndOfChannel
            pass


async def test_statistics_count_what_was_sent(spawn: Spawn, memory_cgroup: SandboxCgroup) -> None:
    source = ProcConnectorSource()
    assert source.statistics() == proc_connector_module.ProcConnectorStatistics(
        "proc connector", 0, 0, 0, 0, 0
    )
    send, receive = trio.open_memory_channel[ProcEvent](4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        child = spawn(cgroups=[memory_cgroup])
        child.kill()
        child.wait()
        events = await events_until(receive, exit_of(child.pid))
        nursery.cancel_scope.cancel()
    events += [e async for e in receive]
    stats = source.statistics()
    assert stats.name == "proc connector"
    assert stats.events == len(events)
    assert stats.datagrams >= stats.events >= 3  # fork, exec, exit
    assert 1 <= stats.wakeups <= stats.datagrams
    assert stats.overruns == stats.decode_errors == 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.events = 0  # type: ignore[misc]


async def test_a_tiny_buffer_reports_lost_events(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    source = ProcConnectorSource(rcvbuf=1)  # the kernel's minimum: a few datagrams
    send, receive = trio.open_memory_channel[ProcEvent](100_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        # The trio loop is blocked: nothing reads the socket while 200 children come and go.
        child = spawn(
            ["sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done"],
            cgroups=[memory_cgroup],
        )
        assert child.wait(30) == 0
        events = await events_until(receive, lambda e: isinstance(e, ProcEventsLost))
        # ... and it keeps going afterwards (the fork: the rest may not fit the buffer while
        # spawn() blocks the loop).
        again = spawn(cgroups=[memory_cgroup])
        await events_until(receive, lambda e: isinstance(e, ProcFork) and e.child_pid == again.pid)
        nursery.cancel_scope.cancel()
    assert source.statistics().overruns >= 1
    assert len(events) < 600  # most of the 600 events of the 200 children were dropped


_BIND_AS_NOBODY = """
from reapkit import AccessDenied
from reapkit.lowlevel import open_proc_connector
try:
    open_proc_connector().close()
except AccessDenied as exc:
    print("refused:", exc)
else:
    print("bound")
"""


@pytest.mark.parametrize("cap_net_admin", [False, True], ids=["no-caps", "cap-net-admin"])
def test_the_bind_needs_cap_net_admin_and_nothing_more(cap_net_admin: bool) -> None:
    # The docs once said "CAP_NET_ADMIN before Linux 6.6": on this 6.18 kernel an
    # unprivileged bind is still EPERM. uid 65534, with or without that one capability.
    require_root()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        need("setpriv(1) (util-linux) to run as another user with chosen capabilities")
    caps = ["--inh-caps=+net_admin", "--ambient-caps=+net_admin"] if cap_net_admin else []
    done = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *caps,
         sys.executable, "-c", _BIND_AS_NOBODY],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    if cap_net_admin:
        assert done.stdout == "bound\n"
    else:
        assert done.stdout == (
            "refused: permission denied: binding to the proc connector needs CAP_NET_ADMIN\n"
        )


async def test_a_refused_socket_is_an_error_before_started(
    root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*, rcvbuf: int | None = None) -> None:
        raise AccessDenied(None, "binding to the proc connector needs CAP_NET_ADMIN")

    monkeypatch.setattr(proc_connector_module, "open_proc_connector", refuse)
    send, receive = trio.open_memory_channel[ProcEvent](1)
    async with trio.open_nursery() as nursery:
        with pytest.raises(AccessDenied, match="CAP_NET_ADMIN"):
            await nursery.start(ProcConnectorSource().run, send)
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()


async def test_a_refused_subscription_closes_the_socket_and_is_not_undone(
    root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []

    def refuse(sock: object, *, listen: bool) -> None:
        calls.append(listen)
        raise AccessDenied(
            None, "the proc connector refused the listen request: it needs CAP_NET_ADMIN"
        )

    monkeypatch.setattr(proc_connector_module, "proc_connector_control", refuse)
    before = open_fds()
    send, _receive = trio.open_memory_channel[ProcEvent](1)
    async with trio.open_nursery() as nursery:
        with pytest.raises(AccessDenied, match="CAP_NET_ADMIN"):
            await nursery.start(ProcConnectorSource().run, send)
    assert open_fds() == before
    assert calls == [True]  # no PROC_CN_MCAST_IGNORE for a subscription that never was


async def test_the_subscription_is_undone_on_cancel(
    root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    real = proc_connector_module.proc_connector_control

    def spy(sock: object, *, listen: bool) -> None:
        calls.append(listen)
        real(sock, listen=listen)  # type: ignore[arg-type]

    monkeypatch.setattr(proc_connector_module, "proc_connector_control", spy)
    send, _receive = trio.open_memory_channel[ProcEvent](4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(ProcConnectorSource().run, send)
        assert calls == [True]
        nursery.cancel_scope.cancel()
    assert calls == [True, False]


def test_real_datagrams_decode_as_pyroute2_decodes_them(
    root: None, spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    """reapkit decodes the connector's fixed uapi structs itself (pyroute2's package import
    cost the daemon 80 ms and 13 MiB of locked memory); pyroute2, the reference decoder,
    stays a test dependency: every real datagram must decode the same with both."""
    cn_proc = pytest.importorskip("pyroute2.netlink.connector.cn_proc")
    from reapkit._kernel import _netlink as nl

    what_of = {
        "PROC_EVENT_FORK": nl.PROC_EVENT_FORK, "PROC_EVENT_EXEC": nl.PROC_EVENT_EXEC,
        "PROC_EVENT_EXIT": nl.PROC_EVENT_EXIT, "PROC_EVENT_COMM": nl.PROC_EVENT_COMM,
    }  # fmt: skip
    sock = nl.open_proc_connector()
    try:
        nl.proc_connector_control(sock, listen=True)
        child = spawn(["sh", "-c", "read x; exec sleep 0"], cgroups=[memory_cgroup],
                      stdin=subprocess.PIPE)  # fmt: skip
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
        sock.settimeout(2.0)
        datagrams = []
        with contextlib.suppress(TimeoutError):
            while len(datagrams) < 2000:
                datagrams.append(sock.recv(65536))
                if any(
                    isinstance(e, ProcExit) and e.pid == child.pid
                    for e in proc_connector_module.decode_datagram(datagrams[-1], 0.0)[0]
                ):
                    break  # fmt: skip
    finally:
        sock.close()
    ours_all, theirs_all = [], []
    for data in datagrams:
        ours, errors = proc_connector_module.decode_datagram(data, 0.0)
        assert errors == 0
        ours_all += [_key(e) for e in ours]
        for msg in cn_proc.ProcEventMarshal().parse(data):
            key = _their_key(msg, what_of)
            if key is not None:
                theirs_all.append(key)
    assert ours_all == theirs_all
    assert ("exit", child.pid) in ours_all and ("fork", child.pid) in ours_all


def _key(event: ProcEvent) -> tuple[str, int]:
    if isinstance(event, ProcFork):
        return "fork", event.child_pid
    if isinstance(event, ProcExit):
        return "exit", event.pid
    if isinstance(event, ProcExec):
        return "exec", event.pid
    assert isinstance(event, ProcComm)
    return "comm", event.pid


def _their_key(msg: Any, what_of: dict[str, int]) -> tuple[str, int] | None:
    """pyroute2's message as ``_key`` sees ours: threads left out, as reapkit leaves them."""
    what = msg["what"]
    if what == what_of["PROC_EVENT_FORK"]:
        return ("fork", msg["child_tgid"]) if msg["child_pid"] == msg["child_tgid"] else None
    if what == what_of["PROC_EVENT_EXIT"]:
        return ("exit", msg["process_tgid"]) if msg["process_pid"] == msg["process_tgid"] else None
    if what == what_of["PROC_EVENT_EXEC"]:
        return "exec", msg["process_tgid"]
    if what == what_of["PROC_EVENT_COMM"]:
        return ("comm", msg["process_tgid"]) if msg["process_pid"] == msg["process_tgid"] else None
    return None

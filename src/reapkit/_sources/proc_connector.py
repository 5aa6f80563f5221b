"""The proc connector (include/uapi/linux/cn_proc.h) as a trio event source.

The kernel multicasts one netlink datagram per task event to every subscribed socket. This
source owns its socket (:func:`~reapkit._kernel._netlink.open_proc_connector`), drives it with
``trio.lowlevel.wait_readable`` and decodes each datagram with the ``cn_proc`` layouts of
:mod:`reapkit._kernel._netlink` (:func:`decode_datagram`: pure, no I/O).

Only process-level events are sent; the kernel reports every *task*, so:

* a fork whose ``child_pid != child_tgid`` created a thread: skipped;
* an exit whose ``process_pid != process_tgid`` ended a thread: skipped. The leader's own exit
  is reported as the process's exit, and two cases make that wrong: the leader called
  ``pthread_exit`` while other threads run on, and a thread other than the leader called
  ``execve`` (``fs/exec.c`` ``de_thread`` kills the leader, reported as an exit with
  ``pid == tgid``, then the exec'ing thread takes over its pid: a :class:`ProcExec` for the
  same pid follows). For "this process is gone", wait on a pidfd;
* a comm change is sent only for a thread-group leader (the name ``/proc/<pid>/comm`` shows).

When the receive buffer overflows the kernel drops events and the next ``recv`` fails with
``ENOBUFS``: the source sends :class:`ProcEventsLost` and carries on; whoever keeps state from
these events must rescan ``/proc`` (the :class:`~reapkit._table.ProcessTable` does). The
default buffer is large (8 MiB asked, which the kernel doubles; ``SO_RCVBUFFORCE`` as root).

Traps handled here:

* Any process can set a non-UTF-8 name with ``prctl(PR_SET_NAME)``: names are decoded with
  ``surrogateescape`` (lossless, as ``_procfs`` does), never as strict UTF-8.
  A message that is short, truncated or not a proc event is counted in ``decode_errors``,
  never raised.
* Datagrams not sent by the kernel (netlink port id != 0) are dropped and counted as decode
  errors: only a privileged process could send them, but forged exits would hide processes.
* Unsubscribing sends ``PROC_CN_MCAST_IGNORE``, which kernels before 6.6 count globally: it is
  sent only if this socket subscribed.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from typing import Final, TypeAlias

import attrs
import trio

from .._kernel._netlink import (
    CN_IDX_PROC,
    CN_MSG,
    CN_VAL_PROC,
    COMM_EVENT,
    EVENT_DATA,
    EXEC_EVENT,
    EXIT_EVENT,
    FORK_EVENT,
    NLMSGHDR,
    PROC_EVENT,
    PROC_EVENT_COMM,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    open_proc_connector,
    proc_connector_control,
)
from ._base import SourceStatistics

__all__ = [
    "ProcComm",
    "ProcConnectorSource",
    "ProcConnectorStatistics",
    "ProcEvent",
    "ProcEventsLost",
    "ProcExec",
    "ProcExit",
    "ProcFork",
]

# A proc event datagram is 16 (nlmsghdr) + 20 (cn_msg) + 16 (header) + 24 (largest body)
# bytes; anything longer is not one, and is truncated (then fails to decode) rather than kept.
_RECV_SIZE: Final = 1024


def _comm(raw: bytes) -> str:
    # TASK_COMM_LEN (16) bytes, NUL-terminated; any other byte is legal (prctl(PR_SET_NAME)).
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------------
# Events


@attrs.frozen
class ProcFork:
    """A new process (not a thread): ``child_pid`` was forked by ``parent_pid``.

    Both are thread-group ids; the parent is the child's real parent (``CLONE_PARENT`` makes
    it the forker's parent).
    """

    timestamp: float
    parent_pid: int
    child_pid: int
    #: When the kernel sent it: ``CLOCK_MONOTONIC`` ns, as ``time.monotonic_ns()`` (0: unknown).
    kernel_ns: int = 0


@attrs.frozen
class ProcExec:
    """``pid`` called ``execve``: its program, name and memory are new."""

    timestamp: float
    pid: int
    #: When the kernel sent it: ``CLOCK_MONOTONIC`` ns, as ``time.monotonic_ns()`` (0: unknown).
    kernel_ns: int = 0


@attrs.frozen
class ProcComm:
    """``pid`` changed its name (``prctl(PR_SET_NAME)``, a write to ``/proc/<pid>/comm``).

    ``comm`` is at most 15 bytes, decoded as UTF-8 with ``surrogateescape``:
    ``comm.encode("utf-8", "surrogateescape")`` gives back the kernel's bytes.
    """

    timestamp: float
    pid: int
    comm: str
    #: When the kernel sent it: ``CLOCK_MONOTONIC`` ns, as ``time.monotonic_ns()`` (0: unknown).
    kernel_ns: int = 0


@attrs.frozen
class ProcExit:
    """Process ``pid`` exited (its leader task did; it may still be a zombie until reaped).

    ``exit_code`` is the raw wait status (``os.waitstatus_to_exitcode`` converts it);
    ``exit_signal`` the signal its parent is sent (``SIGCHLD`` normally).
    """

    timestamp: float
    pid: int
    exit_code: int
    exit_signal: int
    #: When the kernel sent it: ``CLOCK_MONOTONIC`` ns, as ``time.monotonic_ns()`` (0: unknown).
    kernel_ns: int = 0


@attrs.frozen
class ProcEventsLost:
    """The receive buffer overflowed and the kernel dropped events (``ENOBUFS``): any state
    built from the events must be rebuilt from ``/proc``."""

    timestamp: float


ProcEvent: TypeAlias = ProcFork | ProcExec | ProcComm | ProcExit | ProcEventsLost


@attrs.frozen
class ProcConnectorStatistics(SourceStatistics):
    #: Datagrams received from the kernel.
    datagrams: int
    #: ``ENOBUFS`` errors: times the kernel dropped events (one :class:`ProcEventsLost` each).
    overruns: int
    #: Datagrams or messages that could not be decoded, or were not sent by the kernel.
    decode_errors: int


# --------------------------------------------------------------------------------------------
# The source


@attrs.define
class ProcConnectorSource:
    """Process fork, exec, comm and exit events from the kernel's proc connector."""

    #: Receive buffer asked for, in bytes (the kernel doubles it). Past ``net.core.rmem_max``
    #: only with ``CAP_NET_ADMIN`` (``SO_RCVBUFFORCE``).
    rcvbuf: int = attrs.field(default=8 << 20, validator=attrs.validators.ge(1))
    #: Datagrams read in a row before letting other tasks run (``trio.lowlevel.checkpoint``).
    max_batch: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    _events: int = attrs.field(default=0, init=False)
    _wakeups: int = attrs.field(default=0, init=False)
    _datagrams: int = attrs.field(default=0, init=False)
    _overruns: int = attrs.field(default=0, init=False)
    _decode_errors: int = attrs.field(default=0, init=False)

    def statistics(self) -> ProcConnectorStatistics:
        return ProcConnectorStatistics(
            "proc connector",
            self._events,
            self._wakeups,
            self._datagrams,
            self._overruns,
            self._decode_errors,
        )

    async def run(
        self,
        send: trio.MemorySendChannel[ProcEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe, then send process events until cancelled.

        ``started()`` is called once the socket is subscribed: every process event after that
        is either sent or reported lost. Raises (before ``started``)
        :class:`~reapkit.AccessDenied` naming ``CAP_NET_ADMIN`` when the kernel refuses the
        socket or the subscription (without the capability), ``OSError``
        when netlink is unavailable. The kernel silently ignores subscriptions from outside
        the initial user and PID namespaces: then no event ever arrives.
        """
        async with send:
            sock = open_proc_connector(rcvbuf=self.rcvbuf)
            subscribed = False
            try:
                proc_connector_control(sock, listen=True)
                subscribed = True
                task_status.started()
                await self._pump(sock, send)
            finally:
                if subscribed:
                    with contextlib.suppress(OSError):
                        proc_connector_control(sock, listen=False)
                trio.lowlevel.notify_closing(sock)
                sock.close()

    async def _pump(self, sock: socket.socket, send: trio.MemorySendChannel[ProcEvent]) -> None:
        recvfrom = sock.recvfrom
        send_nowait = send.send_nowait
        max_batch = self.max_batch
        while True:
            await trio.lowlevel.wait_readable(sock)
            self._wakeups += 1
            now = trio.current_time()
            budget = max_batch
            while True:
                try:
                    data, (port_id, _groups) = recvfrom(_RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self._overruns += 1
                    events: list[ProcEvent] = [ProcEventsLost(now)]
                else:
                    self._datagrams += 1
                    if port_id != 0:
                        self._decode_errors += 1
                        continue
                    events, errors = decode_datagram(data, now)
                    self._decode_errors += errors
                for event in events:
                    try:
                        send_nowait(event)
                    except trio.WouldBlock:
                        await send.send(event)  # backpressure: the consumer is behind
                    self._events += 1
                budget -= 1
                if not budget:
                    await trio.lowlevel.checkpoint()
                    budget = max_batch
                    now = trio.current_time()


def decode_datagram(data: bytes, now: float) -> tuple[list[ProcEvent], int]:
    """The process events in one datagram from the kernel, stamped ``now``, and the number of
    its messages that could not be decoded (short, truncated, or not a proc event)."""
    events: list[ProcEvent] = []
    errors = 0
    offset, end = 0, len(data)
    while offset < end:
        length = NLMSGHDR.unpack_from(data, offset)[0] if end - offset >= NLMSGHDR.size else 0
        if length < NLMSGHDR.size or length > end - offset:
            return events, errors + 1  # no way to find the next message
        msg = data[offset : offset + length]
        offset += (length + 3) & ~3  # NLMSG_ALIGN
        try:
            idx, val = CN_MSG.unpack_from(msg, NLMSGHDR.size)[:2]
            if idx != CN_IDX_PROC or val != CN_VAL_PROC:
                errors += 1
                continue
            what, _cpu, kernel_ns = PROC_EVENT.unpack_from(msg, NLMSGHDR.size + CN_MSG.size)
            if what == PROC_EVENT_FORK:
                _ppid, parent_tgid, child_pid, child_tgid = FORK_EVENT.unpack_from(msg, EVENT_DATA)
                if child_pid == child_tgid:  # else: a new thread
                    events.append(ProcFork(now, parent_tgid, child_tgid, kernel_ns))
            elif what == PROC_EVENT_EXIT:
                pid, tgid, exit_code, exit_signal = EXIT_EVENT.unpack_from(msg, EVENT_DATA)
                if pid == tgid:  # else: a thread ended
                    events.append(ProcExit(now, tgid, exit_code, exit_signal, kernel_ns))
            elif what == PROC_EVENT_EXEC:
                events.append(ProcExec(now, EXEC_EVENT.unpack_from(msg, EVENT_DATA)[1], kernel_ns))
            elif what == PROC_EVENT_COMM:
                pid, tgid, comm = COMM_EVENT.unpack_from(msg, EVENT_DATA)
                if pid == tgid:  # a thread's name is not the one /proc/<pid>/comm shows
                    events.append(ProcComm(now, tgid, _comm(comm), kernel_ns))
            # Others (PROC_EVENT_NONE: the ack of a subscription, uid, gid, sid, ptrace,
            # coredump) say nothing about which processes exist.
        except struct.error:  # shorter than its layout
            errors += 1
    return events, errors

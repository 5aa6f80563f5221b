"""The proc connector (include/uapi/linux/cn_proc.h) as a trio event source.

The kernel multicasts one netlink datagram per task event to every subscribed socket. This
source owns its socket (:func:`~reapkit._kernel._netlink.open_proc_connector`), drives it with
``trio.lowlevel.wait_readable`` and decodes each datagram with pyroute2's ``cn_proc`` layouts
(``Marshal.parse`` is pure: no I/O, no asyncio).

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

* pyroute2's ``proc_event_comm.decode`` decodes the name as strict UTF-8, and the exception
  escapes ``Marshal.parse``: any process can set a non-UTF-8 name with ``prctl(PR_SET_NAME)``.
  Names are decoded here with ``surrogateescape`` instead (lossless, as ``_procfs`` does), and
  any other decoding failure is counted in ``decode_errors``, never raised.
* Datagrams not sent by the kernel (netlink port id != 0) are dropped and counted as decode
  errors: only a privileged process could send them, but forged exits would hide processes.
* Unsubscribing sends ``PROC_CN_MCAST_IGNORE``, which kernels before 6.6 count globally: it is
  sent only if this socket subscribed.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Any, ClassVar, Final, TypeAlias

import attrs
import trio
from pyroute2.netlink.connector.cn_proc import (
    PROC_EVENT_COMM,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    ProcEventMarshal,
    proc_event_base,
    proc_event_comm,
)

from .._kernel._netlink import open_proc_connector, proc_connector_control
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
_U32_SIGN: Final = 1 << 31
_U32: Final = 1 << 32


def _s32(value: int) -> int:
    # The layouts decode every field as unsigned; exit_code and exit_signal are C ints
    # (exit_signal is -1 for a thread, "no signal to the parent").
    return value - _U32 if value >= _U32_SIGN else value


def _comm(raw: bytes) -> str:
    # TASK_COMM_LEN (16) bytes, NUL-terminated; any other byte is legal (prctl(PR_SET_NAME)).
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class _proc_event_comm(proc_event_comm):  # type: ignore[misc]  # pyroute2 is untyped
    """pyroute2's layout, with a name decoding that cannot fail."""

    def decode(self) -> None:
        proc_event_base.decode(self)  # skip proc_event_comm.decode: strict UTF-8
        self["comm"] = _comm(self["comm"])


class _Marshal(ProcEventMarshal):  # type: ignore[misc]  # pyroute2 is untyped
    msg_map: ClassVar = {**ProcEventMarshal.msg_map, PROC_EVENT_COMM: _proc_event_comm}


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
        marshal = _Marshal()
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
                    events = self._decode(marshal, data, now)
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

    def _decode(self, marshal: Any, data: bytes, now: float) -> list[ProcEvent]:
        events: list[ProcEvent] = []
        try:
            for msg in marshal.parse(data):
                # pyroute2 records a layout's decoding error in the header, then overwrites
                # it with None: a message that failed to decode is one without its fields.
                what, kernel_ns = msg["what"], msg["timestamp_ns"]
                if what == PROC_EVENT_FORK:
                    if msg["child_pid"] == msg["child_tgid"]:  # else: a new thread
                        events.append(
                            ProcFork(now, msg["parent_tgid"], msg["child_tgid"], kernel_ns)
                        )
                elif what == PROC_EVENT_EXIT:
                    if msg["process_pid"] == msg["process_tgid"]:  # else: a thread ended
                        events.append(
                            ProcExit(
                                now,
                                msg["process_tgid"],
                                _s32(msg["exit_code"]),
                                _s32(msg["exit_signal"]),
                                kernel_ns,
                            )
                        )
                elif what == PROC_EVENT_EXEC:
                    events.append(ProcExec(now, msg["process_tgid"], kernel_ns))
                elif what == PROC_EVENT_COMM and msg["process_pid"] == msg["process_tgid"]:
                    events.append(ProcComm(now, msg["process_tgid"], msg["comm"], kernel_ns))
                # Others (PROC_EVENT_NONE: the ack of a subscription, uid, gid, sid, ptrace,
                # coredump) say nothing about which processes exist.
        except Exception:  # pyroute2 raises whatever a layout raises: never let it out
            self._decode_errors += 1
        return events

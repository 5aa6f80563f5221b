"""The proc connector's netlink socket and messages (include/uapi/linux/cn_proc.h).

The messages are a few fixed C structs of the kernel's ABI, packed and unpacked here with
:mod:`struct`. (pyroute2 did this before: importing any part of it imports its whole package,
asyncio and sqlite3 among it, 80 ms and 13 MiB of the daemon's locked memory for five layouts.)
The socket is opened here and driven by whoever owns it (trio, or a blocking probe).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Final

from .._errors import AccessDenied

SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
NETLINK_CONNECTOR: Final = 11  # include/uapi/linux/netlink.h
NLMSG_DONE: Final = 3
CN_IDX_PROC: Final = 1  # include/uapi/linux/connector.h
CN_VAL_PROC: Final = 1
PROC_CN_MCAST_LISTEN: Final = 1
PROC_CN_MCAST_IGNORE: Final = 2

# enum proc_cn_event; the others (NONE: a subscription's ack, uid, gid, sid, ptrace, coredump)
# say nothing about which processes exist.
PROC_EVENT_FORK: Final = 0x1
PROC_EVENT_EXEC: Final = 0x2
PROC_EVENT_COMM: Final = 0x200
PROC_EVENT_EXIT: Final = 0x80000000

# Host byte order, no padding: every field below falls on its natural alignment anyway.
#: struct nlmsghdr: len, type, flags, seq, pid (the sender's port id).
NLMSGHDR: Final = struct.Struct("=IHHII")
#: struct cn_msg: id.idx, id.val, seq, ack, len (of the data that follows), flags.
CN_MSG: Final = struct.Struct("=IIIIHH")
#: struct proc_event up to its union: what, cpu, timestamp_ns.
PROC_EVENT: Final = struct.Struct("=IIQ")
#: The union's members this package reads, their leading fields only (exit's parent_pid and
#: parent_tgid came later, in Linux 4.18). pid_t is a C int; exit_code and exit_signal are
#: __u32 in the header but int in the kernel (exit_signal is -1 for a thread).
FORK_EVENT: Final = struct.Struct("=iiii")  # parent_pid, parent_tgid, child_pid, child_tgid
EXEC_EVENT: Final = struct.Struct("=ii")  # process_pid, process_tgid
COMM_EVENT: Final = struct.Struct("=ii16s")  # process_pid, process_tgid, comm[TASK_COMM_LEN]
EXIT_EVENT: Final = struct.Struct("=iiii")  # process_pid, process_tgid, exit_code, exit_signal
#: Where the union starts in a message: nlmsghdr + cn_msg + proc_event's header.
EVENT_DATA: Final = NLMSGHDR.size + CN_MSG.size + PROC_EVENT.size


def open_proc_connector(*, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking netlink socket bound to the proc connector's multicast group.

    ``rcvbuf`` asks for a receive buffer of that many bytes (the kernel doubles it), through
    ``SO_RCVBUFFORCE`` when privileged (past ``net.core.rmem_max``), else ``SO_RCVBUF``.
    Call :func:`proc_connector_control` to start the events.
    """
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR
    )
    try:
        if rcvbuf is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            # netlink_bind (net/netlink/af_netlink.c): joining a multicast group needs
            # CAP_NET_ADMIN unless the family allows it; the connector does not (6.18 too).
            sock.bind((0, CN_IDX_PROC))
        except PermissionError:
            raise AccessDenied(None, "binding to the proc connector needs CAP_NET_ADMIN") from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def control_message(*, listen: bool) -> bytes:
    """The datagram that subscribes to (``listen=True``) or unsubscribes from the proc events."""
    action = struct.pack("=I", PROC_CN_MCAST_LISTEN if listen else PROC_CN_MCAST_IGNORE)
    cn_msg = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(action), 0)
    size = NLMSGHDR.size + len(cn_msg) + len(action)
    return NLMSGHDR.pack(size, NLMSG_DONE, 0, 0, os.getpid()) + cn_msg + action


def proc_connector_control(sock: socket.socket, *, listen: bool) -> None:
    """Subscribe to (``listen=True``) or unsubscribe from the proc events on ``sock``.

    The kernel silently ignores a request from outside the initial user and PID namespaces;
    only a received event proves the subscription works.
    """
    try:
        sock.send(control_message(listen=listen))
    except PermissionError:
        raise AccessDenied(
            None, "the proc connector refused the listen request: it needs CAP_NET_ADMIN"
        ) from None
    except BlockingIOError as exc:  # pragma: no cover - a 40-byte send to the kernel
        raise OSError(errno.EAGAIN, "proc connector control message not sent") from exc

"""The proc connector's netlink socket (include/uapi/linux/cn_proc.h).

pyroute2 encodes and decodes the messages; its own socket classes run an asyncio loop, so the
socket itself is opened here and driven by whoever owns it (trio, or a blocking probe).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Final

from pyroute2.netlink import NETLINK_CONNECTOR, NLMSG_DONE
from pyroute2.netlink.connector.cn_proc import (
    CN_IDX_PROC,
    CN_VAL_PROC,
    PROC_CN_MCAST_IGNORE,
    PROC_CN_MCAST_LISTEN,
    proc_event_control,
)

from .._errors import AccessDenied

SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)


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


def proc_connector_control(sock: socket.socket, *, listen: bool) -> None:
    """Subscribe to (``listen=True``) or unsubscribe from the proc events on ``sock``.

    The kernel silently ignores a request from outside the initial user and PID namespaces;
    only a received event proves the subscription works.
    """
    msg = proc_event_control()
    msg["header"]["type"] = NLMSG_DONE
    msg["header"]["pid"] = os.getpid()
    msg["idx"] = CN_IDX_PROC
    msg["val"] = CN_VAL_PROC
    msg["len"] = 4
    msg["action"] = PROC_CN_MCAST_LISTEN if listen else PROC_CN_MCAST_IGNORE
    msg.encode()
    try:
        sock.send(msg.data)
    except PermissionError:
        raise AccessDenied(
            None, "the proc connector refused the listen request: it needs CAP_NET_ADMIN"
        ) from None
    except BlockingIOError as exc:  # pragma: no cover - a 40-byte send to the kernel
        raise OSError(errno.EAGAIN, "proc connector control message not sent") from exc

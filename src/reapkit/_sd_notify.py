"""sd_notify without libsystemd: one datagram per message to ``$NOTIFY_SOCKET``.

The protocol (sd_notify(3)): newline-separated ``KEY=VALUE`` assignments in one datagram on
an ``AF_UNIX``/``SOCK_DGRAM`` socket; a path starting with ``@`` is in the abstract namespace.
Where ``NOTIFY_SOCKET`` is unset (not started by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import attrs

log = logging.getLogger("reapkit.sd_notify")


@attrs.define
class SdNotifier:
    address: str | None
    #: From ``$WATCHDOG_USEC``: how often systemd wants ``WATCHDOG=1`` (seconds), or None.
    watchdog_interval: float | None = None
    _sock: socket.socket | None = attrs.field(default=None, init=False)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> SdNotifier:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        interval = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            interval = int(usec) / 1e6
        return cls(address, interval)

    def send(self, *assignments: str) -> None:
        """Send ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``RELOADING=1``, ``STOPPING=1``...
        A failure is logged, never raised: the daemon's job matters more than its reports."""
        if self.address is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

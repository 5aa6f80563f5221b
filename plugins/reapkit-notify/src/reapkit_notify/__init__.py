"""reapkit-notify: desktop notifications for low-memory warnings and kills, over D-Bus.

The ``notify`` observer sends freedesktop notifications (``org.freedesktop.Notifications.Notify``
on a session bus): an early "Memory is low: firefox may be closed soon" when a rule's ``warn``
action runs, and "Closed firefox (pid 4242) to free memory: 512 MiB back" after a kill.

It never blocks the reaper: ``on_warning`` and ``on_record`` only put a notification on a small
bounded queue (or count it as dropped); the connection lives in ``serve()``, which the reaper
runs in its nursery for as long as it runs. A bus that cannot be reached is logged once, and
notifications are dropped (counted) until it can be: every due notification tries to connect
again, so a desktop session that starts after the daemon is found once it is there.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import attrs
import trio

# jeepney ships no type information.
from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    DBusErrorResponse,
    MessageType,
    new_method_call,
)
from jeepney.bus import get_connectable_addresses  # type: ignore[import-untyped]
from jeepney.io.trio import open_dbus_connection  # type: ignore[import-untyped]

from reapkit import InvalidValue, KillRecord, KillWarning, Observer
from reapkit.lowlevel import parse_duration

from ._version import __version__ as __version__

__all__ = ["Notify", "NotifyOptions", "NotifyStatistics"]

log = logging.getLogger("reapkit.notify")

#: Where notification servers live (the Desktop Notifications Specification).
NOTIFICATIONS = DBusAddress(
    "/org/freedesktop/Notifications",
    bus_name="org.freedesktop.Notifications",
    interface="org.freedesktop.Notifications",
)
#: ``Notify(app_name, replaces_id, app_icon, summary, body, actions, hints, expire_timeout)``.
NOTIFY_SIGNATURE = "susssasa{sv}i"
#: The ``urgency`` hint's byte values.
URGENCIES = {"low": 0, "normal": 1, "critical": 2}
#: Notifications waiting for the bus; more are dropped (and counted), never waited for.
QUEUE_SIZE = 16
_MiB = 1 << 20

Kind = Literal["warning", "kill"]


def _duration(value: Any) -> float:
    seconds = parse_duration(value)
    if not 0 <= seconds < math.inf:
        raise InvalidValue(f"{value!r} is not a usable duration")
    return seconds


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise InvalidValue(f"timeout must be more than 0, not {value!r}")
    return seconds


def _check_urgency(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in URGENCIES:
        raise InvalidValue(f"{attribute.name} must be one of low, normal, critical, not {value!r}")


def _check_address(_instance: object, _attribute: object, value: str | None) -> None:
    if value is None:
        return
    try:
        next(get_connectable_addresses(value))
    except (RuntimeError, ValueError, StopIteration):
        raise InvalidValue(
            f"bus_address {value!r} is not a D-Bus address this plugin can connect to:"
            " expected unix:path=... or unix:abstract=..., e.g. 'unix:path=/run/user/1000/bus'"
        ) from None


@attrs.frozen
class NotifyOptions:
    #: The session bus to notify on, e.g. ``"unix:path=/run/user/1000/bus"``. Unset: the
    #: daemon's ``$DBUS_SESSION_BUS_ADDRESS`` when ``serve()`` starts. One address: a root
    #: daemon reaches one user's session this way (see the README).
    bus_address: str | None = attrs.field(default=None, validator=_check_address)
    #: At most one warning and one kill notice per interval (two budgets, so that a warning
    #: never swallows the notice of the kill it announced); the excess is counted, and the next
    #: notice says how many were not shown.
    min_interval: float = attrs.field(default=30.0, converter=_duration)
    app_name: str = "reapkit"
    #: The urgency of kill notices (``low``, ``normal``, ``critical``); critical ones usually
    #: stay on screen until dismissed.
    urgency: str = attrs.field(default="critical", validator=_check_urgency)
    #: The urgency of early warnings.
    warning_urgency: str = attrs.field(default="normal", validator=_check_urgency)
    #: A freedesktop icon name (or a ``file://`` URI); ``""`` for none.
    icon: str = "dialog-warning"
    #: Dry runs: ``"mark"`` notifies with "(dry run)" in the summary, ``"skip"`` stays quiet.
    dry_run: Literal["mark", "skip"] = attrs.field(
        default="mark", validator=attrs.validators.in_(("mark", "skip"))
    )
    #: How long connecting, or one ``Notify`` call, may take.
    timeout: float = attrs.field(default=5.0, converter=_positive_duration)


@attrs.frozen
class NotifyStatistics:
    #: Notifications the notification server accepted.
    sent: int
    #: Left out by ``min_interval`` (the next notice of the same kind counts them).
    rate_limited: int
    #: Never sent: no bus, the bus unreachable, ``serve()`` not running, or the queue full.
    dropped: int
    #: Sent, but the server answered with an error, did not answer in time, or the connection
    #: broke meanwhile.
    failed: int


@attrs.frozen
class _Note:
    kind: Kind
    summary: str
    body: str
    urgency: int
    #: ``(pid, start_time)`` of the victim: a kill notice replaces its warning's notification.
    victim: tuple[int, int]


def _mib(size: int) -> str:
    return f"{size / _MiB:.0f}"


def _describe(exc: BaseException) -> str:
    """One line for an exception, the leaves of an exception group included."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _more(count: int, one: str, many: str) -> str:
    if not count:
        return ""
    return f"\n({count} more {one if count == 1 else many} since the last notice.)"


class Notify(Observer):
    """Desktop notifications over D-Bus: an early warning before a rule's kill (its ``warn``
    action), and a notice naming the process closed and the memory it gave back; rate
    limited. Sent from the reaper's trio loop with jeepney; never blocks the reaper."""

    name: ClassVar[str] = "notify"
    Options: ClassVar[type[Any]] = NotifyOptions
    #: on_warning and on_record only enqueue: fast, non-blocking, and they must run in the
    #: trio thread (they use the trio clock and a memory channel).
    inline: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._queue: trio.MemorySendChannel[_Note] | None = None
        self._last: dict[Kind, float] = {}
        self._suppressed: dict[Kind, int] = {"warning": 0, "kill": 0}
        #: The notification id of the last warning, by victim: its kill notice replaces it.
        self._bubble: dict[tuple[int, int], int] = {}
        self._sent = self._rate_limited = self._dropped = self._failed = 0
        self._bus_down = False
        self._told: set[str] = set()

    def statistics(self) -> NotifyStatistics:
        return NotifyStatistics(self._sent, self._rate_limited, self._dropped, self._failed)

    # -- the reaper's calls: format, rate-limit, enqueue ------------------------------------------

    def on_warning(self, warning: Any) -> None:
        if not isinstance(warning, KillWarning):
            return
        if warning.dry_run and self.options.dry_run == "skip":
            return
        victim = warning.victim
        mark = " (dry run)" if warning.dry_run else ""
        body = html.escape(warning.message, quote=False)  # servers may render markup

        def note(suppressed: int) -> _Note:
            return _Note(
                "warning",
                f"Memory is low: {victim.comm} may be closed soon{mark}",
                body + _more(suppressed, "warning", "warnings"),
                URGENCIES[self.options.warning_urgency],
                (victim.pid, victim.start_time),
            )

        self._offer("warning", note)

    def on_record(self, record: Any) -> None:
        if not isinstance(record, KillRecord) or record.victim is None:
            return
        dry = record.dry_run or record.outcome == "dry-run"
        if record.outcome not in {"killed", "dry-run"} or (dry and self.options.dry_run == "skip"):
            return
        victim = record.victim
        name, pid = victim.comm, victim.pid
        if dry:
            summary = f"Would have closed {name} (pid {pid}) to free memory (dry run)"
            body = f"{name} uses {_mib(victim.rss)} MiB. This is a dry run: nothing was closed."
        else:
            # Where the memory that came back was measured (and some did).
            freed = record.bytes_freed or 0
            back = f": {_mib(freed)} MiB back" if freed > 0 else ""
            summary = f"Closed {name} (pid {pid}) to free memory{back}"
            body = f"The system was running out of memory; {name} was using {_mib(victim.rss)} MiB."
        body = html.escape(body, quote=False)

        def note(suppressed: int) -> _Note:
            return _Note(
                "kill",
                summary,
                body
                + (
                    _more(suppressed, "dry-run kill", "dry-run kills")
                    if dry
                    else _more(suppressed, "process closed", "processes closed")
                ),
                URGENCIES[self.options.urgency],
                (victim.pid, victim.start_time),
            )

        self._offer("kill", note)

    def _offer(self, kind: Kind, make: Callable[[int], _Note]) -> None:
        queue = self._queue
        if queue is None:
            self._dropped += 1
            self._tell_once(
                "not-serving", "not running (its serve() was not started): notifications dropped"
            )
            return
        now = trio.current_time()
        last = self._last.get(kind)
        if last is not None and now - last < self.options.min_interval:
            self._suppressed[kind] += 1
            self._rate_limited += 1
            return
        try:
            queue.send_nowait(make(self._suppressed[kind]))
        except trio.WouldBlock:  # the bus is slow: never make the reaper wait
            self._dropped += 1
            return
        self._last[kind] = now
        self._suppressed[kind] = 0

    # -- the connection, in the reaper's nursery --------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (once, before reporting started: a reachable bus is ready for the first
        warning), then send what is queued until cancelled. While the bus cannot be reached,
        each notification tries to connect again and is dropped if that fails."""
        send, receive = trio.open_memory_channel[_Note](QUEUE_SIZE)
        async with send, receive:
            self._queue = send
            try:
                conn = await self._connect()
                task_status.started()
                while True:
                    pending = None
                    if conn is None:
                        pending = await receive.receive()
                        conn = await self._connect()
                        if conn is None:
                            self._dropped += 1
                            continue
                    await self._session(conn, receive, pending)
                    conn = None
            finally:
                self._queue = None

    def _address(self) -> str | None:
        return self.options.bus_address or os.environ.get("DBUS_SESSION_BUS_ADDRESS") or None

    async def _connect(self) -> Any:
        address = self._address()
        if address is None:
            self._down(
                "no session bus: the bus_address option is not set and neither is"
                " DBUS_SESSION_BUS_ADDRESS"
            )
            return None
        try:
            with trio.fail_after(self.options.timeout):
                conn = await open_dbus_connection(address)
        except Exception as exc:  # whatever the bus does, the reaper carries on
            self._down(f"cannot reach the session bus at {address}: {_describe(exc)}")
            return None
        if self._bus_down:
            log.warning("notify: reached the session bus at %s again", address)
        else:
            log.info("notify: connected to the session bus at %s", address)
        self._bus_down = False
        return conn

    async def _session(
        self, conn: Any, receive: trio.MemoryReceiveChannel[_Note], pending: _Note | None
    ) -> None:
        """Send notifications over ``conn`` until the bus goes away."""
        try:
            async with conn, conn.router() as router:
                if pending is not None:
                    await self._deliver(router, pending)
                async for note in receive:  # ends only with serve(), which holds the sender
                    await self._deliver(router, note)
        except Exception as exc:  # the bus closed or broke (jeepney's router raises a group)
            self._down(f"lost the session bus at {self._address()}: {_describe(exc)}")

    async def _deliver(self, router: Any, note: _Note) -> None:
        replaces = self._bubble.get(note.victim, 0) if note.kind == "kill" else 0
        message = new_method_call(
            NOTIFICATIONS,
            "Notify",
            NOTIFY_SIGNATURE,
            (
                self.options.app_name,
                replaces,
                self.options.icon,
                note.summary,
                note.body,
                [],
                {"urgency": ("y", note.urgency)},
                -1,
            ),
        )
        try:
            with trio.fail_after(self.options.timeout):
                reply = await router.send_and_get_reply(message)
        except trio.TooSlowError:
            self._failed += 1
            self._tell_once(
                "timeout",
                f"the notification server did not answer within {self.options.timeout:g} s",
            )
            return
        except BaseException:
            self._failed += 1  # the connection broke under it, or the reaper is stopping
            raise
        if reply.header.message_type is MessageType.error:
            self._failed += 1
            error = DBusErrorResponse(reply)
            hint = (
                " (no notification server on this bus: is a desktop session running?)"
                if error.name == "org.freedesktop.DBus.Error.ServiceUnknown"
                else ""
            )
            self._tell_once(f"error {error.name}", f"Notify failed: {error}{hint}")
            return
        self._sent += 1
        if note.kind == "warning":
            self._bubble = {note.victim: int(reply.body[0])}
        else:
            self._bubble.pop(note.victim, None)

    # -- logging: once per kind of trouble ------------------------------------------------------

    def _down(self, message: str) -> None:
        if self._bus_down:
            log.debug("notify: %s", message)
            return
        self._bus_down = True
        log.warning("notify: %s; notifications are dropped until it can be reached", message)

    def _tell_once(self, key: str, message: str) -> None:
        if key in self._told:
            log.debug("notify: %s", message)
            return
        self._told.add(key)
        log.warning("notify: %s", message)

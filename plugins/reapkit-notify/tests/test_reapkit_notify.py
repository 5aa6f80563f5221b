"""The notify observer against a private session bus that each test starts (``dbus-daemon``
with its own config, listening on a socket in the test's directory), with a fake
``org.freedesktop.Notifications`` server on it written with jeepney that records every
``Notify`` call. The only processes started are those dbus-daemons, each ended through its
own Popen."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from jeepney import HeaderFields, MessageType, message_bus, new_error, new_method_return
from jeepney.io.trio import Proxy, open_dbus_connection

from reapkit import (
    KillRecord,
    KillWarning,
    PluginError,
    PluginRegistry,
    Timeline,
    Victim,
    load_policy,
    open_reaper,
)
from reapkit.lowlevel import ProcFS
from reapkit.testing import FakeProc, make_options
from reapkit_notify import Notify, NotifyOptions

MiB = 1 << 20
GiB = 1 << 30
DBUS_DAEMON = shutil.which("dbus-daemon")

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


# -- a private session bus and a fake notification server ------------------------------------


def _need_dbus_daemon() -> str:
    if DBUS_DAEMON is None:
        pytest.skip("needs dbus-daemon (Debian package dbus-daemon) for a private session bus")
    return DBUS_DAEMON


class SessionBus:
    """A dbus-daemon of the test's own, on ``<directory>/bus``; ``stop()`` ends it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "bus"
        self.address = f"unix:path={self.path}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        daemon = _need_dbus_daemon()
        config = self.directory / "bus.conf"
        config.write_text(BUS_CONFIG.format(path=self.path))
        with open(self.directory / "dbus-daemon.log", "a") as log:
            self.process = subprocess.Popen(
                [daemon, f"--config-file={config}", "--nofork", "--print-address=1"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.process.stdout is not None
        printed = self.process.stdout.readline()  # once it listens
        if not printed.startswith(f"unix:path={self.path}"):
            self.stop()
            errors = (self.directory / "dbus-daemon.log").read_text()
            raise RuntimeError(f"dbus-daemon did not start: {printed!r} {errors}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            if process.stdout is not None:
                process.stdout.close()


@attrs.define
class Call:
    app_name: str
    replaces_id: int
    app_icon: str
    summary: str
    body: str
    actions: list[str]
    hints: dict[str, tuple[str, Any]]
    expire_timeout: int
    signature: str
    id: int


@attrs.define
class FakeNotifications:
    """Owns ``org.freedesktop.Notifications`` on a bus and records what ``Notify`` gets."""

    calls: list[Call] = attrs.Factory(list)
    next_id: int = 100

    async def serve(self, address: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        conn = await open_dbus_connection(address)
        async with conn:
            async with conn.router() as router:
                bus = Proxy(message_bus, router)
                (reply,) = await bus.RequestName("org.freedesktop.Notifications", 4)
                assert reply == 1  # the primary owner
            task_status.started()
            while True:
                try:
                    msg = await conn.receive()
                except (trio.EndOfChannel, trio.BrokenResourceError):
                    return  # the bus was stopped
                if msg.header.message_type is not MessageType.method_call:
                    continue
                if msg.header.fields.get(HeaderFields.member) != "Notify":
                    await conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))
                    continue
                self.next_id += 1
                signature = msg.header.fields.get(HeaderFields.signature, "")
                self.calls.append(Call(*msg.body, signature=signature, id=self.next_id))
                await conn.send(new_method_return(msg, "u", (self.next_id,)))

    async def wait_for(self, count: int, timeout: float = 10) -> list[Call]:
        with trio.fail_after(timeout):
            while len(self.calls) < count:
                await trio.sleep(0.01)
        return self.calls


@pytest.fixture
def bus_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for the bus socket, short enough for a unix socket path (108 bytes)."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="reapkit-notify-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def dbus_daemon() -> str:
    """Skips (with the reason) where there is no dbus-daemon: from a fixture, as a skip from
    inside a trio test loses its message."""
    return _need_dbus_daemon()


@pytest.fixture
def session_bus(bus_dir: Path) -> Iterator[SessionBus]:
    bus = SessionBus(bus_dir)
    try:
        bus.start()
        yield bus
    finally:
        bus.stop()


# -- records as the reaper makes them ---------------------------------------------------------


def _victim(comm: str = "firefox", pid: int = 4242, rss: int = 2 * GiB) -> Victim:
    return Victim(
        pid=pid,
        start_time=777,
        comm=comm,
        cmdline=f"/usr/lib/{comm}/{comm}",
        cgroup="/user.slice/user-1000.slice/session-2.scope",
        uid=1000,
        rss=rss,
        swap=0,
        oom_score=800,
        oom_score_adj=200,
    )


def _warning(victim: Victim, *, dry_run: bool = False) -> KillWarning:
    message = f"memory is low: about to free memory by ending {victim.comm} ({victim.pid})"
    return KillWarning(trio.current_time(), "desktop", victim, message, dry_run=dry_run)


def _record(
    victim: Victim,
    *,
    outcome: Any = "killed",
    bytes_freed: int | None = 512 * MiB,
    dry_run: bool = False,
) -> KillRecord:
    return KillRecord(
        rule="desktop",
        outcome=outcome,
        reason="the largest process in the session",
        condition="mem_available below 5%",
        timeline=Timeline(trigger_seen=trio.current_time()),
        victim=victim,
        bytes_freed=bytes_freed,
        dry_run=dry_run,
    )


def _notify(address: str, **options: Any) -> Notify:
    return Notify(NotifyOptions(bus_address=address, **options))


async def _until(predicate: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def _warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "reapkit.notify" and r.levelno >= logging.WARNING
    ]


# -- tests --------------------------------------------------------------------------------------


async def test_a_warning_then_a_kill_notice_reach_the_notification_server(
    session_bus: SessionBus,
) -> None:
    server = FakeNotifications()
    firefox = _victim()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, session_bus.address)
        observer = _notify(session_bus.address)
        await nursery.start(observer.serve)
        assert observer.on_warning(_warning(firefox)) is None  # enqueues only
        assert observer.on_record(_record(firefox)) is None
        warning, kill = await server.wait_for(2)
        stats = observer.statistics()
        nursery.cancel_scope.cancel()

    assert warning.signature == kill.signature == "susssasa{sv}i"
    assert warning.app_name == kill.app_name == "reapkit"
    assert warning.summary == "Memory is low: firefox may be closed soon"
    assert warning.body == "memory is low: about to free memory by ending firefox (4242)"
    assert warning.hints == {"urgency": ("y", 1)}  # normal
    assert warning.replaces_id == 0 and warning.expire_timeout == -1
    assert warning.app_icon == "dialog-warning" and warning.actions == []

    assert kill.summary == "Closed firefox (pid 4242) to free memory: 512 MiB back"
    assert "firefox was using 2048 MiB" in kill.body
    assert kill.hints == {"urgency": ("y", 2)}  # critical
    assert kill.replaces_id == warning.id  # the warning's bubble becomes the kill notice
    assert stats.sent == 2 and stats.dropped == stats.failed == stats.rate_limited == 0


async def test_a_burst_is_rate_limited_to_one_notice_per_kind(session_bus: SessionBus) -> None:
    server = FakeNotifications()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, session_bus.address)
        observer = _notify(session_bus.address, min_interval="1s")
        await nursery.start(observer.serve)
        start = trio.current_time()
        for pid in range(1000, 1005):
            observer.on_warning(_warning(_victim(f"renderer{pid}", pid)))
            observer.on_record(_record(_victim(f"renderer{pid}", pid)))
        await server.wait_for(2)
        await trio.sleep(0.3)
        assert len(server.calls) == 2  # one warning and one kill notice, nothing more
        assert observer.statistics().rate_limited == 8
        await trio.sleep_until(start + 1.05)
        observer.on_record(_record(_victim("chrome", 2000), bytes_freed=3 * GiB))
        calls = await server.wait_for(3)
        stats = observer.statistics()
        nursery.cancel_scope.cancel()

    first_warning, first_kill, later = calls
    assert first_warning.summary == "Memory is low: renderer1000 may be closed soon"
    assert first_kill.summary == "Closed renderer1000 (pid 1000) to free memory: 512 MiB back"
    assert later.summary == "Closed chrome (pid 2000) to free memory: 3072 MiB back"
    assert later.body.endswith("(4 more processes closed since the last notice.)")
    assert stats.sent == 3 and stats.rate_limited == 8 and stats.dropped == 0


async def test_dry_runs_are_marked_or_skipped_and_other_outcomes_are_quiet(
    session_bus: SessionBus,
) -> None:
    server = FakeNotifications()
    firefox = _victim()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, session_bus.address)
        marking = _notify(session_bus.address, min_interval=0, urgency="low", app_name="oomie")
        quiet = _notify(session_bus.address, min_interval=0, dry_run="skip")
        await nursery.start(marking.serve)
        await nursery.start(quiet.serve)
        for observer in (quiet, marking):
            observer.on_warning(_warning(firefox, dry_run=True))
            observer.on_record(_record(firefox, outcome="dry-run", bytes_freed=None, dry_run=True))
            observer.on_record(_record(firefox, outcome="refused", bytes_freed=None))
            observer.on_record(_record(firefox, outcome="no-candidate", bytes_freed=None))
        warning, kill = await server.wait_for(2)
        await trio.sleep(0.2)
        assert len(server.calls) == 2
        assert quiet.statistics().sent == 0
        nursery.cancel_scope.cancel()

    assert warning.summary == "Memory is low: firefox may be closed soon (dry run)"
    assert kill.summary == "Would have closed firefox (pid 4242) to free memory (dry run)"
    assert "nothing was closed" in kill.body
    assert kill.hints == {"urgency": ("y", 0)}  # urgency = "low"
    assert warning.app_name == kill.app_name == "oomie"


async def test_names_are_escaped_for_markup_and_unmeasured_memory_is_not_invented(
    session_bus: SessionBus,
) -> None:
    server = FakeNotifications()
    odd = _victim("a<b>&c", 31337, rss=300 * MiB)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, session_bus.address)
        observer = _notify(session_bus.address, icon="")
        await nursery.start(observer.serve)
        observer.on_warning(_warning(odd))
        observer.on_record(_record(odd, bytes_freed=None))
        warning, kill = await server.wait_for(2)
        nursery.cancel_scope.cancel()
    # The summary is plain text; the body may be rendered as markup by the server.
    assert warning.summary == "Memory is low: a<b>&c may be closed soon"
    assert warning.body == "memory is low: about to free memory by ending a&lt;b&gt;&amp;c (31337)"
    assert kill.summary == "Closed a<b>&c (pid 31337) to free memory"  # no "MiB back"
    assert "a&lt;b&gt;&amp;c was using 300 MiB" in kill.body
    assert warning.app_icon == kill.app_icon == ""


async def test_an_unreachable_bus_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="reapkit.notify")
    nowhere = f"unix:path={tmp_path}/no-bus-here"
    observer = _notify(nowhere, min_interval=0)
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    unset = Notify(NotifyOptions(min_interval=0))  # no bus_address, no $DBUS_SESSION_BUS_ADDRESS
    idle = _notify(nowhere)  # serve() never runs
    async with trio.open_nursery() as nursery:
        await nursery.start(observer.serve)
        await nursery.start(unset.serve)
        for _ in range(3):
            for each in (observer, unset, idle):
                each.on_warning(_warning(_victim()))
                each.on_record(_record(_victim()))
            await trio.sleep(0.05)
        await _until(lambda: observer.statistics().dropped == 6)
        await _until(lambda: unset.statistics().dropped == 6)
        nursery.cancel_scope.cancel()

    assert idle.statistics().dropped == 6
    assert observer.statistics().sent == unset.statistics().sent == 0
    logged = _warnings_logged(caplog)
    assert len(logged) == 3, logged  # once each, however many notifications were dropped
    assert any(f"cannot reach the session bus at {nowhere}" in m for m in logged)
    assert any("bus_address option is not set" in m for m in logged)
    assert any("serve() was not started" in m for m in logged)


async def test_no_notification_server_is_counted_and_logged_once(
    session_bus: SessionBus, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        observer = _notify(session_bus.address, min_interval=0)
        await nursery.start(observer.serve)
        for pid in (1, 2, 3):
            observer.on_record(_record(_victim(pid=pid)))
        await _until(lambda: observer.statistics().failed == 3)
        nursery.cancel_scope.cancel()
    (logged,) = _warnings_logged(caplog)
    assert "ServiceUnknown" in logged and "no notification server" in logged


async def test_a_bus_that_comes_later_or_goes_away_is_reached_when_it_is_there(
    dbus_daemon: str, bus_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus = SessionBus(bus_dir)
    observer = _notify(bus.address, min_interval=0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(observer.serve)  # before the user's session has a bus
            observer.on_warning(_warning(_victim("early")))
            await _until(lambda: observer.statistics().dropped == 1)

            bus.start()  # the user logs in
            first = FakeNotifications()
            await nursery.start(first.serve, bus.address)
            observer.on_warning(_warning(_victim("late")))
            (late,) = await first.wait_for(1)

            bus.stop()  # and out again
            observer.on_warning(_warning(_victim("gone")))
            await _until(lambda: observer.statistics().dropped + observer.statistics().failed > 1)

            bus.start()
            second = FakeNotifications()
            await nursery.start(second.serve, bus.address)
            observer.on_record(_record(_victim("back")))
            (back,) = await second.wait_for(1)
            nursery.cancel_scope.cancel()
    finally:
        bus.stop()
    assert late.summary == "Memory is low: late may be closed soon"
    assert back.summary.startswith("Closed back (pid 4242)")
    logged = _warnings_logged(caplog)
    assert sum("dropped until it can be reached" in m for m in logged) == 2, logged
    assert sum("again" in m for m in logged) == 2, logged


async def test_a_policy_with_notify_runs_it_in_the_reaper(
    session_bus: SessionBus, tmp_path: Path
) -> None:
    """End to end on a fake /proc (whose processes are never signalled): the reaper starts
    the observer's serve(), the warn action's warning and the dry-run record reach the bus."""
    registry = PluginRegistry()
    assert not [f for f in registry.load_entry_points() if f.name == "notify"]
    (info,) = [p for p in registry.plugins() if p.name == "notify"]
    assert info.kind == "observer" and info.source == "reapkit-notify" and info.plugin is Notify

    fake = FakeProc(tmp_path / "proc")
    fake.set_meminfo(total=16 * GiB, available=300 * MiB)
    fake.add_process(1, comm="systemd")
    fake.add_process(600, comm="Web Content", rss=3 * GiB, oom_score=700, uid=1000)
    fake.add_process(700, comm="editor", rss=500 * MiB, oom_score=120, uid=1000)
    policy = load_policy(
        text=f"""
[[rule]]
name = "desktop"
when = []
scope = "system"
select = ["largest-rss"]
actions = ["warn", "kill"]

[[observer]]
name = "notify"
bus_address = "{session_bus.address}"
min_interval = "10s"
""",
        registry=registry,
        dry_run=True,
        procfs=ProcFS(fake.root),
    )
    (observer,) = policy.observers
    assert isinstance(observer, Notify) and observer.options.min_interval == 10
    server = FakeNotifications()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, session_bus.address)
        async with open_reaper(policy, procfs=ProcFS(fake.root), live_table=False) as reaper:
            async with reaper.records() as records:
                await reaper.trigger("test")
                with trio.fail_after(10):
                    record = await records.receive()
            warning, kill = await server.wait_for(2)
        nursery.cancel_scope.cancel()
    assert record.outcome == "dry-run" and record.victim is not None
    assert record.victim.pid == 600
    assert warning.summary == "Memory is low: Web Content may be closed soon (dry run)"
    assert kill.summary == "Would have closed Web Content (pid 600) to free memory (dry run)"
    assert kill.replaces_id == warning.id


def test_options_are_checked_when_a_policy_is_loaded() -> None:
    defaults = make_options(Notify, {})
    assert defaults == NotifyOptions()
    assert defaults.min_interval == 30 and defaults.bus_address is None
    assert defaults.urgency == "critical" and defaults.app_name == "reapkit"
    assert make_options(Notify, {"min_interval": "1m"}).min_interval == 60
    assert make_options(Notify, {"bus_address": "unix:abstract=/tmp/dbus-x"}).bus_address
    bad = {
        "bus_address": "tcp:host=localhost,port=1234",
        "urgency": "panic",
        "warning_urgency": "loud",
        "min_interval": "soon",
        "dry_run": "maybe",
        "timeout": "0s",
        "colour": "red",
    }
    for key, value in bad.items():
        with pytest.raises(PluginError) as caught:
            make_options(Notify, {key: value})
        assert caught.value.plugin == "notify" and caught.value.option == key, caught.value

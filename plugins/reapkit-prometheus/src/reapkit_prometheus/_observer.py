"""The ``prometheus`` observer: counts what records and warnings say, and serves the metrics
over HTTP from inside the reaper's trio loop (prometheus-client's ASGI app on hypercorn's
trio worker), started by the reaper in its nursery and cancelled with it."""

from __future__ import annotations

import functools
import logging
import socket
from typing import Any, ClassVar

import attrs
import hypercorn.trio
import trio
from hypercorn.config import Config
from reapkit import KillRecord, KillWarning, Observer, Reaper
from reapkit.lowlevel import ProcFS

from ._app import metrics_app
from ._metrics import Metrics

log = logging.getLogger("reapkit.prometheus")
#: hypercorn's error log. Its "Running on ... (CTRL + C to quit)" is for a server run from a
#: terminal; the observer says where its metrics are itself.
http_log = logging.getLogger("reapkit.prometheus.http")
http_log.addFilter(lambda record: not str(record.msg).startswith("Running on "))


def _port_number(instance: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"'{attribute.name}' must be a TCP port, 0 to 65535 (got {value!r})")


def _absolute(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"'{attribute.name}' must start with '/' (got {value!r})")


@attrs.frozen
class PrometheusOptions:
    """The ``[[observer]]`` table: ``{ name = "prometheus", port = 9877 }``."""

    #: Address to listen on: loopback by default; ``"0.0.0.0"`` (or ``"::"``) where
    #: Prometheus scrapes from elsewhere, as from a Kubernetes DaemonSet's pod IP.
    host: str = attrs.field(default="127.0.0.1", validator=attrs.validators.instance_of(str))
    #: TCP port; 0 picks a free one (read it from the observer's ``port`` once started).
    port: int = attrs.field(default=9877, validator=_port_number)
    #: The path metrics are served at; anything else answers 404.
    path: str = attrs.field(
        default="/metrics", validator=[attrs.validators.instance_of(str), _absolute]
    )


class PrometheusObserver(Observer):
    """Exports kills, bytes freed, kill timelines, candidate counts, memory and pressure to
    Prometheus. See the package README for every metric."""

    name: ClassVar[str] = "prometheus"
    Options: ClassVar[type[Any]] = PrometheusOptions
    options: PrometheusOptions

    def __init__(
        self, options: PrometheusOptions | None = None, *, procfs: ProcFS | None = None
    ) -> None:
        super().__init__(options)
        self.metrics = Metrics(procfs=procfs)
        #: The port listened on while :meth:`serve` runs (the chosen one for ``port = 0``).
        self.port: int | None = None
        #: The metrics URL while :meth:`serve` runs, e.g. ``http://127.0.0.1:9877/metrics``.
        self.url: str | None = None

    # -- what the reaper tells --------------------------------------------------------------

    def on_record(self, record: KillRecord) -> None:
        self.metrics.record(record)

    def on_warning(self, warning: KillWarning) -> None:
        self.metrics.warning(warning)

    def attach(self, reaper: Reaper) -> None:
        """Also export ``reaper``'s own counters (decisions, skips, failures, reaps) and start
        each of its rules' series at 0. The reaper calls this when it starts, before
        :meth:`serve`."""
        self.metrics.reaper.statistics = reaper.statistics
        self.metrics.know_rules(rule.name for rule in reaper.policy.rules)

    # -- the HTTP endpoint ------------------------------------------------------------------

    def _config(self) -> Config:
        config = Config()
        host = self.options.host
        config.bind = [
            f"[{host}]:{self.options.port}" if ":" in host else f"{host}:{self.options.port}"
        ]
        config.accesslog = None
        # hypercorn's default replaces the handlers of a "hypercorn.error" logger to print to
        # stderr; an embedded server logs through the embedder's logging instead.
        config.errorlog = http_log
        config.include_server_header = False
        return config

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the metrics until cancelled; ``task_status.started(url)`` once listening.

        Cancelling closes the listening socket and every connection. An address that cannot
        be listened on (the port taken, the address not this host's) raises a plain
        ``OSError`` naming it, before anything starts."""
        host, port = self.options.host, self.options.port
        _check_bind(host, port)
        app = metrics_app(self.metrics.registry, self.options.path)
        serve = functools.partial(hypercorn.trio.serve, app, self._config(), mode="asgi")
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(serve)
                bound = binds[0]  # "http://127.0.0.1:9877", "http://[::]:9877"
                self.port = int(bound.rsplit(":", 1)[1])
                self.url = f"{bound}{self.options.path}"
                log.info("prometheus metrics at %s", self.url)
                task_status.started(self.url)
        finally:
            self.port = self.url = None


def _check_bind(host: str, port: int) -> None:
    """Bind a throw-away socket as hypercorn will, to fail early and plainly. (hypercorn's
    own failure comes wrapped in exception groups, and leaves its socket to the collector.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            message = f"prometheus observer cannot listen on {where}: {exc.strerror or exc}"
            raise type(exc)(exc.errno, message) from None

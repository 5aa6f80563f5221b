"""The metrics: what records and warnings count, and what is read at scrape time.

Everything lives in one :class:`~prometheus_client.CollectorRegistry` per observer, never in
prometheus-client's global one: two reapers in one process (or a test beside a service)
cannot collide, and nothing else the process exports leaks into this endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from reapkit import KillRecord, KillWarning, ReaperStatistics, ReapkitError
from reapkit.lowlevel import ProcFS, parse_pressure

from ._version import __version__

log = logging.getLogger("reapkit.prometheus")

#: Every ``KillRecord.outcome`` (reapkit's ``Outcome``): each rule's series start at 0 for
#: these once the rules are known (:meth:`Metrics.know_rules`), so that ``increase()`` sees
#: the first kill instead of a series appearing at 1.
OUTCOMES = ("killed", "dry-run", "abandoned", "refused", "no-candidate", "failed")

#: From a millisecond (a pidfd wait on an idle machine) to the tens of seconds a stuck
#: victim's memory may take to come back.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Processes entering a decision's selector chain: a cgroup of a few up to a whole host.
CANDIDATE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)

#: (metric, help, start, end) of each timeline phase; a phase is observed when both ends
#: happened.
PHASES = (
    (
        "reapkit_trigger_to_signal_seconds",
        "From the trigger being seen to the first signal sent to the victim (or, in dry-run, "
        "the moment it would have been).",
        "trigger_seen",
        "signal_sent",
    ),
    (
        "reapkit_signal_to_memory_back_seconds",
        "From the first signal to the victim's memory measured back (its exit, or the "
        "reaper's process_mrelease, whichever came first).",
        "signal_sent",
        "memory_back",
    ),
    (
        "reapkit_signal_to_exit_seconds",
        "From the first signal to the victim's exit seen through its pidfd.",
        "signal_sent",
        "exit_seen",
    ),
)


class Metrics:
    """The observer's registry and what feeds it. Safe to call from any thread
    (prometheus-client's values are locked), cheap enough to call inline from the reaper."""

    def __init__(self, *, procfs: ProcFS | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.kills = Counter(
            "reapkit_kills_total",
            "Decisions by rule and outcome: killed, dry-run, abandoned, refused, no-candidate, "
            "failed (one per KillRecord).",
            ["rule", "outcome"],
            registry=r,
        )
        self.bytes_freed = Counter(
            "reapkit_bytes_freed_total",
            "Bytes that came back after kills, as measured in the victim's memory cgroup or "
            "the system.",
            ["rule"],
            registry=r,
        )
        self.warnings = Counter(
            "reapkit_warnings_total",
            "Warnings rules sent before acting (the warn action).",
            ["rule"],
            registry=r,
        )
        self.phases = {
            name: (Histogram(name, doc, ["rule"], buckets=LATENCY_BUCKETS, registry=r), a, b)
            for name, doc, a, b in PHASES
        }
        self.candidates = Histogram(
            "reapkit_decision_candidates",
            "Processes that entered each decision's selector chain.",
            ["rule"],
            buckets=CANDIDATE_BUCKETS,
            registry=r,
        )
        self.last_candidates = Gauge(
            "reapkit_last_decision_candidates",
            "Processes that entered the latest decision's selector chain.",
            ["rule"],
            registry=r,
        )
        self.last_record = Gauge(
            "reapkit_last_record_timestamp_seconds",
            "When the latest decision's trigger was seen (seconds since the epoch).",
            ["rule"],
            registry=r,
        )
        Info("reapkit_exporter", "The exporter's version.", registry=r).info(
            {"version": __version__}
        )
        self.system = SystemCollector(procfs or ProcFS())
        r.register(self.system)
        self.reaper = ReaperCollector()
        r.register(self.reaper)

    def know_rules(self, rules: Iterable[str]) -> None:
        """Create every series of these rules at 0 (Prometheus' advice for known labels)."""
        for rule in rules:
            for outcome in OUTCOMES:
                self.kills.labels(rule, outcome)
            self.bytes_freed.labels(rule)
            self.warnings.labels(rule)

    def record(self, record: KillRecord) -> None:
        rule = record.rule
        self.kills.labels(rule, record.outcome).inc()
        if record.bytes_freed is not None and record.bytes_freed > 0:
            self.bytes_freed.labels(rule).inc(record.bytes_freed)
        timeline = record.timeline
        for histogram, start, end in self.phases.values():
            began, ended = getattr(timeline, start), getattr(timeline, end)
            if began is not None and ended is not None:
                histogram.labels(rule).observe(max(0.0, ended - began))
        if record.selectors:
            count = record.selectors[0].candidates_in
            self.candidates.labels(rule).observe(count)
            self.last_candidates.labels(rule).set(count)
        self.last_record.labels(rule).set(timeline.trigger_seen + record.epoch_offset)

    def warning(self, warning: KillWarning) -> None:
        self.warnings.labels(warning.rule).inc()


# -- read at scrape time ---------------------------------------------------------------------


class SystemCollector(Collector):
    """Memory and memory pressure, read from ``/proc`` when Prometheus scrapes (two small
    reads; a missing file — PSI disabled — leaves its metrics out rather than failing)."""

    def __init__(self, procfs: ProcFS) -> None:
        self.procfs = procfs

    def collect(self) -> Iterable[Metric]:
        try:
            meminfo = self.procfs.meminfo()
        except (ReapkitError, OSError) as exc:
            log.debug("metrics: cannot read meminfo: %s", exc)
        else:
            yield GaugeMetricFamily(
                "reapkit_memory_available_bytes",
                "MemAvailable from /proc/meminfo.",
                value=meminfo.available,
            )
            yield GaugeMetricFamily(
                "reapkit_memory_total_bytes", "MemTotal from /proc/meminfo.", value=meminfo.total
            )
            yield GaugeMetricFamily(
                "reapkit_swap_free_bytes", "SwapFree from /proc/meminfo.", value=meminfo.swap_free
            )
        try:
            pressure = parse_pressure(self.procfs.read_bytes("pressure/memory"))
        except (ReapkitError, OSError) as exc:
            log.debug("metrics: cannot read memory pressure: %s", exc)
            return
        avg10 = GaugeMetricFamily(
            "reapkit_memory_pressure_avg10_ratio",
            "Share of the last 10 s in which some (or all: full) non-idle tasks stalled on "
            "memory, from /proc/pressure/memory (0 to 1).",
            labels=["kind"],
        )
        stalled = CounterMetricFamily(
            "reapkit_memory_pressure_stalled_seconds",
            "Total time some (or all: full) non-idle tasks stalled on memory, from "
            "/proc/pressure/memory; rate() of it gives any averaging window.",
            labels=["kind"],
        )
        for kind in ("some", "full"):
            line = pressure.line(kind)
            if line is not None:
                avg10.add_metric([kind], line.avg10 / 100)
                stalled.add_metric([kind], line.total_us / 1e6)
        yield avg10
        yield stalled


class ReaperCollector(Collector):
    """The reaper's own counters (``Reaper.statistics()``), once the observer was handed a
    way to read them (:meth:`PrometheusObserver.attach`)."""

    def __init__(self) -> None:
        self.statistics: Callable[[], ReaperStatistics] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.statistics is None:
            return
        stats = self.statistics()
        engine = stats.engine

        def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter(
            "reapkit_events_total", "Events (pressure, memory, manual) the engine handled.",
            engine.events,
        )  # fmt: skip
        yield counter(
            "reapkit_decisions_total", "Decisions made (a rule's conditions held).",
            engine.decisions,
        )  # fmt: skip
        skipped = CounterMetricFamily(
            "reapkit_decisions_skipped_total",
            "Times a rule held but was not decided: a victim still dying (busy), the rule's "
            "cooldown, or its kill cap.",
            labels=["reason"],
        )
        for reason, value in (
            ("busy", engine.skipped_busy),
            ("cooldown", engine.skipped_cooldown),
            ("cap", engine.skipped_cap),
        ):
            skipped.add_metric([reason], value)
        yield skipped
        yield counter(
            "reapkit_plugin_failures_total", "Selector or action calls that raised or overran.",
            engine.plugin_failures,
        )  # fmt: skip
        yield counter(
            "reapkit_observer_failures_total", "Observer calls that raised or overran.",
            stats.observer_failures,
        )  # fmt: skip
        yield counter(
            "reapkit_event_failures_total", "Events whose handling raised (the reaper went on).",
            stats.event_failures,
        )  # fmt: skip
        yield counter(
            "reapkit_records_dropped_total", "KillRecords a slow records() subscriber missed.",
            stats.records_dropped,
        )  # fmt: skip
        if stats.reap is not None:
            yield from _reap_metrics(stats.reap)
        if stats.table is not None:
            yield GaugeMetricFamily(
                "reapkit_process_table_processes",
                "Processes in the live process table.",
                value=stats.table.processes,
            )
            yield counter(
                "reapkit_process_table_overruns_total",
                "Times the kernel dropped process events (the table then rescanned /proc).",
                stats.table.overruns,
            )


def _reap_metrics(reap: Any) -> Sequence[Metric]:
    results = CounterMetricFamily(
        "reapkit_reaps_total",
        "process_mrelease calls by result.",
        labels=["result"],
    )
    for result, value in (
        ("reaped", reap.reaped),
        ("already-freed", reap.already_freed),
        ("not-dying", reap.not_dying),
        ("failed", reap.failed),
        ("unsupported", reap.unsupported),
    ):
        results.add_metric([result], value)
    return (
        results,
        CounterMetricFamily(
            "reapkit_reap_busy_skips_total",
            "Reaps not started because every reaper thread was busy.",
            value=reap.busy_skips,
        ),
        GaugeMetricFamily("reapkit_reap_threads", "Reaper threads running.", value=reap.threads),
    )

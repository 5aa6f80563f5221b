"""The observer on its own: records and warnings in, the served exposition text out (scraped
over HTTP and parsed with prometheus-client's parser), the endpoint's lifecycle and options."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from prometheus_client.openmetrics import parser as openmetrics_parser
from reapkit import (
    KillRecord,
    KillWarning,
    PluginError,
    PluginRegistry,
    SelectorStep,
    Timeline,
    Victim,
    load_policy,
)
from reapkit.builtin import register_builtins
from reapkit.lowlevel import ProcFS
from reapkit.testing import make_options

from reapkit_prometheus import OUTCOMES, PrometheusObserver, PrometheusOptions

MiB = 1 << 20
EPOCH = 1_700_000_000.0


def _victim(pid: int = 4242) -> Victim:
    return Victim(
        pid=pid, start_time=1, comm="hog", cmdline="hog --eat", cgroup="/sandbox", uid=1000,
        rss=64 * MiB, swap=0, oom_score=900, oom_score_adj=0,
    )  # fmt: skip


def _record(
    rule: str,
    outcome: str,
    *,
    signal: float | None = None,
    memory_back: float | None = None,
    exit_seen: float | None = None,
    bytes_freed: int | None = None,
    candidates: int | None = 7,
    t0: float = 100.0,
) -> KillRecord:
    """A record whose steps happened ``signal`` etc. seconds after the trigger (t0)."""

    def at(offset: float | None) -> float | None:
        return None if offset is None else t0 + offset

    timeline = Timeline(
        trigger_seen=t0,
        victim_chosen=at(0.001) if signal is not None else None,
        signal_sent=at(signal),
        memory_back=at(memory_back),
        exit_seen=at(exit_seen),
    )
    selectors = (
        () if candidates is None else (SelectorStep("largest-rss", candidates, 1, 4242, ""),)
    )
    return KillRecord(
        rule=rule,
        outcome=outcome,
        reason="test",
        condition="manual: test",
        timeline=timeline,
        victim=_victim() if outcome != "no-candidate" else None,
        selectors=selectors,
        bytes_freed=bytes_freed,
        dry_run=outcome == "dry-run",
        epoch_offset=EPOCH,
    )


def _observer(**options: Any) -> PrometheusObserver:
    return PrometheusObserver(PrometheusOptions(port=0, **options))


async def test_records_are_counted_by_rule_and_outcome_and_their_timelines_timed(
    serving: Any, scrape: Any
) -> None:
    observer = _observer()
    await serving(observer)
    assert observer.port
    observer.on_record(
        _record("hogs", "killed", signal=0.004, memory_back=0.03, exit_seen=0.2,
                bytes_freed=64 * MiB, candidates=12)
    )  # fmt: skip
    observer.on_record(
        _record("hogs", "killed", signal=0.04, exit_seen=0.3, bytes_freed=32 * MiB, candidates=9)
    )
    observer.on_record(_record("hogs", "dry-run", signal=0.008, candidates=3, t0=200.0))
    observer.on_record(_record("idle", "no-candidate", candidates=0))
    observer.on_warning(KillWarning(150.0, "hogs", _victim(), "ending hog (4242)"))

    m = await scrape(observer.port)

    assert m.types["reapkit_kills"] == "counter"
    assert m("reapkit_kills_total", rule="hogs", outcome="killed") == 2
    assert m("reapkit_kills_total", rule="hogs", outcome="dry-run") == 1
    assert m("reapkit_kills_total", rule="idle", outcome="no-candidate") == 1
    assert m("reapkit_kills_total", rule="hogs", outcome="refused") is None  # rules unknown
    assert m("reapkit_bytes_freed_total", rule="hogs") == 96 * MiB
    assert m("reapkit_warnings_total", rule="hogs") == 1

    # trigger -> signal: 4 ms, 40 ms and (dry-run) 8 ms.
    assert m.types["reapkit_trigger_to_signal_seconds"] == "histogram"
    hist = "reapkit_trigger_to_signal_seconds"
    assert m(f"{hist}_count", rule="hogs") == 3
    assert m(f"{hist}_sum", rule="hogs") == pytest.approx(0.052)
    assert m(f"{hist}_bucket", rule="hogs", le="0.0025") == 0
    assert m(f"{hist}_bucket", rule="hogs", le="0.005") == 1
    assert m(f"{hist}_bucket", rule="hogs", le="0.01") == 2
    assert m(f"{hist}_bucket", rule="hogs", le="0.05") == 3
    assert m(f"{hist}_bucket", rule="hogs", le="+Inf") == 3
    # Phases are observed only when both their ends happened.
    assert m("reapkit_signal_to_memory_back_seconds_count", rule="hogs") == 1
    assert m("reapkit_signal_to_memory_back_seconds_sum", rule="hogs") == pytest.approx(0.026)
    assert m("reapkit_signal_to_exit_seconds_count", rule="hogs") == 2
    assert m("reapkit_signal_to_exit_seconds_bucket", rule="hogs", le="0.25") == 1
    assert m(f"{hist}_count", rule="idle") is None

    assert m("reapkit_decision_candidates_count", rule="hogs") == 3
    assert m("reapkit_decision_candidates_bucket", rule="hogs", le="10.0") == 2
    assert m("reapkit_last_decision_candidates", rule="hogs") == 3
    assert m("reapkit_last_decision_candidates", rule="idle") == 0
    assert m("reapkit_last_record_timestamp_seconds", rule="hogs") == EPOCH + 200.0
    assert m("reapkit_exporter_info", version=_version()) == 1


def _version() -> str:
    import reapkit_prometheus

    return reapkit_prometheus.__version__


async def test_counts_seen_by_one_scrape_grow_by_the_next(serving: Any, scrape: Any) -> None:
    observer = _observer()
    await serving(observer)
    assert (await scrape(observer.port))("reapkit_kills_total", rule="r", outcome="killed") is None
    for _ in range(3):
        observer.on_record(_record("r", "killed", signal=0.01, bytes_freed=MiB))
    m = await scrape(observer.port)
    assert m("reapkit_kills_total", rule="r", outcome="killed") == 3
    assert m("reapkit_bytes_freed_total", rule="r") == 3 * MiB


async def test_negative_or_unmeasured_bytes_freed_count_nothing(serving: Any, scrape: Any) -> None:
    observer = _observer()
    await serving(observer)
    observer.on_record(_record("r", "killed", signal=0.01, bytes_freed=-4096))
    observer.on_record(_record("r", "killed", signal=0.01, bytes_freed=None))
    m = await scrape(observer.port)
    assert m("reapkit_kills_total", rule="r", outcome="killed") == 2
    assert m("reapkit_bytes_freed_total", rule="r") in (None, 0)


def _fake_proc(root: Path, *, available_kb: int, pressure: str | None) -> ProcFS:
    (root / "meminfo").write_text(
        "MemTotal:        8000000 kB\nMemFree:          100000 kB\n"
        f"MemAvailable:    {available_kb:7d} kB\nSwapTotal:       1000000 kB\n"
        "SwapFree:         250000 kB\n"
    )
    if pressure is not None:
        (root / "pressure").mkdir(exist_ok=True)
        (root / "pressure" / "memory").write_text(pressure)
    return ProcFS(root)


_PRESSURE = (
    "some avg10=12.50 avg60=3.00 avg300=1.00 total=2500000\n"
    "full avg10=4.00 avg60=1.00 avg300=0.50 total=1000000\n"
)


async def test_memory_and_pressure_are_read_at_scrape_time(
    serving: Any, scrape: Any, tmp_path: Path
) -> None:
    procfs = _fake_proc(tmp_path, available_kb=400_000, pressure=_PRESSURE)
    observer = PrometheusObserver(PrometheusOptions(port=0), procfs=procfs)
    await serving(observer)
    m = await scrape(observer.port)
    assert m("reapkit_memory_available_bytes") == 400_000 * 1024
    assert m("reapkit_memory_total_bytes") == 8_000_000 * 1024
    assert m("reapkit_swap_free_bytes") == 250_000 * 1024
    assert m("reapkit_memory_pressure_avg10_ratio", kind="some") == pytest.approx(0.125)
    assert m("reapkit_memory_pressure_avg10_ratio", kind="full") == pytest.approx(0.04)
    assert m.types["reapkit_memory_pressure_stalled_seconds"] == "counter"
    assert m("reapkit_memory_pressure_stalled_seconds_total", kind="some") == 2.5
    assert m("reapkit_memory_pressure_stalled_seconds_total", kind="full") == 1.0

    _fake_proc(tmp_path, available_kb=100_000, pressure=_PRESSURE.replace("12.50", "60.00"))
    m = await scrape(observer.port)
    assert m("reapkit_memory_available_bytes") == 100_000 * 1024
    assert m("reapkit_memory_pressure_avg10_ratio", kind="some") == pytest.approx(0.6)


async def test_without_psi_the_pressure_metrics_are_left_out(
    serving: Any, scrape: Any, tmp_path: Path
) -> None:
    procfs = _fake_proc(tmp_path, available_kb=400_000, pressure=None)
    observer = PrometheusObserver(PrometheusOptions(port=0), procfs=procfs)
    await serving(observer)
    m = await scrape(observer.port)
    assert m("reapkit_memory_available_bytes") == 400_000 * 1024
    assert not {n for n in m.names() if "pressure" in n}


async def test_the_real_proc_is_read_by_default(serving: Any, scrape: Any) -> None:
    observer = _observer()
    await serving(observer)
    m = await scrape(observer.port)
    available = m("reapkit_memory_available_bytes")
    assert available is not None and 0 < available <= m("reapkit_memory_total_bytes")  # type: ignore[operator]
    if os.path.exists("/proc/pressure/memory"):
        some = m("reapkit_memory_pressure_avg10_ratio", kind="some")
        assert some is not None and 0 <= some <= 1


async def test_only_get_at_the_path_is_served(serving: Any, http_get: Any, scrape: Any) -> None:
    observer = _observer(path="/reapkit/metrics")
    url = await serving(observer)
    assert url == f"http://127.0.0.1:{observer.port}/reapkit/metrics"
    assert observer.url == url
    await scrape(observer.port, "/reapkit/metrics")
    status, _headers, body = await http_get(observer.port, "/metrics")
    assert status == 404 and b"/reapkit/metrics" in body
    status, headers, _body = await http_get(observer.port, "/reapkit/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET"


async def test_openmetrics_is_served_to_who_asks_for_it(serving: Any, http_get: Any) -> None:
    # What Prometheus asks for first.
    observer = _observer()
    await serving(observer)
    observer.on_record(_record("r", "killed", signal=0.01))
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = await http_get(observer.port, "/metrics", accept=accept)
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    samples = [
        sample
        for family in openmetrics_parser.text_string_to_metric_families(body.decode())
        for sample in family.samples
    ]  # the parser insists on the closing "# EOF"
    assert ("reapkit_kills_total", {"rule": "r", "outcome": "killed"}, 1.0) in [
        (s.name, s.labels, s.value) for s in samples
    ]


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_cancelling_closes_the_socket_and_frees_the_port(scrape: Any) -> None:
    fds = _fds()
    observer = _observer()
    async with trio.open_nursery() as nursery:
        await nursery.start(observer.serve)
        port = observer.port
        assert port is not None
        await scrape(port)
        nursery.cancel_scope.cancel()
    assert observer.port is None and observer.url is None
    assert _fds() == fds
    with pytest.raises(OSError, match=r"refused|connect"):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_a_taken_port_is_a_plain_error_naming_the_address() -> None:
    taken = trio.socket.socket()
    with taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        observer = PrometheusObserver(PrometheusOptions(port=port))
        async with trio.open_nursery() as nursery:
            with pytest.raises(
                OSError, match=rf"prometheus observer cannot listen on 127\.0\.0\.1:{port}"
            ):
                await nursery.start(observer.serve)
    assert observer.port is None


async def test_it_listens_on_ipv6_too(serving: Any, scrape: Any) -> None:
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("needs IPv6")
    observer = _observer(host="::1")
    url = await serving(observer)
    assert url == f"http://[::1]:{observer.port}/metrics"
    status, _headers, _body = await _get6(observer.port)
    assert status == 200


async def _get6(port: int) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("::1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := await stream.receive_some():
            raw += chunk
    return int(raw.split()[1]), {}, raw


async def test_attach_exports_the_reapers_counters_and_starts_each_rules_series_at_zero(
    serving: Any, scrape: Any
) -> None:
    engine = SimpleNamespace(
        events=11, decisions=5, kills=2, dry_runs=0, abandoned=1, refused=1, no_candidate=1,
        plugin_failures=1, skipped_busy=3, skipped_cooldown=4, skipped_cap=0,
    )  # fmt: skip
    reap = SimpleNamespace(
        threads=2, busy=0, reaped=1, already_freed=1, not_dying=0, failed=0, unsupported=0,
        busy_skips=0,
    )  # fmt: skip
    table = SimpleNamespace(
        processes=321, events_seen=1000, overruns=2, resyncs=2, mode="connector"
    )
    stats = SimpleNamespace(
        engine=engine, sources=(), table=table, reap=reap, records=5, records_dropped=0,
        observer_failures=1, event_failures=0, policy="<test>",
    )  # fmt: skip
    reaper = SimpleNamespace(
        policy=SimpleNamespace(rules=[SimpleNamespace(name="a"), SimpleNamespace(name="b")]),
        statistics=lambda: stats,
    )
    observer = _observer()
    observer.attach(reaper)  # type: ignore[arg-type]
    await serving(observer)
    m = await scrape(observer.port)
    for rule in ("a", "b"):
        for outcome in OUTCOMES:
            assert m("reapkit_kills_total", rule=rule, outcome=outcome) == 0
        assert m("reapkit_bytes_freed_total", rule=rule) == 0
        assert m("reapkit_warnings_total", rule=rule) == 0
    assert m("reapkit_events_total") == 11
    assert m("reapkit_decisions_total") == 5
    assert m("reapkit_decisions_skipped_total", reason="cooldown") == 4
    assert m("reapkit_decisions_skipped_total", reason="busy") == 3
    assert m("reapkit_plugin_failures_total") == 1
    assert m("reapkit_observer_failures_total") == 1
    assert m("reapkit_reaps_total", result="already-freed") == 1
    assert m("reapkit_reap_threads") == 2
    assert m("reapkit_process_table_processes") == 321
    assert m("reapkit_process_table_overruns_total") == 2
    engine.decisions = 6  # read at scrape time
    assert (await scrape(observer.port))("reapkit_decisions_total") == 6


def test_outcomes_are_reapkits() -> None:
    outcome = typing.get_type_hints(KillRecord)["outcome"]  # the Literal of every outcome
    assert set(OUTCOMES) == set(typing.get_args(outcome))


@pytest.mark.parametrize(
    ("table", "option"),
    [
        ({"port": "9877"}, "port"),
        ({"port": -1}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"path": "metrics"}, "path"),
        ({"host": 127}, "host"),
        ({"bind": "0.0.0.0:9877"}, "bind"),
    ],
)
def test_bad_options_are_refused_naming_the_option(table: dict[str, Any], option: str) -> None:
    with pytest.raises(PluginError) as info:
        make_options(PrometheusObserver, {"name": "prometheus", **table})
    assert info.value.option == option
    assert info.value.plugin == "prometheus"


def test_options_defaults_and_a_daemonset_table() -> None:
    assert make_options(PrometheusObserver, {}) == PrometheusOptions("127.0.0.1", 9877, "/metrics")
    options = make_options(PrometheusObserver, {"host": "0.0.0.0", "port": 9100})
    assert (options.host, options.port) == ("0.0.0.0", 9100)


def test_the_entry_point_registers_the_observer() -> None:
    registry = PluginRegistry()
    registry.load_entry_points()
    assert registry.get("observer", "prometheus") is PrometheusObserver
    (info,) = [p for p in registry.plugins() if p.name == "prometheus"]
    assert info.kind == "observer" and info.source == "reapkit-prometheus"
    assert info.options == ("host", "port", "path")


def test_the_readmes_policy_loads() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    registry = PluginRegistry()
    registry.register(PrometheusObserver)
    register_builtins(registry)
    policy = load_policy(text=snippet, registry=registry)
    (observer,) = policy.observers
    assert isinstance(observer, PrometheusObserver)
    assert observer.options == PrometheusOptions()

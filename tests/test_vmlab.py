"""The guest-kernel lab's own code, on the host: the head-to-head's report and its guards
(the guest runs themselves are ``make test-vm`` and ``make bench-vm``)."""

from __future__ import annotations

import json
from typing import Any

from tests.vmlab import bench, scenarios


def _run(contender: str, stall: float, **extra: Any) -> dict[str, Any]:
    return {
        "type": "run", "scenario": "leak", "contender": contender, "repeat": 0, "saved": True,
        "died": ["victim"], "signals": {"victim": 9}, "right_victim": True,
        "bystanders_intact": True, "onset_to_back_ms": 900.0, "worst_stall_ms": stall,
        "kernel_oom_kills": 0, **extra,
    }  # fmt: skip


def test_the_report_compares_medians_with_earlyoom_and_the_kernel() -> None:
    records = [
        {"type": "guest", "kernel": "6.1.0", "mem_total_mib": 1964, "cpus": 2},
        _run("kernel", 400.0, kernel_oom_kills=1),
        _run("earlyoom", 100.0),
        _run("reapkit-default", 40.0),
        {"type": "run", "scenario": "leak", "contender": "nohang", "repeat": 0,
         "error": "RuntimeError: not ready"},
    ]  # fmt: skip
    text = bench.report(records)
    assert text.startswith(bench.START) and text.endswith(bench.END)
    row = next(line for line in text.splitlines() if line.startswith("| reapkit-default |"))
    assert "| 0.40x | 0.10x |" in row
    assert "| 0/1 |" in next(line for line in text.splitlines() if line.startswith("| nohang"))
    assert "1 run(s) failed to start" in text
    assert "| leak | yes | 0.40x | met |" in text


def test_a_wrong_victim_misses_the_target_whatever_the_stall() -> None:
    records = [_run("earlyoom", 100.0), _run("reapkit-default", 1.0, right_victim=False)]
    assert "| leak | no | 0.01x | **missed** |" in bench.report(records)


def test_make_bench_keeps_the_guest_section() -> None:
    section = f"{bench.START}\n## guest\nfigures\n{bench.END}"
    old = "# Benchmarks\n\n## a\n\n" + section + "\n"
    assert bench.splice(old, section.replace("figures", "new")).count(bench.START) == 1
    assert "new" in bench.splice(old, section.replace("figures", "new"))
    assert bench.splice("# Benchmarks\n", section).endswith(section + "\n")


def test_the_report_is_written_from_saved_runs(tmp_path: Any, monkeypatch: Any) -> None:
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps(r) for r in [_run("earlyoom", 10.0)]) + "\n")
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n")
    monkeypatch.setattr(bench, "REPORT", report)
    monkeypatch.setattr(bench, "write_plot", lambda records: None)
    assert bench.main(["--from", str(runs)]) == 0
    assert "| earlyoom | 1/1 |" in report.read_text()


def test_the_scenarios_refuse_to_run_outside_a_guest(monkeypatch: Any) -> None:
    """They exhaust the machine's memory: never on the host."""
    monkeypatch.delenv("REAPKIT_IN_GUEST", raising=False)
    assert scenarios.main(["--repeats", "1"]) == 2


def test_runs_with_a_niced_heartbeat_are_reported_beside_the_main_ones() -> None:
    records = [
        _run("earlyoom", 100.0),
        _run("reapkit-default", 40.0),
        _run("earlyoom", 20.0, heartbeat_nice=-10),
        _run("reapkit-default", 5.0, heartbeat_nice=-10),
    ]
    text = bench.report(records)
    assert "| leak | yes | 0.40x | met |" in text  # the main table: nice 0 only
    assert "### The heartbeat at nice -10" in text
    assert "| leak | reapkit-default | 1 | 1/1 | 5 (5-5) | 0.25x |" in text
    assert bench.runs_file(-10).name == "vm-runs-nice-10.jsonl"

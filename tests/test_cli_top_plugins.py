"""``reapkit top`` and ``reapkit plugins``: the command as a subprocess, the pure parts
(rendering a snapshot, reading a records file) and the plugin listing in-process."""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from rich.console import Console

from reapkit._plugins import Candidate, PluginRegistry, Ranked, Selector
from reapkit._policy import load_policy
from reapkit._procfs import MemInfo, ProcFS
from reapkit._records import ActionStep, KillRecord, Timeline, Victim
from reapkit._sources.psi import PressureLine, PressureSnapshot
from reapkit.cli import _plugins, _top
from reapkit.testing import FakeProc

from .conftest import FakeEntryPoint

MiB = 1 << 20
GiB = 1 << 30


def reapkit(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    # A wide terminal, so that assertions do not depend on where rich wraps a line.
    env = {**os.environ, "COLUMNS": "200", **env}
    return subprocess.run(
        [sys.executable, "-m", "reapkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def _victim(pid: int, comm: str, rss: int) -> Victim:
    return Victim(
        pid=pid,
        start_time=12345,
        comm=comm,
        cmdline=f"/usr/bin/{comm} --big",
        cgroup="/user.slice",
        uid=1000,
        rss=rss,
        swap=0,
        oom_score=900,
        oom_score_adj=0,
    )


def _records() -> list[KillRecord]:
    killed = KillRecord(
        rule="low-memory",
        outcome="killed",
        reason="memory came back 41 ms after the trigger",
        condition="memory some 200ms/2s fired; mem_available below 5%",
        timeline=Timeline(
            trigger_seen=100.0,
            victim_chosen=100.0012,
            signal_sent=100.002,
            reap_started=100.0021,
            reap_finished=100.0403,
            memory_back=100.041,
            exit_seen=100.0452,
        ),
        victim=_victim(4242, "hog", 512 * MiB),
        actions=(ActionStep("kill", "sent SIGKILL", "", 100.002),),
        bytes_freed=498 * MiB,
        epoch_offset=1_700_000_000.0,
    )
    would_kill = KillRecord(
        rule="almost-no-memory",
        outcome="dry-run",
        reason="dry-run: nothing was signalled",
        condition="mem_available below 2%",
        timeline=Timeline(trigger_seen=200.0, victim_chosen=200.003, signal_sent=200.004),
        victim=_victim(4343, "chrome", GiB),
        dry_run=True,
        epoch_offset=1_700_000_000.0,
    )
    return [killed, would_kill]


def _no_candidate() -> KillRecord:
    return KillRecord(
        rule="low-memory",
        outcome="no-candidate",
        reason="no process in scope could be chosen",
        condition="mem_available below 5%",
        timeline=Timeline(trigger_seen=300.0),
        epoch_offset=1_700_000_000.0,
    )


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# -- reapkit top, as a subprocess ----------------------------------------------------------------


def test_top_once_renders_one_frame() -> None:
    done = reapkit("top", "--once")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    out = done.stdout
    assert "pressure" in out and "MemAvailable" in out
    for rule in load_policy(None, dry_run=True).rules:
        assert f"rule {rule.name}" in out
    assert "no records file" in out


def test_top_once_shows_the_kills_of_a_records_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(r.to_json_line() + "\n" for r in _records()))
    done = reapkit("top", "--once", "--records", str(path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "low-memory  killed  hog (pid 4242, rss 512 MiB)  freed 498 MiB" in out
    assert (
        "chosen +1.2 ms → signal +2.0 ms → reap +2.1 ms → reaped +40 ms → memory-back +41 ms"
        " → exit +45 ms" in out
    )
    assert "almost-no-memory  dry-run  chrome (pid 4343, rss 1.0 GiB)  (nothing signalled)" in out
    assert "chosen +3.0 ms → signal +4.0 ms" in out
    assert "no kills yet" not in out


def test_top_skips_malformed_records_lines(tmp_path: Path) -> None:
    good = _records()
    path = tmp_path / "records.jsonl"
    with path.open("wb") as f:
        f.write(b"{not json\n")
        f.write(good[0].to_json_line().encode() + b"\n")
        f.write(b"[1, 2, 3]\n")  # JSON, but not a record
        f.write(b'{"rule": 5, "outcome": "killed"}\n')  # a record's keys, wrong types
        f.write(b"\xff\xfe binary \x00 garbage\n")
        f.write(_no_candidate().to_json_line().encode() + b"\n")
        f.write(good[1].to_json_line().encode() + b"\n")
        f.write(b'{"rule": "half-writ')  # being written: no newline yet
    done = reapkit("top", "--once", "--records", str(path))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "hog (pid 4242" in done.stdout and "chrome (pid 4343" in done.stdout
    assert "4 malformed lines skipped" in done.stdout
    assert "also: 1 no-candidate (of the last 3 records)" in done.stdout


def test_top_without_kills_says_so(tmp_path: Path) -> None:
    missing = reapkit("top", "--once", "--records", str(tmp_path / "not-yet.jsonl"))
    assert missing.returncode == 0, missing.stderr
    assert "no kills yet (no such file yet)" in missing.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = reapkit("top", "--once", "--records", str(empty))
    assert done.returncode == 0, done.stderr
    assert "no kills yet" in done.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--interval", "0"), "--interval must be within 0.1..3600 seconds, got 0"),
        (("--interval", "-1"), "--interval must be within"),
        (("--interval", "nan"), "--interval must be within"),
        (("--interval", "soon"), "invalid float value: 'soon'"),
        (("--bogus",), "unrecognized arguments: --bogus"),
        (("/nonexistent/policy.toml", "--once"), "invalid policy: /nonexistent/policy.toml"),
    ],
)
def test_top_bad_arguments_exit_2_with_one_line(args: tuple[str, ...], says: str) -> None:
    done = reapkit("top", *args)
    assert done.returncode == 2
    line = _one_error_line(done)
    assert line.startswith("reapkit") and says in line, line
    assert done.stdout == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_top_refreshes_until_interrupted(sig: signal.Signals) -> None:
    # stdout is a pipe, not a terminal: top prints one frame after another (as `top -b`).
    with subprocess.Popen(
        [sys.executable, "-m", "reapkit.cli", "top", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
        start_new_session=True,
    ) as proc:  # closes the pipes and waits, also when an assertion fails
        try:
            assert proc.stdout is not None
            seen = b""
            deadline = time.monotonic() + 30
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while seen.count(b"MemAvailable") < 2 and time.monotonic() < deadline:
                    if sel.select(timeout=0.5):
                        chunk = os.read(proc.stdout.fileno(), 65536)
                        if not chunk:
                            break
                        seen += chunk
            assert seen.count(b"MemAvailable") >= 2, seen.decode(errors="replace")
            proc.send_signal(sig)
            _out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines() == ["reapkit top: interrupted"]


# -- reapkit plugins, as a subprocess ------------------------------------------------------------

BUILTINS = {
    "oom-score": "selector",
    "protect": "selector",
    "largest-rss": "selector",
    "terminate": "action",
    "kill": "action",
    "reap": "action",
}


def test_plugins_lists_the_builtins_with_their_kinds() -> None:
    done = reapkit("plugins")
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in re.split(r"[│┃|]", line)] for line in done.stdout.splitlines()]
    for name, kind in BUILTINS.items():
        assert any(name in row and kind in row and "built-in" in row for row in rows), name
    assert "grace=2.0" in done.stdout  # an option with its default
    assert "command (required)" in done.stdout  # an option without one


def test_plugins_json_is_an_array_of_plugins() -> None:
    done = reapkit("plugins", "--json")
    assert done.returncode == 0, done.stderr
    plugins = json.loads(done.stdout)
    assert isinstance(plugins, list)
    by_name = {p["name"]: p for p in plugins}
    for name, kind in BUILTINS.items():
        assert by_name[name]["kind"] == kind
        assert by_name[name]["source"] == "built-in"
        assert by_name[name]["error"] is None
    for p in plugins:
        assert set(p) == {"name", "kind", "source", "options", "object", "summary", "error"}
    grace = by_name["terminate"]["options"][0]
    assert grace == {"name": "grace", "type": "float", "required": False, "default": 2.0}
    command = by_name["prekill-hook"]["options"][0]
    assert command["name"] == "command" and command["required"] is True
    assert by_name["oom-score"]["object"] == "reapkit.builtin.selectors:OomScore"


# -- reapkit plugins, in-process: a broken entry point -------------------------------------------


class FromEntryPoint(Selector):
    """A selector a third-party distribution supplies."""

    name: ClassVar[str] = "third-party"

    def select(self, situation: Any, candidates: Any) -> Any:
        return candidates


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        FakeEntryPoint("third-party", FromEntryPoint, "reapkit-good"),
        FakeEntryPoint("broken", ImportError("no module named kaboom"), "reapkit-broken"),
        FakeEntryPoint("not-a-plugin", object, "reapkit-odd"),
    ]

    def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
        assert group == "reapkit.plugins"
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)


@pytest.mark.usefixtures("entry_points")
def test_a_broken_entry_point_is_listed_and_the_others_still_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = _plugins.run(argparse.Namespace(json=True), registry=PluginRegistry())
    assert status == 0
    by_name = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert by_name["broken"]["error"] == "ImportError: no module named kaboom"
    assert by_name["broken"]["source"] == "reapkit-broken"
    assert "not a subclass" in by_name["not-a-plugin"]["error"]
    good = by_name["third-party"]
    assert (good["kind"], good["source"], good["error"]) == ("selector", "reapkit-good", None)
    assert good["summary"] == "A selector a third-party distribution supplies."
    for name, kind in BUILTINS.items():
        assert by_name[name]["kind"] == kind and by_name[name]["error"] is None


@pytest.mark.usefixtures("entry_points")
def test_the_plugin_table_shows_the_error() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    status = _plugins.run(
        argparse.Namespace(json=False), registry=PluginRegistry(), console=console
    )
    assert status == 0
    text = out.getvalue()
    assert "failed to load: ImportError: no module named kaboom" in text
    assert "2 plugins failed to load; the others are usable." in text
    assert "third-party" in text and "reapkit-good" in text and "oom-score" in text


def test_a_broken_entry_point_is_listed_once(tmp_path: Path) -> None:
    # The command's own registry (the default one) had the group loaded twice: the broken
    # plugin came twice in the table, in --json and in the warnings.
    dist = tmp_path / "reapkit_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: reapkit-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[reapkit.plugins]\nbroken = reapkit_no_such:Plugin\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    listed = reapkit("plugins", "--json", PYTHONPATH=path)
    assert listed.returncode == 0, listed.stderr
    broken = [p for p in json.loads(listed.stdout) if p["name"] == "broken"]
    assert [(p["source"], p["error"]) for p in broken] == [
        ("reapkit-broken", "ModuleNotFoundError: No module named 'reapkit_no_such'")
    ]
    assert listed.stderr.count("plugin broken from reapkit-broken failed to load") == 1
    table = reapkit("plugins", PYTHONPATH=path)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("reapkit-broken") == 1
    assert "1 plugin failed to load; the others are usable." in table.stdout


# -- top's pure parts ----------------------------------------------------------------------------


def _snapshot(**changes: Any) -> _top.Snapshot:
    hog = Candidate(pid=42, start_time=1, comm="hog", ppid=1, state="R", rss=3 * GiB, oom_score=800)
    sshd = Candidate(pid=7, start_time=1, comm="sshd", ppid=1, state="S", rss=8 * MiB, oom_score=5)
    me = Candidate(pid=99, start_time=1, comm="reapkit", ppid=1, state="R", rss=MiB, oom_score=900)
    rule = _top.RuleView(
        "low-memory",
        (
            _top.ConditionView("memory some 200ms/2s (/proc/pressure/memory)", "trigger"),
            _top.ConditionView("mem_available below 5%", "does not hold", "2048 MiB vs 410 MiB"),
        ),
        candidates=(
            Ranked(me, 900, "oom_score 900 (highest of 3)"),
            Ranked(hog, 800, "oom_score 800 (#2 of 3)"),
            Ranked(sshd, 5.5, "oom_score 5 (#3 of 3)"),
        ),
        chosen=42,
        ranked=3,
        in_scope=4,
        notes=("guard: 99: reaper-itself",),
    )
    kills = tuple(_top.parse_record(r.to_json_line()) for r in _records())
    values: dict[str, Any] = {
        "taken_at": 1_700_000_100.0,
        "policy": "/etc/reapkit/policy.toml",
        "interval": 2.0,
        "pressure": PressureSnapshot(
            PressureLine(12.5, 3.0, 1.0, 123456), PressureLine(4.0, 1.0, 0.5, 65432)
        ),
        "pressure_error": None,
        "some_history": (0.0, 5.0, 12.5, 25.0),
        "full_history": (0.0, 0.0, 4.0),
        "meminfo": MemInfo(
            total=8 * GiB,
            free=GiB,
            available=2 * GiB,
            buffers=0,
            cached=0,
            swap_total=GiB,
            swap_free=512 * MiB,
        ),
        "meminfo_error": None,
        "rules": (rule,),
        "records": _top.RecordsView(
            "/var/log/reapkit.jsonl",
            kills=kills,
            others=(("no-candidate", 1),),
            read=3,
            malformed=2,
        ),
    }
    values.update(changes)
    return _top.Snapshot(**values)


def _text(snapshot: _top.Snapshot, width: int = 160) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(_top.render(snapshot))
    return out.getvalue()


def test_render_shows_every_part_of_a_snapshot() -> None:
    text = _text(_snapshot())
    assert "reapkit top — /etc/reapkit/policy.toml" in text and "every 2 s" in text
    assert "pressure some avg10  12.50%  ▁▂▅█" in text  # the scale is the peak: 25%
    assert "pressure full avg10   4.00%  ▁▁▂" in text
    assert "the last 4 of up to 60 samples" in text
    assert "MemAvailable 2.0 GiB of 8.0 GiB (25%)   SwapFree 512 MiB of 1.0 GiB" in text
    assert "rule low-memory: would choose hog (pid 42) of 3 ranked, 4 in scope" in text
    assert "memory some 200ms/2s (/proc/pressure/memory): a PSI trigger" in text
    assert "mem_available below 5%: does not hold (2048 MiB vs 410 MiB)" in text
    rows = {m[1]: m.string for line in text.splitlines() if (m := re.match(r"^▶?\s*(\d+)\s", line))}
    assert rows["42"].startswith("▶") and "3.0 GiB" in rows["42"] and "800" in rows["42"]
    assert "oom_score 800 (#2 of 3)" in rows["42"]
    assert not rows["99"].startswith("▶") and "5.50" in rows["7"]
    assert "guard: 99: reaper-itself" in text
    assert "recent kills (/var/log/reapkit.jsonl)" in text
    assert "low-memory  killed  hog (pid 4242, rss 512 MiB)  freed 498 MiB" in text
    assert "reaped +40 ms → memory-back +41 ms → exit +45 ms" in text
    assert "also: 1 no-candidate (of the last 3 records); 2 malformed lines skipped" in text
    # Pure: the same snapshot renders the same frame.
    assert _text(_snapshot()) == text


def test_render_says_what_it_could_not_read() -> None:
    broken_rule = _top.RuleView(
        "almost-no-memory",
        (_top.ConditionView("mem_available below 2%", "unknown"),),
        error="AccessDenied: /proc/1/stat",
    )
    empty_rule = _top.RuleView("manual", (), ranked=0, in_scope=0)
    text = _text(
        _snapshot(
            pressure=None,
            pressure_error="PSI is not available here (/proc/pressure/memory does not exist)",
            some_history=(),
            full_history=(),
            meminfo=None,
            meminfo_error="/proc/meminfo: permission denied",
            rules=(broken_rule, empty_rule),
            records=_top.RecordsView("/run/records.jsonl", missing=True),
        )
    )
    assert "memory pressure: PSI is not available here" in text
    assert "MemAvailable: /proc/meminfo: permission denied" in text
    assert "rule almost-no-memory: preview failed: AccessDenied: /proc/1/stat" in text
    assert "mem_available below 2%: unknown" in text
    assert "rule manual: no candidate (0 ranked of 0 in scope)" in text
    assert "only when triggered by hand" in text
    assert "no kills yet (no such file yet)" in text


def test_render_keeps_hostile_names_on_one_line() -> None:
    evil = Candidate(
        pid=5, start_time=1, comm="a\nb) Z [red]", ppid=1, state="R", rss=0, oom_score=1
    )
    rule = _top.RuleView("r", (), candidates=(Ranked(evil, 1, "x"),), chosen=5, ranked=1)
    text = _text(_snapshot(rules=(rule,)))
    assert "a\ufffdb) Z [red]" in text


def test_sparkline() -> None:
    assert _top.sparkline([0, 0.5, 1, 2, -1, math.nan], 1.0) == "▁▅██▁▁"
    assert _top.sparkline([], 1.0) == ""
    assert _top.sparkline([3.0], 0.0) == "▁"


def test_parse_record_reads_what_to_json_line_writes() -> None:
    killed, would_kill = _records()
    view = _top.parse_record(killed.to_json_line())
    assert (view.rule, view.outcome, view.comm, view.pid, view.rss) == (
        "low-memory",
        "killed",
        "hog",
        4242,
        512 * MiB,
    )
    assert view.time == pytest.approx(1_700_000_100.0)
    assert view.bytes_freed == 498 * MiB
    assert [name for name, _ms in view.steps] == [
        "victim_chosen",
        "signal_sent",
        "reap_started",
        "reap_finished",
        "memory_back",
        "exit_seen",
    ]
    assert dict(view.steps)["memory_back"] == pytest.approx(41.0)
    dry = _top.parse_record(would_kill.to_json_line())
    assert dry.bytes_freed is None and len(dry.steps) == 2
    # Without ``timeline_ms`` (another writer), the steps come from the timeline.
    data = json.loads(killed.to_json_line())
    del data["timeline_ms"]
    assert _top.parse_record(json.dumps(data)).steps == view.steps
    for bad in ("{", "[]", '{"rule": "r"}', '{"rule": "r", "outcome": 1, "timeline_ms": {}}'):
        with pytest.raises((ValueError, TypeError, KeyError)):
            _top.parse_record(bad)


def test_read_records_reads_only_the_end(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    lines = [r.to_json_line() for r in _records()] * 20  # 40 records
    path.write_text("".join(line + "\n" for line in lines))
    # The end of the third-last line, then the last two whole lines.
    tail = 5 + len(lines[-2]) + 1 + len(lines[-1]) + 1
    view = _top.read_records(str(path), limit=5, tail_bytes=tail)
    assert (view.read, view.malformed) == (2, 0)  # the fragment is not counted as malformed
    assert [k.comm for k in view.kills] == ["hog", "chrome"]
    everything = _top.read_records(str(path), limit=5)
    assert everything.read == 40 and len(everything.kills) == 5
    assert everything.kills[-1].comm == "chrome"
    assert _top.read_records(str(path), limit=0).kills == ()
    assert _top.read_records(str(tmp_path / "nope")).missing
    assert "cannot read" in (_top.read_records(str(tmp_path)).error or "")


# -- top's collector, on a fake /proc ------------------------------------------------------------

POLICY = """
[[rule]]
name = "fake-low-memory"
when = ["mem_available < 5%"]
scope = "system"
select = ["oom-score"]
actions = ["kill"]
"""


def _pressure(some: float, full: float) -> str:
    return (
        f"some avg10={some:.2f} avg60=0.00 avg300=0.00 total=1000\n"
        f"full avg10={full:.2f} avg60=0.00 avg300=0.00 total=500\n"
    )


def test_collector_reads_a_fake_proc(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path / "proc")
    fake.set_meminfo(total=16 * GiB, available=400 * MiB, swap_total=2 * GiB, swap_free=GiB)
    fake.add_process(1, comm="init")
    fake.add_process(600, comm="browser", rss=3 * GiB, oom_score=700, start_time=6000)
    fake.add_process(700, comm="editor", rss=500 * MiB, oom_score=120)
    fake.write("pressure/memory", _pressure(1.5, 0.5))
    records = tmp_path / "records.jsonl"
    procfs = ProcFS(fake.root)
    policy = load_policy(text=POLICY, dry_run=True, procfs=procfs)
    collector = _top.Collector(policy, records_path=str(records), procfs=procfs)

    first = trio.run(collector.collect)
    assert first.pressure is not None and first.pressure.some.avg10 == 1.5
    assert first.meminfo is not None and first.meminfo.available == 400 * MiB
    (rule,) = first.rules
    assert rule.name == "fake-low-memory" and rule.error is None
    assert rule.chosen == 600
    assert [r.candidate.comm for r in rule.candidates] == ["browser", "editor", "init"]
    assert rule.conditions[0].state == "holds"
    assert first.records.missing

    fake.write("pressure/memory", _pressure(30.0, 12.0))
    records.write_text(_records()[0].to_json_line() + "\n")
    second = trio.run(collector.collect)
    assert second.some_history == (1.5, 30.0) and second.full_history == (0.5, 12.0)
    assert [k.comm for k in second.records.kills] == ["hog"]
    text = _text(second)
    assert "would choose browser (pid 600)" in text and "mem_available below 5%: holds" in text

    os.unlink(os.path.join(fake.root, "pressure/memory"))
    third = trio.run(collector.collect)
    assert third.pressure is None and "PSI is not available" in (third.pressure_error or "")
    assert third.some_history == (1.5, 30.0)

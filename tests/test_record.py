"""``reapkit record`` and ``reapkit run --trace`` on the real kernel: what a trace holds of
processes this test started, its mode, its errors. Nothing here kills but the test's own
children (through their Popen) and, in the daemon test, a hog in a memory cgroup the test made,
by a policy scoped to it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from reapkit._recorder import Recorder
from reapkit._replay import replay_trace
from reapkit._trace import TraceWriter, read_trace
from reapkit.testing import SandboxCgroup

from .conftest import MiB, Spawn
from .test_docs_snippets import _wait_for_trace
from .test_run import _policy, _start, _wait_for_line, fill, small_tmpfs


def _record(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reapkit.cli", "record", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_record_writes_a_private_trace_of_our_child(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn(["sleep", "600"])
    out = tmp_path / "t.trace"
    done = _record("--out", str(out), "--duration", "1.5s")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    trace = read_trace(str(out))
    assert not trace.truncated and trace.header["version"] == 1
    ours = [r for r in trace.records if r["k"] == "proc" and r["pid"] == child.pid]
    assert ours and ours[0]["cmdline"] == ["sleep", "600"] and ours[0]["comm"] == "sleep"
    assert {"mem", "proc"} <= {r["k"] for r in trace.records}
    hidden = tmp_path / "no-cmdline.trace"
    assert _record("--out", str(hidden), "--duration", "1s", "--no-cmdline").returncode == 0
    records = read_trace(str(hidden)).records
    assert not any("cmdline" in r for r in records)
    assert not read_trace(str(hidden)).header["cmdline"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_record_stops_on_a_signal_with_status_0_and_an_end(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "t.trace"
    recorder = subprocess.Popen(
        [sys.executable, "-m", "reapkit.cli", "record", "--out", str(out)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_trace(out)
        recorder.send_signal(signum)  # our own child, through its Popen
        _out, err = recorder.communicate(timeout=30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    assert recorder.returncode == 0, err
    assert not read_trace(str(out)).truncated  # its end record is there


def test_the_recorder_sees_our_child_exit(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn(["sleep", "600"])
    recorder = Recorder(TraceWriter(str(tmp_path / "t.trace")))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            await trio.sleep(0.5)
            child.kill()  # our own child, by its Popen
            await trio.to_thread.run_sync(child.wait)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    trio.run(main)
    exits = [r for r in read_trace(str(tmp_path / "t.trace")).records if r["k"] == "exit"]
    assert any(r["pid"] == child.pid for r in exits)


def test_record_refuses_a_path_it_cannot_create(tmp_path: Path) -> None:
    done = _record("--out", str(tmp_path / "no" / "such" / "dir.trace"), "--duration", "1s")
    assert done.returncode == 2
    assert "no/such/dir.trace" in done.stderr and "Traceback" not in done.stderr


def test_record_on_a_full_filesystem_exits_1_and_says_so(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small") as small:
        fill(small)
        done = _record("--out", str(small / "t.trace"), "--duration", "3s")
        assert done.returncode == 1, done.stderr
        assert "stopped early" in done.stderr and "No space left" in done.stderr
        assert "Traceback" not in done.stderr


def test_replay_of_a_malformed_or_cut_trace_is_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"\x1f\x8b\x08 certainly not a trace")
    done = subprocess.run(
        [sys.executable, "-m", "reapkit.cli", "replay", "/dev/null", str(bad)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_run_with_a_trace_records_its_kill_and_replay_agrees(
    commands: list[subprocess.Popen[str]],
    memory_cgroup: SandboxCgroup,
    spawn: Spawn,
    tmp_path: Path,
) -> None:
    memory_cgroup.set_memory_limit(256 * MiB)
    policy = _policy(tmp_path / "p.toml", memory_cgroup, when='"cgroup_usage > 50%"')
    trace_path = tmp_path / "run.trace"
    p = _start(commands, str(policy), "--trace", str(trace_path), "--trace-window", "60s")
    _wait_for_line(p, "running:")
    hog_command = [sys.executable, "-m", "reapkit._testing._hog", str(180 * MiB)]
    hog = spawn(hog_command, cgroups=[memory_cgroup])
    assert hog.wait(30) == -signal.SIGKILL
    _wait_for_line(p, "rule sandbox: killed")
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    trace = read_trace(str(trace_path))
    assert not trace.truncated
    kills = [r["record"] for r in trace.records if r["k"] == "kill"]
    assert [k["victim"]["pid"] for k in kills] == [hog.pid]
    cgroups = [r for r in trace.records if r["k"] == "cgroup"]
    assert cgroups and all(r["path"] == memory_cgroup.directory for r in cgroups)
    # The same policy over its own night: it chooses the same hog, which the trace shows dying.
    # (The daemon's trace samples as densely near the line as its own sampler: the crossing
    # that made it kill is in the trace.)
    (first, *_rest) = replay_trace(str(policy), trace).decisions
    assert first.record.victim is not None and first.record.victim.pid == hog.pid
    assert first.happened is True and not first.counterfactual
    assert json.dumps(first.as_json())

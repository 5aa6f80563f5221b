"""The ``reapkit`` command, run as a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reapkit._version import __version__
from reapkit.cli import _main
from reapkit.lowlevel import cgroup_mounts, mount_for
from reapkit.testing import SandboxCgroup

from .conftest import DOCTOR_JSON_KEYS, Spawn, need, require_root


def reapkit(
    *args: str, user: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "reapkit.cli", *args]
    if user is not None:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            need("setpriv(1) (util-linux) to run as another user")
        uid = pwd.getpwnam(user).pw_uid
        argv = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def test_doctor_json_has_the_documented_keys() -> None:
    done = reapkit("doctor", "--json")
    doc = json.loads(done.stdout)
    assert set(doc) >= DOCTOR_JSON_KEYS
    assert done.returncode == (0 if doc["can_reap"] else 1)
    assert doc["pidfd"] is True


def test_doctor_table_is_readable() -> None:
    done = reapkit("doctor")
    assert "process_mrelease" in done.stdout and "A reaper can" in done.stdout


@pytest.mark.parametrize(
    "args",
    [("bogus",), ("doctor", "--nope"), ("demo", "--size-mib", "1"), ("demo", "--bound", "x")],
)
def test_bad_arguments_exit_2_with_one_line(args: tuple[str, ...]) -> None:
    done = reapkit(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def _parsed(*argv: str) -> argparse.Namespace:
    return _main._build_parser().parse_args(argv)


@pytest.mark.parametrize("command", list(_main.COMMANDS))
def test_global_options_go_before_or_after_the_command(command: str) -> None:
    rest = {
        "probe": ["/run/reapkit/heartbeat"],
        "record": ["--out", "t.trace"],
        "replay": ["policy.toml", "t.trace"],
    }.get(command, [])
    assert _parsed(command, *rest).verbose is False
    assert _parsed("-v", command, *rest).verbose is True
    assert _parsed(command, "-v", *rest).verbose is True
    assert _parsed(command, *rest, "--verbose").verbose is True


@pytest.mark.parametrize(
    "args", [("-V",), ("--version",), ("check", "-V"), ("run", "--version"), ("-v", "top", "-V")]
)
def test_capital_v_is_the_version_anywhere(args: tuple[str, ...]) -> None:
    done = reapkit(*args)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"reapkit {__version__}\n", "")


def test_verbose_after_the_command_is_accepted(tmp_path: Path) -> None:
    # `reapkit run -v ...`, as docs/operations.md shows it, was refused ("unrecognized
    # arguments: -v"); `check POLICY -v` now does what `-v check POLICY` does.
    path = tmp_path / "policy.toml"
    path.write_text('[[rule]]\nname = "x"\nscope = "system"\nactions = ["kill"]\n')
    after, before = reapkit("check", str(path), "-v"), reapkit("-v", "check", str(path))
    assert after.returncode == before.returncode == 0, after.stderr
    assert (after.stdout, after.stderr) == (before.stdout, before.stderr)


def test_demo_help_describes_both_shows() -> None:
    done = reapkit("demo", "--help")
    assert done.returncode == 0, done.stderr
    assert "(1) pipeline:" in done.stdout and "(2) stuck victim:" in done.stdout
    for scenario in ("kill-only", "mrelease"):  # the names its results carry
        assert f"({scenario})" in done.stdout
    listing = " ".join(reapkit("--help").stdout.split())  # as one line, however it wraps
    assert "ending a leak under real memory pressure, and a stuck victim's memory" in listing


def test_demo_json_shape() -> None:
    require_root()
    done = reapkit("demo", "--json", "--size-mib", "96", "--bound", "0.5")
    assert done.returncode == 0, done.stderr
    scenarios = json.loads(done.stdout)
    assert [s["scenario"] for s in scenarios] == ["pipeline", "kill-only", "mrelease"]
    for s in scenarios:
        assert set(s) >= {"scenario", "victim_rss_bytes", "freed_bytes", "ms_to_memory_back"}
    if any(s["skipped"] for s in scenarios):
        need("what the demo needs", str(scenarios))
    pipeline, alone, reaped = scenarios
    (record,) = pipeline["records"]  # the KillRecord, through the real pipeline
    assert record["outcome"] == "killed" and record["rule"] == "demo"
    assert [a["action"] for a in record["actions"]] == ["kill", "reap"]
    assert record["timeline_ms"]["memory_back"] is not None
    assert pipeline["freed_bytes"] >= 256 * (1 << 20)
    assert alone["ms_to_memory_back"] is None  # stuck in D: nothing back within the bound
    assert reaped["ms_to_memory_back"] is not None
    assert reaped["freed_bytes"] >= 0.9 * 96 * (1 << 20)
    assert not [d for d in os.listdir("/sys/fs/cgroup/memory") if d.startswith("reapkit-demo")]


def test_demo_without_root_names_what_is_missing() -> None:
    require_root()  # to switch to an unprivileged user
    done = reapkit("demo", user="nobody")
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip("the unprivileged user cannot read this checkout's .venv")
    assert done.returncode == 3
    assert "root" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_demo_interrupted_while_the_victim_is_frozen_cleans_up(sig: signal.Signals) -> None:
    require_root()
    freezer = Path("/sys/fs/cgroup/freezer")
    if not freezer.is_dir():
        need("the cgroup v1 freezer")
    demo = subprocess.Popen(
        [sys.executable, "-m", "reapkit.cli", "demo", "--size-mib", "64", "--bound", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(
            (d / "freezer.state").read_text().strip() == "FROZEN"
            for d in freezer.glob(f"reapkit-demo-{demo.pid}-*")
        ):
            assert time.monotonic() < deadline, "the demo never froze its victim"
            assert demo.poll() is None, demo.stderr.read() if demo.stderr else ""
            time.sleep(0.01)
        demo.send_signal(sig)
        assert demo.wait(20) == 130
        assert demo.stderr is not None
        assert demo.stderr.read().strip().splitlines()[-1] == "reapkit demo: interrupted"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if demo.stderr is not None:
            demo.stderr.close()
    left = [
        p.name
        for c in ("memory", "freezer")
        for p in Path("/sys/fs/cgroup", c).glob(f"reapkit-demo-{demo.pid}-*")
    ]
    assert left == []


def test_demo_removes_what_a_killed_demo_left_behind() -> None:
    require_root()
    memory = mount_for("memory", cgroup_mounts())
    assert memory is not None
    # What `kill -9` of a demo leaves: a sandbox named after a PID that no longer exists.
    child = subprocess.Popen(["true"])
    child.wait()
    stale = Path(memory.mountpoint, f"reapkit-demo-{child.pid}-0123abcd")
    stale.mkdir()
    try:
        done = reapkit("demo", "--json", "--size-mib", "32", "--bound", "0.2")
        assert done.returncode == 0, done.stderr
        assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()


#: ``reapkit`` as installed without the cli extra: rich cannot be imported.
_WITHOUT_RICH = (
    "import sys; sys.modules['rich'] = None; from reapkit.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


def reapkit_without_rich(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_RICH, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("args", [("top", "--once"), ("demo",), ("plugins",)])
def test_an_interactive_command_without_rich_names_the_extra(args: tuple[str, ...]) -> None:
    done = reapkit_without_rich(*args)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"'reapkit {args[0]}' needs it" in lines[0]
    assert "pip install 'reapkit[cli]'" in lines[0]
    assert ("--json" in lines[0]) == (args[0] == "plugins")


def test_without_rich_the_other_commands_work() -> None:
    done = reapkit_without_rich("plugins", "--json")
    assert done.returncode == 0, done.stderr
    assert {"kill", "oom-score"} <= {p["name"] for p in json.loads(done.stdout)}
    done = reapkit_without_rich("check")
    assert done.returncode == 0, done.stderr
    done = reapkit_without_rich("--help")
    assert done.returncode == 0, done.stderr
    listing = " ".join(done.stdout.split())  # however argparse wraps it
    assert "top (needs the extra reapkit[cli], not installed here)" in listing
    assert "doctor check what this kernel" in listing


def test_check_the_default_policy() -> None:
    done = reapkit("check")
    assert done.returncode == 0, done.stderr
    assert "<default policy>: valid" in done.stdout
    assert "rule 'low-memory'" in done.stdout and "oom-score" in done.stdout


def test_check_an_invalid_policy_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[[rule]]\nname = "x"\nscope = "system"\nactions = ["kill"]\ncooldown = "soon"\n'
    )
    done = reapkit("check", str(path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"reapkit check: invalid policy: {path}: rule[0].cooldown: 'soon' is not a duration:"
        " expected a number and a unit of us, ms, s, m, h (e.g. '150ms', '2s')"
    ]


def test_check_now_shows_the_choice_and_kills_nothing(
    spawn: Spawn, memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    path = tmp_path / "policy.toml"
    path.write_text(
        f'[[rule]]\nname = "sandbox"\nscope = {{ cgroup = "{memory_cgroup.directory}" }}\n'
        'select = ["largest-rss"]\nactions = ["kill"]\n'
    )
    done = reapkit("check", str(path), "--now")
    assert done.returncode == 0, done.stderr
    assert f"sandbox: would choose 'sleep' (pid {victim.pid}" in done.stdout
    assert victim.poll() is None

"""The daemon's life cycle at its edges: a SIGHUP while it starts, hooks that outlive it, the
heartbeat a liveness probe reads. ``reapkit run`` as a subprocess on sandbox policies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from reapkit._sandbox import SandboxCgroup

#: The console script, as systemd and the DaemonSet start it.
REAPKIT = Path(sys.executable).with_name("reapkit")


def _policy(path: Path, cgroup: SandboxCgroup, actions: str = '"kill"') -> Path:
    path.write_text(
        f'[[rule]]\nname = "sandbox"\ncgroup = "{cgroup.directory}"\n'
        'when = ["cgroup_usage > 50%"]\n'
        f'scope = {{ cgroup = "{cgroup.directory}" }}\nselect = ["largest-rss"]\n'
        f"actions = [{actions}]\n"
    )
    return path


def _start(commands: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [str(REAPKIT), "run", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    commands.append(p)
    return p


def _wait_for_line(p: subprocess.Popen[str], needle: str, timeout: float = 60) -> list[str]:
    assert p.stderr is not None
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen in:\n{''.join(lines)}")


def _ignores_sighup(pid: int) -> bool:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def test_sighup_while_the_daemon_starts_does_not_end_it(
    commands: list[subprocess.Popen[str]], memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    p = _start(commands, str(_policy(tmp_path / "p.toml", memory_cgroup)), "--dry-run")
    # The interpreter's own start-up cannot be covered; from the console script's first
    # line on, SIGHUP must be ignored, long before reapkit's imports are done.
    deadline = time.monotonic() + 30
    while not _ignores_sighup(p.pid):
        assert p.poll() is None, f"exited with {p.returncode}"
        assert time.monotonic() < deadline, "the daemon never ignored SIGHUP while starting"
        time.sleep(0.0005)
    ready = threading.Event()

    def hang_up() -> None:
        while not ready.is_set() and p.poll() is None:
            p.send_signal(signal.SIGHUP)
            time.sleep(0.003)

    sender = threading.Thread(target=hang_up)
    sender.start()
    try:
        _wait_for_line(p, "running:")
    finally:
        ready.set()
        sender.join()
    assert p.poll() is None
    p.send_signal(signal.SIGHUP)  # now it reloads
    _wait_for_line(p, "SIGHUP: reloaded")
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    assert os.path.exists(REAPKIT)

"""The daemon's life cycle at its edges: a SIGHUP while it starts, hooks that outlive it, the
heartbeat a liveness probe reads. ``reapkit run`` as a subprocess on sandbox policies."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reapkit._hog import start_hog
from reapkit._sandbox import SandboxCgroup

from .conftest import MiB, need

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


def _pidfd_exits(pidfd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_running_hook_dies_with_the_daemon(
    commands: list[subprocess.Popen[str]],
    memory_cgroup: SandboxCgroup,
    other_memory_cgroup: SandboxCgroup,
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    if shutil.which("setpriv") is None and sig == signal.SIGKILL:
        need("setpriv(1) (util-linux) for the hook's parent-death signal")
    pids = tmp_path / "hook.pids"
    # The hook moves into a sandbox cgroup of its own (removed, members killed, at teardown
    # whatever happens), starts a child and sleeps: two processes to outlive the daemon.
    script = (
        f"echo $$ > {other_memory_cgroup.directory}/cgroup.procs; sleep 600 &"
        f" echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"
    )
    hook = f'{{ name = "prekill-hook", command = ["/bin/sh", "-c", "{script}"], timeout = "50s" }}'
    policy = _policy(tmp_path / "p.toml", memory_cgroup, actions=f'{hook}, "kill"')
    policy.write_text(policy.read_text() + 'action_deadline = "60s"\n')
    p = _start(commands, str(policy))
    _wait_for_line(p, "running:")
    with start_hog(160 * MiB, [memory_cgroup.directory]):
        deadline = time.monotonic() + 60
        while not pids.exists():
            assert p.poll() is None and time.monotonic() < deadline, "the hook never ran"
            time.sleep(0.01)
        fds = [os.pidfd_open(int(pid)) for pid in pids.read_text().split()]
        try:
            assert not any(_pidfd_exits(fd, 0) for fd in fds)
            p.send_signal(sig)
            p.wait(20)
            assert all(_pidfd_exits(fd, 10) for fd in fds), "the hook outlived the daemon"
        finally:
            for fd in fds:
                os.close(fd)

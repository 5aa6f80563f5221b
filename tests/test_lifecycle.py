"""The daemon's life cycle at its edges: a SIGHUP while it starts, hooks that outlive it, the
heartbeat a liveness probe reads. ``reapkit run`` as a subprocess on sandbox policies."""

from __future__ import annotations

import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from reapkit import _heartbeat as heartbeat_module
from reapkit._heartbeat import beat, heartbeat_age, serve_heartbeat
from reapkit.testing import SandboxCgroup, start_hog

from .conftest import MiB, need
from .test_run import _wait_for_line, fill, small_tmpfs

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


def _start(
    commands: list[subprocess.Popen[str]],
    *args: str,
    env: dict[str, str] | None = None,
    command: tuple[str, ...] = (str(REAPKIT),),
) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [*command, "run", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    commands.append(p)
    return p


def _ignores_sighup(pid: int) -> bool:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


@pytest.mark.parametrize(
    "command",
    [(str(REAPKIT),), (sys.executable, "-m", "reapkit"), (sys.executable, "-mreapkit.cli")],
    ids=["console script", "python -m reapkit", "python -mreapkit.cli"],
)
def test_sighup_while_the_daemon_starts_does_not_end_it(
    commands: list[subprocess.Popen[str]],
    memory_cgroup: SandboxCgroup,
    tmp_path: Path,
    command: tuple[str, ...],
) -> None:
    policy = str(_policy(tmp_path / "p.toml", memory_cgroup))
    p = _start(commands, policy, "--dry-run", command=command)
    # The interpreter's own start-up cannot be covered; from the console script's first
    # line on (or the package's first import, under `python -m`), SIGHUP must be ignored,
    # long before reapkit's imports are done.
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


@pytest.mark.parametrize(
    ("argv", "ignored"),
    [
        (["python3", "-m", "reapkit", "run"], True),
        (["python3", "-X", "dev", "-m", "reapkit.cli", "run"], True),
        (["python3", "-mreapkit"], True),
        (["python3", "-m", "pytest", "tests"], False),
        (["python3", "-m", "reapkit.units"], False),
        (["python3", "-c", "import reapkit"], False),
        (["python3", "service.py", "-m", "reapkit"], False),
        (["/usr/bin/reapkit", "run"], False),  # the console script ignores it itself
    ],
)
def test_sighup_is_ignored_on_import_only_for_the_command(argv: list[str], ignored: bool) -> None:
    from reapkit._hangup import run_as_the_command

    assert run_as_the_command(argv) is ignored


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


def _probe(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REAPKIT), "probe", str(path), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_probe_passes_a_fresh_heartbeat_and_fails_a_stale_or_missing_one(
    tmp_path: Path,
) -> None:
    heartbeat = tmp_path / "heartbeat"
    assert _probe(heartbeat).returncode == 1  # missing
    heartbeat.write_text("garbage\n")
    assert _probe(heartbeat).returncode == 1
    beat(str(heartbeat))
    fresh = _probe(heartbeat, "--max-age", "60")
    assert (fresh.returncode, fresh.stdout.split(":")[0]) == (0, "alive")
    heartbeat.write_text(f"{time.monotonic() - 100}\n")  # a loop stuck for 100 s
    stale = _probe(heartbeat, "--max-age", "30")
    assert (stale.returncode, stale.stdout.split(":")[0]) == (1, "stale")
    assert _probe(heartbeat, "--max-age", "nan").returncode == 2


def _beat_value(path: str) -> float | None:
    try:
        return float(Path(path).read_text())
    except (OSError, ValueError):
        return None


async def _next_beat(path: str, after: float | None) -> float:
    """The heartbeat's value once it is newer than ``after``."""
    with trio.fail_after(30):
        while (value := _beat_value(path)) is None or (after is not None and value <= after):
            await trio.sleep(0.01)
    return value


async def test_the_heartbeat_stops_when_the_loop_is_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heartbeat, started = str(tmp_path / "heartbeat"), [0]

    def counted(path: str) -> None:
        started[0] += 1
        beat(path)

    monkeypatch.setattr(heartbeat_module, "beat", counted)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_heartbeat, heartbeat, 0.01)
        await _next_beat(heartbeat, await _next_beat(heartbeat, None))  # it beats
        begun = started[0]
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose: a plugin blocking the trio thread
        assert started[0] - begun <= 1  # none but the one the loop had already asked for
        await _next_beat(heartbeat, _beat_value(heartbeat))  # the loop runs again: it beats
        nursery.cancel_scope.cancel()


def test_a_beat_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    targets = [tmp_path / "precious", tmp_path / "other"]
    for target in targets:
        target.write_text("keep\n")
    (shared / "heartbeat.tmp").symlink_to(targets[0])
    (shared / "heartbeat").symlink_to(targets[1])
    beat(str(shared / "heartbeat"))
    assert [t.read_text() for t in targets] == ["keep\n", "keep\n"]
    st = (shared / "heartbeat").lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert heartbeat_age(str(shared / "heartbeat")) >= 0


def test_a_beat_read_at_once_is_not_from_the_future(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written rounded to the nearest millisecond, 100.0006 s became "100.001": read in the
    # same instant, the beat was -0.4 ms old (seen as a flaky failure of the test above).
    monkeypatch.setattr(time, "monotonic_ns", lambda: 100_000_600_000)
    monkeypatch.setattr(time, "monotonic", lambda: 100.0006)
    beat(str(tmp_path / "heartbeat"))
    assert 0 <= heartbeat_age(str(tmp_path / "heartbeat")) < 0.001


@pytest.mark.parametrize("where", ["no such directory", "a symbolic link"])
def test_an_unusable_heartbeat_path_is_refused_with_status_2(
    memory_cgroup: SandboxCgroup, tmp_path: Path, where: str
) -> None:
    path = tmp_path / "nosuchdir" / "heartbeat"
    if where == "a symbolic link":
        path = tmp_path / "heartbeat"
        path.symlink_to(tmp_path / "precious")
    policy = _policy(tmp_path / "p.toml", memory_cgroup)
    done = subprocess.run(
        [str(REAPKIT), "run", str(policy), "--dry-run", "--heartbeat", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"--heartbeat {path}" in line
    assert not (tmp_path / "precious").exists()


def test_a_full_heartbeat_filesystem_does_not_stop_the_daemon(
    commands: list[subprocess.Popen[str]], memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "small") as small:
        heartbeat = small / "heartbeat"
        policy = _policy(tmp_path / "p.toml", memory_cgroup)
        p = _start(commands, str(policy), "--dry-run", "--heartbeat", str(heartbeat))
        _wait_for_line(p, "running:")
        fill(small)
        _wait_for_line(p, "heartbeat: cannot write")
        before = _beat_value(str(heartbeat))
        assert p.poll() is None
        (small / "filler").unlink()
        _wait_for_line(p, "heartbeat: writing")
        after = _beat_value(str(heartbeat))
        assert before is not None and after is not None and after > before
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0


def test_the_daemon_writes_its_heartbeat(
    commands: list[subprocess.Popen[str]], memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    heartbeat = tmp_path / "heartbeat"
    policy = _policy(tmp_path / "p.toml", memory_cgroup)
    p = _start(commands, str(policy), "--dry-run", "--heartbeat", str(heartbeat))
    _wait_for_line(p, "running:")
    deadline = time.monotonic() + 30
    while not heartbeat.exists():
        assert time.monotonic() < deadline, "no heartbeat written"
        time.sleep(0.01)
    assert _probe(heartbeat, "--max-age", "30").returncode == 0
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0


def test_sigterm_stops_the_daemon_while_a_reload_hangs_in_a_plugin_import(
    commands: list[subprocess.Popen[str]], memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    # An installed plugin whose import never returns (it waits for a lock, a network mount).
    site = tmp_path / "site"
    (site / "blockplug-1.0.dist-info").mkdir(parents=True)
    (site / "blockplug-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: blockplug\nVersion: 1.0\n"
    )
    (site / "blockplug-1.0.dist-info" / "entry_points.txt").write_text(
        "[reapkit.plugins]\nblocker = blockplug:Blocker\n"
    )
    importing = tmp_path / "importing"
    (site / "blockplug.py").write_text(
        f"import pathlib, time\npathlib.Path({str(importing)!r}).touch()\ntime.sleep(3600)\n"
    )
    policy = _policy(tmp_path / "p.toml", memory_cgroup)
    env = {"PYTHONPATH": str(site)}
    p = _start(commands, str(policy), "--dry-run", env=env)
    _wait_for_line(p, "running:")
    policy.write_text(policy.read_text().replace('"largest-rss"', '"blocker", "largest-rss"'))
    p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not importing.exists():
        assert p.poll() is None and time.monotonic() < deadline, "the plugin was never imported"
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0  # not an hour later

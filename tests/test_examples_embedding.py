"""The embedding examples, run as their users would: the services as subprocesses on a
sandbox policy (only a process the test started, in the test's cgroup, can be killed)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reapkit.testing import SandboxCgroup

from .conftest import Spawn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "embedding"


def _http(port: int, method: str, path: str) -> tuple[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


@pytest.mark.parametrize(
    ("script", "stop"), [("trio_service.py", signal.SIGINT), ("asyncio_service.py", signal.SIGTERM)]
)
def test_a_service_embeds_the_reaper(
    script: str, stop: signal.Signals, commands: list[subprocess.Popen[str]], spawn: Spawn,
    memory_cgroup: SandboxCgroup, tmp_path: Path,
) -> None:  # fmt: skip
    victim = spawn(cgroups=[memory_cgroup])
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[rule]]\nname = "sandbox"\nscope = {{ cgroup = "{memory_cgroup.directory}" }}\n'
        'select = ["largest-rss"]\nactions = ["kill"]\nvictim_timeout = "3s"\n'
    )
    p = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), str(policy), "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    commands.append(p)
    assert p.stdout is not None
    port = int(p.stdout.readline().split()[-1])
    assert _http(port, "POST", "/trigger")[0].endswith("202 Accepted")
    assert victim.wait(10) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while not (kills := _http(port, "GET", "/kills")[1]):
        assert time.monotonic() < deadline, "no kill listed"
        time.sleep(0.1)
    assert kills[0]["victim"]["pid"] == victim.pid and kills[0]["outcome"] == "killed"  # type: ignore[index]
    status, stats = _http(port, "GET", "/stats")
    assert status.endswith("200 OK") and stats["engine"]["kills"] == 1  # type: ignore[index]
    p.send_signal(stop)
    assert p.wait(15) == 0

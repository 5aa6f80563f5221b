"""What needs CAP_SYS_RESOURCE, which root lacks on this project's hosts and has in the
guest-kernel lab (``make test-vm``): PSI windows that are not multiples of 2 s, and the daemon
protecting itself with ``oom_score_adj -1000``. Skipped, naming the capability, elsewhere."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from reapkit._sources.psi import PsiTriggerSource
from reapkit._units import parse_psi
from reapkit.lowlevel import Probe
from reapkit.testing import SandboxCgroup

from ..conftest import need

pytestmark = [pytest.mark.kernel, pytest.mark.vm]


@pytest.fixture
def sys_resource(kernel: Probe) -> None:
    if not kernel.capabilities["CAP_SYS_RESOURCE"]:
        need("CAP_SYS_RESOURCE", "root without it may only use 2 s multiples and adj >= 0")


@pytest.mark.usefixtures("sys_resource")
async def test_a_psi_window_below_two_seconds_arms() -> None:
    spec = parse_psi("memory some 50ms/500ms")
    spec.check_window(unprivileged_only=False)
    send, _receive = trio.open_memory_channel[object](4)
    async with trio.open_nursery() as nursery:
        await nursery.start(PsiTriggerSource(spec).run, send)  # the kernel took the trigger
        nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("sys_resource")
def test_the_daemon_protects_itself_with_oom_score_adj_min(
    commands: list[subprocess.Popen[str]], memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(
        f'[[rule]]\nname = "sandbox"\nscope = {{ cgroup = "{memory_cgroup.directory}" }}\n'
        'actions = ["kill"]\n'
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "reapkit.cli", "run", "--dry-run", str(policy)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    commands.append(daemon)
    assert daemon.stderr is not None
    deadline = time.monotonic() + 300  # emulated guests are slow
    while "running:" not in (line := daemon.stderr.readline()):
        assert line and time.monotonic() < deadline, "the daemon did not start"
    adj = Path(f"/proc/{daemon.pid}/oom_score_adj").read_text().strip()
    assert adj == "-1000"

"""Shared fixtures.

Safety rules for every test here:
* signal only processes the test started (the ``spawn`` fixture), never anything by name;
* every memory hog runs inside a sandbox memory cgroup with a hard limit;
* everything created (cgroups, processes, fds) is removed in ``finally``, also on failure;
* a test that needs a kernel feature or privilege this host lacks is skipped with a message
  naming the feature.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import pytest

from reapkit import Unsupported
from reapkit.lowlevel import Probe, probe
from reapkit.testing import SandboxCgroup

MiB = 1 << 20

#: The keys `reapkit doctor --json` documents (issue: "at least these keys").
DOCTOR_JSON_KEYS = frozenset(
    {
        "pidfd",
        "process_mrelease",
        "psi_triggers",
        "psi_unprivileged_only",
        "proc_connector",
        "cgroup_v1_controllers",
        "cgroup_v2_controllers",
    }
)


@pytest.fixture(scope="session")
def kernel() -> Probe:
    """What this kernel and these privileges support (``reapkit doctor``'s probe)."""
    return probe(proc_connector_timeout=1.0)


#: Missing features that may skip even in CI (this project's machines lack them by design).
#: In the guest-kernel lab (``make test-vm``) nothing may be missing: that is what it is for.
MAY_BE_MISSING = (
    frozenset()
    if os.environ.get("REAPKIT_IN_GUEST") == "1"
    else frozenset({"CAP_SYS_RESOURCE", "the cgroup v2 memory controller"})
)


def pytest_report_header() -> str:
    """Which cgroup hierarchy the kernel tests meet (``make test-vm`` must say v2)."""
    from reapkit._kernel._cgroups import cgroup_mounts, mount_for

    mounts = cgroup_mounts()
    memory = mount_for("memory", mounts)
    where = "in the guest-kernel lab" if os.environ.get("REAPKIT_IN_GUEST") == "1" else "host"
    if memory is None:
        return f"cgroups ({where}): no memory controller"
    only_v2 = all(m.version == 2 for m in mounts)
    kind = "pure cgroup v2" if only_v2 else f"memory on cgroup v{memory.version}"
    return f"cgroups ({where}): {kind}, memory controller at {memory.mountpoint}"


def need(feature: str, why: str = "") -> NoReturn:
    """Skip the test, naming the missing ``feature`` — or, where ``REAPKIT_REQUIRE_KERNEL=1``
    (set by ``.ci/run``: CI runs on the project's own machines, which have it all), fail it,
    so that CI cannot go green with the kernel tests quietly skipped."""
    message = f"needs {feature}{': ' + why if why else ''}"
    allowed = any(feature.startswith(name) for name in MAY_BE_MISSING)
    if os.environ.get("REAPKIT_REQUIRE_KERNEL") == "1" and not allowed:
        pytest.fail(f"{message} (REAPKIT_REQUIRE_KERNEL=1)")
    pytest.skip(message)


def require_root() -> None:
    if os.geteuid() != 0:
        need("root", "the kernel tests create cgroups and signal their own children")


#: For scripts run by :func:`run_in_pid_namespace`: ``take_pid_of(popen)`` kills that child
#: and starts ``sleep 600`` with the same PID, ``settle`` seconds later (by default more
#: than one clock tick; 0: at once, most often in the same tick).
PID_REUSE = r"""
import subprocess, time

def take_pid_of(first, settle=0.05):
    first.kill()
    first.wait()
    time.sleep(settle)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(first.pid - 1))
    return subprocess.Popen(["sleep", "600"])
"""


def run_in_pid_namespace(script: str, *, mount_proc: bool = True) -> Any:
    """Run a Python ``script`` as PID 1 of a private PID namespace (``unshare --pid --fork
    --mount-proc``), where writing N-1 to ``ns_last_pid`` makes the next fork get PID N;
    return what it printed, as JSON. ``mount_proc=False``: ``/proc`` stays the host's."""
    require_root()
    unshare = shutil.which("unshare")
    if unshare is None:
        need("unshare(1) (util-linux) for a private PID namespace")
    mount = ["--mount-proc"] if mount_proc else []
    done = subprocess.run(
        [unshare, "--pid", "--fork", *mount, sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0 and "unshare failed" in done.stderr:
        need("PID namespaces", done.stderr.strip())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _sandbox(controller: str) -> Iterator[SandboxCgroup]:
    require_root()
    try:
        cgroup = SandboxCgroup.create(controller, prefix="reapkit-test")
    except Unsupported as exc:
        need(exc.feature)
    try:
        if controller == "memory":
            cgroup.set_memory_limit(256 * MiB)  # rule: every hog runs under a hard limit
        yield cgroup
    finally:
        cgroup.remove()


@pytest.fixture
def memory_cgroup() -> Iterator[SandboxCgroup]:
    """A memory cgroup limited to 256 MiB (callers may lower or raise it)."""
    yield from _sandbox("memory")


@pytest.fixture
def other_memory_cgroup() -> Iterator[SandboxCgroup]:
    """A sibling of ``memory_cgroup``: where bystanders live."""
    yield from _sandbox("memory")


@pytest.fixture
def freezer_cgroup() -> Iterator[SandboxCgroup]:
    """A cgroup v1 freezer cgroup: freezing holds its members in state D."""
    yield from _sandbox("freezer")


@pytest.fixture
def v2_cgroup() -> Iterator[SandboxCgroup]:
    """A plain cgroup v2 directory (``cgroup.kill``, ``cgroup.freeze``, pressure files)."""
    yield from _sandbox("v2")


@pytest.fixture
def commands() -> Iterator[list[subprocess.Popen[str]]]:
    """Long-running commands a test starts (the daemon, an example service): append each
    Popen; every one is killed by its own Popen, waited for and its pipes closed at teardown."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()


Spawn = Callable[..., subprocess.Popen[bytes]]


def _still_trampoline(pid: int) -> bool:
    """Whether ``pid`` still runs the spawn trampoline (its command line holds its code)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"cgroup.procs" in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a child process (by default ``sleep 600``), optionally inside cgroups.

    ``spawn(cgroups=[...])`` puts it into each cgroup before it runs its program (a Python
    trampoline writes its own PID into ``cgroup.procs``, then execs). Every child is killed
    (by its ``Popen``, i.e. its own PID) and waited for at teardown.
    """
    children: list[tuple[subprocess.Popen[bytes], Sequence[SandboxCgroup]]] = []

    def start(
        argv: Sequence[str] = ("sleep", "600"),
        *,
        cgroups: Sequence[SandboxCgroup] = (),
        **kwargs: object,
    ) -> subprocess.Popen[bytes]:
        trampoline = (
            "import os, sys\n"
            "for d in sys.argv[1].split(':') if sys.argv[1] else []:\n"
            "    open(os.path.join(d, 'cgroup.procs'), 'w').write(str(os.getpid()))\n"
            "os.execvp(sys.argv[2], sys.argv[2:])\n"
        )
        dirs = ":".join(c.directory for c in cgroups)
        child = subprocess.Popen(
            [sys.executable, "-c", trampoline, dirs, *argv],
            **kwargs,  # type: ignore[call-overload]
        )
        children.append((child, cgroups))
        if cgroups:
            # Wait until the trampoline has joined the cgroups (it does so before exec).
            for cgroup in cgroups:
                while child.pid not in cgroup.pids():
                    if child.poll() is not None:
                        raise RuntimeError(f"child exited with {child.returncode}")
                    time.sleep(0.001)
        # ...and until it has exec'd the program: before that its comm is still "python",
        # and a reaper deciding meanwhile would see (and protect or choose) the wrong name.
        deadline = time.monotonic() + 30
        while _still_trampoline(child.pid) and child.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"child {child.pid} did not exec {argv[0]}")
            time.sleep(0.001)
        return child

    try:
        yield start
    finally:
        for child, cgroups in children:
            for cgroup in cgroups:
                cgroup.thaw()  # a frozen child cannot die; thawing a removed cgroup is a no-op
            if child.poll() is None:
                child.kill()
            child.wait(10)
            for stream in (child.stdin, child.stdout, child.stderr):
                if stream is not None:
                    stream.close()


def live_pids() -> set[int]:
    """A fresh scan: every /proc entry that has not exited (zombies are left out, as the
    table leaves them out: their exit event has been sent)."""
    found = set()
    for name in os.listdir("/proc"):
        if not (name.isascii() and name.isdigit()):
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state = data[data.rindex(b")") + 2 :][:1]
        if state not in (b"Z", b"X"):
            found.add(int(name))
    return found


class FakeEntryPoint:
    """Stands for an ``importlib.metadata`` entry point in tests (pluggy's pattern): ``load``
    returns ``target``, or raises it if it is an exception."""

    def __init__(self, name: str, target: object, dist: str) -> None:
        self.name, self._target = name, target
        self.dist = type("Dist", (), {"name": dist})()

    def load(self) -> object:
        if isinstance(self._target, Exception):
            raise self._target
        return self._target

"""What this kernel and these privileges let a reaper do, found by trying each thing.

Every check makes the call it is about, harmlessly: ``process_mrelease`` with invalid flags
on our own pidfd, a PSI trigger written and closed at once, a proc connector subscription
proven by the fork event of a child we start. Reading version numbers would not see seccomp
filters, containers or missing capabilities.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs

from .._procfs import frozen_mapping
from ._cgroups import cgroup_mounts, v2_mount
from ._netlink import open_proc_connector, proc_connector_control
from ._syscalls import SYS_PROCESS_MRELEASE, _syscall

#: Capability numbers (include/uapi/linux/capability.h) of the ones a reaper may need.
CAPABILITIES: Final = MappingProxyType(
    {
        "CAP_KILL": 5,
        "CAP_NET_ADMIN": 12,
        "CAP_IPC_LOCK": 14,
        "CAP_SYS_PTRACE": 19,
        "CAP_SYS_ADMIN": 21,
        "CAP_SYS_NICE": 23,
        "CAP_SYS_RESOURCE": 24,
    }
)
PSI_RESOURCES: Final = ("memory", "io", "cpu")


@attrs.frozen
class Check:
    """One line of the probe: a feature, whether it is there, and what that means here."""

    name: str
    ok: bool
    detail: str
    #: A reaper cannot work at all without it (as opposed to working less well).
    required: bool = False


@attrs.frozen
class Probe:
    """The result of :func:`probe`."""

    kernel: str
    pidfd: bool
    process_mrelease: bool
    psi_files: tuple[str, ...]
    psi_triggers: bool
    #: Trigger windows must be multiples of 2 s (no ``CAP_SYS_RESOURCE``).
    psi_unprivileged_only: bool
    proc_connector: bool
    cgroup_v1_controllers: tuple[str, ...]
    cgroup_v2_controllers: tuple[str, ...]
    cgroup_v2_mountpoint: str | None
    capabilities: Mapping[str, bool] = attrs.field(converter=frozen_mapping)
    checks: tuple[Check, ...] = ()

    @property
    def missing(self) -> tuple[Check, ...]:
        """The required checks that failed."""
        return tuple(c for c in self.checks if c.required and not c.ok)

    @property
    def can_reap(self) -> bool:
        """Whether a reaper can work here (every required check passed)."""
        return not self.missing

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict; the top-level keys are stable API for scripts."""
        return {
            "kernel": self.kernel,
            "pidfd": self.pidfd,
            "process_mrelease": self.process_mrelease,
            "psi_files": list(self.psi_files),
            "psi_triggers": self.psi_triggers,
            "psi_unprivileged_only": self.psi_unprivileged_only,
            "proc_connector": self.proc_connector,
            "cgroup_v1_controllers": list(self.cgroup_v1_controllers),
            "cgroup_v2_controllers": list(self.cgroup_v2_controllers),
            "cgroup_v2_mountpoint": self.cgroup_v2_mountpoint,
            "capabilities": dict(self.capabilities),
            "can_reap": self.can_reap,
            "missing": [c.name for c in self.missing],
            "checks": [attrs.asdict(c) for c in self.checks],
        }


def effective_capabilities(status_path: str = "/proc/self/status") -> dict[str, bool]:
    """Which of :data:`CAPABILITIES` this process has in its effective set."""
    cap_eff = 0
    with open(status_path, encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("CapEff:"):
                cap_eff = int(line.split()[1], 16)
                break
    return {name: bool(cap_eff >> bit & 1) for name, bit in CAPABILITIES.items()}


def _probe_pidfd() -> Check:
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        return Check("pidfd", False, f"pidfd_open failed: {exc.strerror} (needs Linux 5.3)", True)
    try:
        signal.pidfd_send_signal(fd, 0)
    except OSError as exc:
        return Check(
            "pidfd", False, f"pidfd_send_signal failed: {exc.strerror} (needs Linux 5.1)", True
        )
    finally:
        os.close(fd)
    return Check("pidfd", True, "pidfd_open and pidfd_send_signal work", True)


def check_process_mrelease() -> Check:
    # flags != 0 is rejected with EINVAL before anything else is looked at: a harmless call
    # that tells "the syscall exists and seccomp lets it through" from ENOSYS/EPERM.
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        return Check("process_mrelease", False, f"no pidfds to try it with: {exc.strerror}")
    try:
        rc = _syscall(SYS_PROCESS_MRELEASE, ctypes.c_int(fd), ctypes.c_uint(1))
        err = ctypes.get_errno()
    finally:
        os.close(fd)
    if rc == -1 and err == errno.EINVAL:
        return Check("process_mrelease", True, "available")
    if err == errno.ENOSYS:
        detail = "missing (needs Linux 5.15); kills will wait for victims to free their memory"
    elif err == errno.EPERM:
        detail = "denied by a seccomp filter (allow process_mrelease)"
    else:
        detail = f"unexpected answer {rc} / {errno.errorcode.get(err, err)}"
    return Check("process_mrelease", False, detail)


def _try_trigger(path: str, spec: str) -> int:
    """0 if the trigger ``spec`` can be set on ``path``, else the errno."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        os.write(fd, spec.encode() + b"\0")  # the kernel overwrites the last byte with NUL
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        os.close(fd)
    return 0


def check_psi_triggers() -> bool:
    """Whether a memory PSI trigger with a 2 s window can be armed here (cheap: one write)."""
    return os.path.exists("/proc/pressure/memory") and not _try_trigger(
        "/proc/pressure/memory", "some 100000 2000000"
    )


def _probe_psi() -> tuple[Check, Check, tuple[str, ...], bool]:
    files = tuple(r for r in PSI_RESOURCES if os.path.exists(f"/proc/pressure/{r}"))
    if "memory" not in files:
        msg = (
            "/proc/pressure/memory is missing (needs CONFIG_PSI=y and no psi=0 on the command line)"
        )
        return Check("psi", False, msg), Check("psi_triggers", False, "no PSI"), files, False
    files_check = Check("psi", True, "/proc/pressure/" + ", ".join(files))
    two_s = _try_trigger("/proc/pressure/memory", "some 100000 2000000")
    if two_s:
        detail = f"writing a trigger failed: {os.strerror(two_s)}; falling back to polling avg10"
        return files_check, Check("psi_triggers", False, detail), files, False
    one_s = _try_trigger("/proc/pressure/memory", "some 100000 1000000")
    unprivileged_only = one_s == errno.EINVAL
    if unprivileged_only:
        detail = "work; windows must be multiples of 2 s (no CAP_SYS_RESOURCE)"
    else:
        detail = "work, with any window from 500 ms to 10 s"
    return files_check, Check("psi_triggers", True, detail), files, unprivileged_only


def _probe_proc_connector(timeout: float = 2.0) -> Check:
    try:
        sock = open_proc_connector()
    except OSError as exc:
        return Check("proc_connector", False, f"cannot bind: {exc}; the table will rescan /proc")
    try:
        proc_connector_control(sock, listen=True)
        # Our own child's fork proves the subscription: the kernel ignores requests from
        # outside the initial namespaces without saying so.
        subprocess.run([sys.executable, "-c", ""], check=False)
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            if poller.poll(left * 1000) and sock.recv(65536):
                return Check("proc_connector", True, "fork/exec/exit events arrive")
        return Check(
            "proc_connector",
            False,
            "subscribed but no events arrive (outside the initial PID or user namespace?);"
            " the process table will rescan /proc",
        )
    except OSError as exc:
        return Check("proc_connector", False, f"{exc}; the table will rescan /proc")
    finally:
        with contextlib.suppress(OSError):
            proc_connector_control(sock, listen=False)
        sock.close()


def probe(*, proc_connector_timeout: float = 2.0) -> Probe:
    """Find out what a reaper can do on this machine, with these privileges."""
    caps = effective_capabilities()
    pidfd = _probe_pidfd()
    mrelease = (
        check_process_mrelease() if pidfd.ok else Check("process_mrelease", False, "no pidfds")
    )
    psi, psi_triggers, psi_files, psi_unprivileged_only = _probe_psi()
    connector = _probe_proc_connector(proc_connector_timeout)
    try:
        mounts = cgroup_mounts()
    except OSError:
        mounts = ()
    v1 = tuple(sorted(c for m in mounts if m.version == 1 for c in m.controllers))
    v2 = v2_mount(mounts)
    v2_controllers = v2.controllers if v2 else ()
    proc_ok = os.path.exists("/proc/self/stat") and os.path.exists("/proc/meminfo")
    cgroups = f"v1: {', '.join(v1) or 'none'}; " + (
        f"v2 at {v2.mountpoint}: {' '.join(v2_controllers) or 'no controllers'}" if v2 else "no v2"
    )
    checks = (
        Check("procfs", proc_ok, "/proc is mounted" if proc_ok else "/proc is not mounted", True),
        pidfd,
        Check(
            "CAP_KILL",
            caps["CAP_KILL"],
            "may signal other users' processes"
            if caps["CAP_KILL"]
            else "missing: only this user's own processes can be killed",
        ),
        mrelease,
        psi,
        psi_triggers,
        connector,
        Check("cgroups", bool(mounts), cgroups),
        Check(
            "CAP_SYS_RESOURCE",
            caps["CAP_SYS_RESOURCE"],
            "may set oom_score_adj -1000 and short PSI windows"
            if caps["CAP_SYS_RESOURCE"]
            else "missing: the daemon cannot protect itself with oom_score_adj -1000",
        ),
        Check(
            "CAP_IPC_LOCK",
            caps["CAP_IPC_LOCK"],
            "may lock its memory (mlockall)" if caps["CAP_IPC_LOCK"] else "missing: mlockall fails",
        ),
    )
    return Probe(
        kernel=platform.release(),
        pidfd=pidfd.ok,
        process_mrelease=mrelease.ok,
        psi_files=psi_files,
        psi_triggers=psi_triggers.ok,
        psi_unprivileged_only=psi_unprivileged_only,
        proc_connector=connector.ok,
        cgroup_v1_controllers=v1,
        cgroup_v2_controllers=v2_controllers,
        cgroup_v2_mountpoint=v2.mountpoint if v2 else None,
        capabilities=caps,
        checks=checks,
    )

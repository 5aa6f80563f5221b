"""Thin, typed wrappers over the system calls a reaper needs.

Python's own mapping of errno to exceptions is kept (``ProcessLookupError`` for ``ESRCH``,
``PermissionError`` for ``EPERM``) except where the kernel's answer means something more
specific to a reaper; those cases raise the errors in :mod:`reapkit._errors` and are listed in
each docstring. Facts behind each mapping: ``shared/KERNEL_NOTES.md``.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import gc
import os
import signal
from typing import Final

from .._errors import AccessDenied, NotDying, Unsupported
from .._procfs import OOM_SCORE_ADJ_MAX, OOM_SCORE_ADJ_MIN

# process_mrelease has number 448 in the unified syscall table (x86_64, arm64, riscv, ...);
# only alpha adds 110. It is not in the os module, so it is called through libc's syscall().
SYS_PROCESS_MRELEASE: Final = 448

MCL_CURRENT: Final = 1
MCL_FUTURE: Final = 2
MCL_ONFAULT: Final = 4  # Linux 4.4

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_mlockall = _libc.mlockall
_mlockall.argtypes = [ctypes.c_int]
_mlockall.restype = ctypes.c_int
_munlockall = _libc.munlockall
_munlockall.argtypes = []
_munlockall.restype = ctypes.c_int


def pidfd_open(pid: int) -> int:
    """Open a pidfd for ``pid`` (a thread-group leader) with ``O_CLOEXEC`` set.

    Raises ``ProcessLookupError`` if no such process exists, :class:`Unsupported` on a
    kernel before 5.3, ``ValueError`` if ``pid`` is a thread rather than a process.
    """
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise Unsupported("pidfd_open", "it needs Linux 5.3 or later") from None
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            # A TID that is not a thread-group leader: EINVAL before Linux 6.9, ENOENT since
            # (PIDFD_THREAD). EINVAL also means pid <= 0.
            raise ValueError(
                f"{pid} is a thread or not a valid process ID: pidfds name processes"
            ) from None
        raise


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Send ``sig`` to the process behind ``pidfd``.

    It reaches that process or nothing: a pidfd never follows a reused PID. A zombie can
    still be signalled (a no-op); ``ProcessLookupError`` once it has been waited for.
    """
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise Unsupported("pidfd_send_signal", "it needs Linux 5.1 or later") from None
        raise


class MreleaseOutcome(enum.Enum):
    """What ``process_mrelease`` did."""

    #: The call returned 0: the address space was reaped now (or a reap was already done).
    REAPED = "reaped"
    #: ``ESRCH``: the process had already gone past ``exit_mm`` or was waited for; its private
    #: memory is freed already. Not a failure.
    ALREADY_FREED = "already-freed"


def process_mrelease(
    pidfd: int, *, eagain_retries: int = 1, pid: int | None = None
) -> MreleaseOutcome:
    """Reap the memory of the dying process behind ``pidfd`` in the caller's context.

    Only anonymous and private mappings are freed; shared file pages, shmem and hugetlb are
    not. The work runs on the calling thread, with its CPU affinity and priority, and blocks
    it (ctypes releases the GIL meanwhile): call it from a dedicated thread, never from the
    event loop.

    Raises :class:`NotDying` (``EINVAL``) if no fatal signal is pending (SIGTERM is not
    enough; send SIGKILL first) or the memory is shared with a live process;
    :class:`Unsupported` (``ENOSYS``) before Linux 5.15, or ``EPERM`` where a seccomp filter
    forbids it; ``BlockingIOError`` (``EAGAIN``) if part of the space could not be reaped even
    after ``eagain_retries`` retries; ``InterruptedError`` (``EINTR``) only if the caller
    itself received a fatal signal. ``pid`` only improves error messages.
    """
    attempts = 1 + max(0, eagain_retries)
    err = 0
    for _ in range(attempts):
        if _syscall(SYS_PROCESS_MRELEASE, ctypes.c_int(pidfd), ctypes.c_uint(0)) == 0:
            return MreleaseOutcome.REAPED
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    if err == errno.ESRCH:
        return MreleaseOutcome.ALREADY_FREED
    if err == errno.EINVAL:
        raise NotDying(pid)
    if err == errno.ENOSYS:
        raise Unsupported("process_mrelease", "it needs Linux 5.15 or later")
    if err == errno.EPERM:
        raise Unsupported(
            "process_mrelease",
            "the call was denied (EPERM): a seccomp filter must allow it"
            " (systemd: SystemCallFilter=process_mrelease)",
            errno.EPERM,
        )
    raise OSError(err, f"process_mrelease: {os.strerror(err)}")


def mlockall(*, current: bool = True, future: bool = True, on_fault: bool = True) -> bool:
    """Lock this process's memory so the reaper itself is never paged out under pressure.

    ``on_fault`` (Linux 4.4) locks pages only once touched, so a large virtual reservation
    does not become resident. Falls back to a plain lock where ``MCL_ONFAULT`` is unknown.
    Returns whether ``MCL_ONFAULT`` was used. Raises :class:`AccessDenied` without
    ``CAP_IPC_LOCK`` or a large enough ``RLIMIT_MEMLOCK``.
    """
    flags = (MCL_CURRENT if current else 0) | (MCL_FUTURE if future else 0)
    if not flags:
        raise ValueError("mlockall needs current=True, future=True or both")
    used_on_fault = on_fault
    rc = _mlockall(flags | (MCL_ONFAULT if on_fault else 0))
    err = ctypes.get_errno() if rc else 0
    if rc and err == errno.EINVAL and on_fault:
        used_on_fault = False
        rc = _mlockall(flags)
        err = ctypes.get_errno() if rc else 0
    if rc:
        if err in (errno.EPERM, errno.ENOMEM):
            raise AccessDenied(
                None,
                f"mlockall: it needs CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK ({os.strerror(err)})",
            )
        raise OSError(err, f"mlockall: {os.strerror(err)}")
    return used_on_fault


def release_free_heap() -> bool:
    """Give the C heap's free memory back to the kernel (glibc ``malloc_trim(0)``, after a
    full garbage collection). Call it before :func:`mlockall`: import-time temporaries the
    allocator keeps would otherwise stay resident, and locked, for the process's life.
    Returns whether anything was given back; ``False`` without glibc."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is None:
        return False
    gc.collect()
    return bool(trim(0))


def munlockall() -> None:
    """Undo :func:`mlockall`."""
    if _munlockall():
        err = ctypes.get_errno()
        raise OSError(err, f"munlockall: {os.strerror(err)}")


def set_oom_score_adj(value: int, *, proc_root: str = "/proc", pid: int | str = "self") -> None:
    """Set ``oom_score_adj`` (-1000 … 1000) of this process (or of ``pid``).

    Lowering it below the lowest value the process has had needs ``CAP_SYS_RESOURCE``; the
    :class:`AccessDenied` raised then names that capability.
    """
    if not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
        raise ValueError(f"oom_score_adj must be within -1000..1000, not {value}")
    path = f"{proc_root}/{pid}/oom_score_adj"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
    except PermissionError:
        raise AccessDenied(
            None if pid == "self" else int(pid),
            f"writing {value} to {path}: lowering oom_score_adj needs CAP_SYS_RESOURCE",
        ) from None


def cgroup_kill(cgroup_dir: str) -> None:
    """SIGKILL every process in a cgroup v2 directory and its descendants, atomically
    against forks, through its ``cgroup.kill`` file (Linux 5.14).

    Raises :class:`Unsupported` where the directory has no ``cgroup.kill`` (cgroup v1 or an
    older kernel): the caller falls back to signalling each member through its pidfd.
    """
    path = os.path.join(cgroup_dir, "cgroup.kill")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not os.path.isdir(cgroup_dir):
            raise
        raise Unsupported(
            "cgroup.kill", f"{cgroup_dir} has no cgroup.kill (it needs cgroup v2, Linux 5.14)"
        ) from None
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)

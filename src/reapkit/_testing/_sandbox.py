"""Cgroups that a test or the demo creates, limits, freezes, and always removes.

Every memory hog reapkit's own tests, demo and benchmarks start runs in one of these, with a
hard memory limit, so nothing they do can push the machine toward OOM. :meth:`remove` thaws,
kills the members (only they are in it: the cgroup is ours) and deletes the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import time
from collections.abc import Sequence
from types import TracebackType

import attrs

from .._errors import Unsupported
from .._interrupts import deferred_interrupts
from .._kernel._cgroups import CgroupMount, cgroup_mounts, mount_for, v2_mount
from .._kernel._syscalls import pidfd_open, pidfd_send_signal

_STALE = re.compile(r"^(?P<prefix>.+)-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _pids(directory: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: a question, not a signal
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@attrs.define(eq=False)
class SandboxCgroup:
    """A cgroup directory this process created. Use as a context manager."""

    directory: str
    mount: CgroupMount
    removed: bool = attrs.field(default=False, init=False)

    @classmethod
    def create(
        cls,
        controller: str,
        *,
        prefix: str = "reapkit",
        mounts: Sequence[CgroupMount] | None = None,
    ) -> SandboxCgroup:
        """Create a new cgroup at the top of the hierarchy that has ``controller``.

        ``controller`` is ``"memory"`` (v1 or v2), ``"freezer"`` (the v1 freezer, which holds
        its tasks in uninterruptible sleep: what a stuck victim looks like) or ``"v2"`` (a
        plain cgroup v2 directory: ``cgroup.kill``, ``cgroup.freeze``, pressure files).
        Raises :class:`Unsupported` naming what is missing, ``PermissionError`` when not root.
        """
        mounts = cgroup_mounts() if mounts is None else mounts
        if controller == "v2":
            mount = v2_mount(mounts)
        else:
            mount = mount_for(controller, mounts)
            if controller == "freezer" and mount is not None and mount.version != 1:
                mount = None  # the v2 freezer lets SIGKILL through: no stuck victims there
        if mount is None:
            what = {
                "freezer": "the cgroup v1 freezer (to hold a victim in state D)",
                "v2": "a cgroup v2 hierarchy",
            }.get(controller, f"the cgroup {controller} controller")
            raise Unsupported(what, "it is not mounted on this host", errno.ENOENT)
        if mount.version == 2 and controller == "memory":
            # Never change the host's own cgroup set-up: without the controller enabled at
            # the root, say so instead.
            control = os.path.join(mount.mountpoint, "cgroup.subtree_control")
            if "memory" not in _read(control).split():
                raise Unsupported(
                    "the cgroup v2 memory controller",
                    f"it is not enabled in {control} (echo +memory > {control})",
                    errno.ENOENT,
                )
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        directory = os.path.join(mount.mountpoint, name)
        os.mkdir(directory)
        return cls(directory, mount)

    # -- membership ------------------------------------------------------------------------

    def add(self, pid: int) -> None:
        _write(os.path.join(self.directory, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        return _pids(self.directory)

    # -- memory ----------------------------------------------------------------------------

    def set_memory_limit(self, nbytes: int) -> None:
        """A hard limit. Swap is limited to nothing where the kernel accounts it."""
        if self.mount.version == 1:
            # memory.limit_in_bytes may not exceed memsw's limit: when raising, memsw first;
            # when lowering, the memory limit first. Trying both orders covers both.
            memsw = self._file("memory.memsw.limit_in_bytes")
            try:
                _write(self._file("memory.limit_in_bytes"), str(nbytes))
            except OSError:
                _write(memsw, str(nbytes))
                _write(self._file("memory.limit_in_bytes"), str(nbytes))
            with contextlib.suppress(OSError):
                _write(memsw, str(nbytes))
        else:
            _write(self._file("memory.max"), str(nbytes))
            with contextlib.suppress(OSError):
                _write(self._file("memory.swap.max"), "0")

    def memory_usage(self) -> int:
        name = "memory.usage_in_bytes" if self.mount.version == 1 else "memory.current"
        return int(_read(self._file(name)))

    # -- freezing --------------------------------------------------------------------------

    @property
    def frozen(self) -> bool:
        if self.mount.version == 1:
            return _read(self._file("freezer.state")).strip() == "FROZEN"
        return "frozen 1" in _read(self._file("cgroup.events"))

    def freeze(self, *, timeout: float = 5.0) -> None:
        """Freeze every member and wait until the kernel says all are frozen."""
        if self.mount.version == 1:
            _write(self._file("freezer.state"), "FROZEN")
        else:
            _write(self._file("cgroup.freeze"), "1")
        deadline = time.monotonic() + timeout
        while not self.frozen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.directory} did not freeze within {timeout} s")
            time.sleep(0.001)

    def thaw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.mount.version == 1:
                if os.path.exists(self._file("freezer.state")):
                    _write(self._file("freezer.state"), "THAWED")
            else:
                _write(self._file("cgroup.freeze"), "0")

    # -- teardown --------------------------------------------------------------------------

    def kill_members(self) -> None:
        """SIGKILL every member, child cgroups included, each through its own pidfd. Only for
        cgroups we created: whatever is inside was put there by us or forked from it."""
        for dirpath, _dirs, _files in os.walk(self.directory):
            for pid in _pids(dirpath):
                try:
                    fd = pidfd_open(pid)
                except (ProcessLookupError, ValueError):
                    continue
                try:
                    pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                finally:
                    os.close(fd)

    def remove(self, *, timeout: float = 10.0) -> None:
        """Thaw, kill the members, wait until empty and delete it with its child cgroups.

        Interrupts are held meanwhile: a second Ctrl-C must not leave a frozen process."""
        if self.removed:
            return
        with deferred_interrupts():
            deadline = time.monotonic() + timeout
            while True:
                self.thaw()
                self.kill_members()
                try:
                    for dirpath, _dirs, _files in os.walk(self.directory, topdown=False):
                        os.rmdir(dirpath)
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
                else:
                    break
            self.removed = True

    @classmethod
    def remove_stale(cls, prefix: str, *, mounts: Sequence[CgroupMount] | None = None) -> list[str]:
        """Remove ``<prefix>-<pid>-<hex>`` cgroups left by a run of ours that was killed
        before it could clean up (its PID no longer exists). Returns what was removed."""
        removed = []
        for mount in cgroup_mounts() if mounts is None else mounts:
            try:
                names = os.listdir(mount.mountpoint)
            except OSError:
                continue
            for name in names:
                match = _STALE.match(name)
                if not match or match["prefix"] != prefix or _alive(int(match["pid"])):
                    continue
                stale = cls(os.path.join(mount.mountpoint, name), mount)
                stale.remove()
                removed.append(stale.directory)
        return removed

    def _file(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def __enter__(self) -> SandboxCgroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

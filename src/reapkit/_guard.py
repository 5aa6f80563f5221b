"""The kill guard: the one door between any decision and any signal.

Safety is not a plugin. Every signal reapkit sends goes through :meth:`KillGuard.send_signal`
(or :meth:`KillGuard.kill_cgroup`), which refuses, with a reason that reaches the logs and the
kill records:

* PID 1 and non-positive PIDs;
* reapkit's own process and its threads;
* kernel threads (no memory to free, and not ours to kill);
* ``oom_score_adj == -1000`` (the kernel's own "never kill"), unless explicitly allowed;
* anything outside the configured scope (a cgroup sub-tree, a process sub-tree, or the whole
  system when an operator says so);
* anything whose identity changed since it was chosen (PID reuse: another start time);

and it enforces dry-run: in dry-run mode nothing is ever signalled.
"""

from __future__ import annotations

import abc
import collections
import enum
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from ._errors import NoSuchProcess, ReapkitError, Unsupported
from ._kernel._cgroups import CgroupMount, cgroup_mounts, entry_matches, mount_containing
from ._kernel._syscalls import cgroup_kill
from ._process import ProcessRef
from ._procfs import ProcFS

log = logging.getLogger("reapkit.guard")

OOM_SCORE_ADJ_MIN = -1000
_MAX_ANCESTRY = 4096  # a deeper parent chain than any real tree: stop walking


class RefusalReason(enum.Enum):
    INVALID_PID = "invalid-pid"
    PID_ONE = "pid-1"
    REAPER_ITSELF = "reaper-itself"
    KERNEL_THREAD = "kernel-thread"
    OOM_SCORE_ADJ_MIN = "oom-score-adj-min"
    OUT_OF_SCOPE = "out-of-scope"
    IDENTITY_CHANGED = "identity-changed"
    GONE = "gone"


@attrs.frozen
class Refusal:
    """Why the guard would not let a signal through."""

    pid: int
    reason: RefusalReason
    detail: str

    def __str__(self) -> str:
        return f"refused to signal process {self.pid}: {self.reason.value} ({self.detail})"


class KillRefused(ReapkitError, PermissionError):
    """The kill guard refused; :attr:`refusal` says why."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(str(refusal))


class SignalOutcome(enum.Enum):
    SENT = "sent"
    DRY_RUN = "dry-run"


# -- scopes ----------------------------------------------------------------------------------


class Scope(abc.ABC):
    """The processes a reaper may signal. Membership is re-checked at every signal."""

    @abc.abstractmethod
    def excludes(self, pid: int, procfs: ProcFS) -> str | None:
        """``None`` if ``pid`` is in scope, else a sentence saying why not."""

    @abc.abstractmethod
    def describe(self) -> str: ...


@attrs.frozen
class CgroupScope(Scope):
    """Processes in a cgroup directory or any cgroup below it (cgroup v1 or v2)."""

    mount: CgroupMount
    #: The cgroup path as ``/proc/<pid>/cgroup`` names it, e.g. ``/reapkit-demo``.
    path: str

    @classmethod
    def from_directory(
        cls, directory: str, *, mounts: Sequence[CgroupMount] | None = None
    ) -> CgroupScope:
        """The scope of ``/sys/fs/cgroup/<...>/<name>``; it must exist."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cgroup scope {directory}: no such directory")
        mount = mount_containing(directory, cgroup_mounts() if mounts is None else mounts)
        return cls(mount, mount.cgroup_path(directory))

    @property
    def directory(self) -> str:
        found = self.mount.directory(self.path)
        assert found is not None
        return found

    def _contains_path(self, path: str) -> bool:
        base = self.path.rstrip("/")
        return not base or path == base or path.startswith(base + "/")

    def excludes(self, pid: int, procfs: ProcFS) -> str | None:
        for entry in procfs.cgroup(pid):
            if entry_matches(self.mount, entry.hierarchy_id, entry.controllers):
                if self._contains_path(entry.path):
                    return None
                return f"its cgroup {entry.path} is outside {self.describe()}"
        return f"it is in no cgroup of the hierarchy at {self.mount.mountpoint}"

    def describe(self) -> str:
        return f"cgroup {self.directory}"


@attrs.frozen
class SubtreeScope(Scope):
    """A process and its descendants. An orphan re-parented away from the sub-tree leaves it."""

    root_pid: int
    root_start_time: int

    @classmethod
    def of(cls, ref: ProcessRef) -> SubtreeScope:
        return cls(ref.pid, ref.start_time)

    def excludes(self, pid: int, procfs: ProcFS) -> str | None:
        current = pid
        for _ in range(_MAX_ANCESTRY):
            try:
                stat = procfs.stat(current)
            except NoSuchProcess:
                return f"its ancestor {current} vanished while the chain was walked"
            if current == self.root_pid:
                if stat.start_time == self.root_start_time:
                    return None
                return f"PID {current} no longer names the sub-tree's root"
            if stat.ppid <= 0:
                break
            current = stat.ppid
        return f"it does not descend from process {self.root_pid}"

    def describe(self) -> str:
        return f"the process sub-tree of {self.root_pid}"


@attrs.frozen
class SystemScope(Scope):
    """Every process on the host: only for a daemon deployed to guard this machine."""

    def excludes(self, pid: int, procfs: ProcFS) -> str | None:
        return None

    def describe(self) -> str:
        return "the whole system"


# -- the guard -------------------------------------------------------------------------------


def _own_thread_ids() -> frozenset[int]:
    try:
        return frozenset(int(t) for t in os.listdir(f"/proc/{os.getpid()}/task"))
    except OSError:
        return frozenset({os.getpid()})


def _is_scope(_guard: object, _attribute: object, value: Any) -> None:
    if not isinstance(value, Scope):
        raise TypeError(
            f"a KillGuard needs a Scope (CgroupScope, SubtreeScope or SystemScope), not {value!r}"
        )


@attrs.define
class KillGuard:
    """Stands between every action and every signal. See the module docstring."""

    scope: Scope = attrs.field(validator=_is_scope)
    dry_run: bool = attrs.field(default=False, kw_only=True)
    #: Allow victims with ``oom_score_adj == -1000``. Off unless a rule says so explicitly.
    allow_oom_score_adj_min: bool = attrs.field(default=False, kw_only=True)
    procfs: ProcFS = attrs.field(factory=ProcFS, kw_only=True)
    #: How many refusals of each reason so far.
    refusals: collections.Counter[RefusalReason] = attrs.field(
        factory=collections.Counter, init=False
    )

    def check(self, pid: int, start_time: int | None) -> Refusal | None:
        """Whether process ``pid`` (that started at ``start_time``, if known) may be signalled:
        ``None`` if so, else the :class:`Refusal`. Signals nothing."""
        refusal = self._check(pid, start_time)
        if refusal is not None:
            self.refusals[refusal.reason] += 1
            log.warning("%s", refusal, extra={"refusal": refusal})
        return refusal

    def _check(self, pid: int, start_time: int | None) -> Refusal | None:
        def refuse(reason: RefusalReason, detail: str) -> Refusal:
            return Refusal(pid, reason, detail)

        if pid <= 0:
            return refuse(RefusalReason.INVALID_PID, "not a process ID")
        if pid == 1:
            return refuse(RefusalReason.PID_ONE, "init: killing it panics the kernel")
        if pid == os.getpid() or pid in _own_thread_ids():
            return refuse(RefusalReason.REAPER_ITSELF, "the reaper's own process or thread")
        try:
            stat = self.procfs.stat(pid)
            if start_time is not None and stat.start_time != start_time:
                return refuse(
                    RefusalReason.IDENTITY_CHANGED,
                    f"PID reused: started at tick {stat.start_time}, the chosen one at"
                    f" {start_time}",
                )
            if stat.is_kernel_thread or pid == 2 or stat.ppid == 2:
                return refuse(RefusalReason.KERNEL_THREAD, f"kernel thread {stat.comm!r}")
            if not self.allow_oom_score_adj_min:
                adj = self.procfs.oom_score_adj(pid)
                if adj <= OOM_SCORE_ADJ_MIN:
                    return refuse(
                        RefusalReason.OOM_SCORE_ADJ_MIN,
                        f"{stat.comm!r} has oom_score_adj {adj}: the kernel's 'never kill'",
                    )
            why = self.scope.excludes(pid, self.procfs)
            if why is not None:
                return refuse(RefusalReason.OUT_OF_SCOPE, f"{stat.comm!r}: {why}")
        except NoSuchProcess:
            return refuse(RefusalReason.GONE, "it exited before it could be signalled")
        return None

    def send_signal(self, ref: ProcessRef, sig: int = signal.SIGKILL) -> SignalOutcome:
        """Signal the pinned process if the guard allows it.

        Raises :class:`KillRefused` with the reason otherwise. In dry-run mode the checks run
        and are logged, but nothing is sent: returns :attr:`SignalOutcome.DRY_RUN`.
        """
        refusal = self.check(ref.pid, ref.start_time)
        if refusal is not None:
            raise KillRefused(refusal)
        name = signal.Signals(sig).name if sig else "signal 0"
        if self.dry_run:
            log.info("dry-run: would send %s to process %d", name, ref.pid)
            return SignalOutcome.DRY_RUN
        ref.send_signal(sig)
        log.info("sent %s to process %d", name, ref.pid)
        return SignalOutcome.SENT

    def kill_cgroup(self, directory: str, *, max_rounds: int = 16) -> SignalOutcome:
        """SIGKILL every process in a cgroup and its descendants.

        Every member must pass the guard first (a cgroup holding the reaper, PID 1, a kernel
        thread, a protected process or anything out of scope is refused whole). Uses
        ``cgroup.kill`` on v2; elsewhere each member is pinned and signalled through its pidfd,
        again until the cgroup stays empty (members may fork meanwhile).
        """
        members = list(_members(directory))
        for pid in members:
            refusal = self.check(pid, None)
            if refusal is not None and refusal.reason is not RefusalReason.GONE:
                raise KillRefused(
                    attrs.evolve(refusal, detail=f"{refusal.detail}; member of {directory}")
                )
        if self.dry_run:
            log.info("dry-run: would kill cgroup %s (%d processes)", directory, len(members))
            return SignalOutcome.DRY_RUN
        try:
            cgroup_kill(directory)
        except Unsupported:
            # systemd's cg_kill_recursive: repeat until a round finds nobody new (members may
            # fork meanwhile). Never re-check one already killed: once past cgroup_exit() a
            # dying member still listed in cgroup.procs reads as being in the root cgroup.
            signalled: set[int] = set()
            for _ in range(max_rounds):
                new = [pid for pid in _members(directory) if pid not in signalled]
                if not new:
                    break
                for pid in new:
                    signalled.add(pid)
                    try:
                        with ProcessRef.open(pid, procfs=self.procfs) as ref:
                            self.send_signal(ref, signal.SIGKILL)
                    except NoSuchProcess:
                        continue
        log.info("killed cgroup %s", directory)
        return SignalOutcome.SENT


def _members(directory: str) -> Iterator[int]:
    """PIDs in a cgroup directory and every cgroup below it."""
    for dirpath, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs"), encoding="ascii") as f:
                data = f.read()
        except FileNotFoundError:
            continue  # removed while walking
        yield from (int(line) for line in data.split())

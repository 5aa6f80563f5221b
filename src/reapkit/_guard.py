"""The kill guard: the one door between any decision and any signal.

Safety is not a plugin. Every signal reapkit sends goes through :meth:`KillGuard.send_signal`
(or :meth:`KillGuard.kill_cgroup`), which refuses, with a reason that reaches the logs and the
kill records:

* PID 1 and non-positive PIDs (PID 1 of the PID namespace ``/proc`` shows: the host's init,
  or a container's, whose death ends every process in the container, the reaper included);
* reapkit's own process and its threads;
* kernel threads, told by ``PF_KTHREAD`` in ``stat``'s flags, never by a PID number (in a PID
  namespace PID 2 and its children are ordinary processes);
* every process, when ``/proc`` shows another PID namespace than the reaper's: PIDs there do
  not name what a pidfd would reach;
* ``oom_score_adj == -1000`` (the kernel's own "never kill"), unless explicitly allowed;
* anything outside the configured scope (a cgroup sub-tree, a process sub-tree, or the whole
  system when an operator says so);
* anything whose identity changed since it was chosen (PID reuse: another start time);
* anything it cannot read well enough to decide (``/proc`` unreadable or garbled);

and it enforces dry-run: in dry-run mode nothing is ever signalled. A guard that reads a
``/proc`` other than the real one (a fake tree in a test) is always in dry-run mode: what it
approved would not be what a signal reaches.
"""

from __future__ import annotations

import abc
import collections
import enum
import logging
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from ._errors import (
    AccessDenied,
    InvalidValue,
    NoSuchProcess,
    ProcFormatError,
    ReapkitError,
    Unsupported,
)
from ._kernel._cgroups import CgroupMount, cgroup_mounts, entry_matches, mount_containing
from ._kernel._syscalls import cgroup_kill
from ._process import ProcessRef
from ._procfs import (
    DEAD_STATES,
    OOM_SCORE_ADJ_MIN,
    PF_EXITING,
    REAL_PROC,
    ProcFS,
    frozen_mapping,
    in_subtree,
)

log = logging.getLogger("reapkit.guard")


class RefusalReason(enum.Enum):
    """Why the guard refused; the value is what logs and kill records show."""

    INVALID_PID = "invalid-pid"
    PID_ONE = "pid-1"
    REAPER_ITSELF = "reaper-itself"
    KERNEL_THREAD = "kernel-thread"
    #: ``/proc`` shows another PID namespace than the reaper's (``/proc/self`` is not getpid()).
    FOREIGN_PID_NAMESPACE = "foreign-pid-namespace"
    OOM_SCORE_ADJ_MIN = "oom-score-adj-min"
    OUT_OF_SCOPE = "out-of-scope"
    IDENTITY_CHANGED = "identity-changed"
    GONE = "gone"
    UNREADABLE = "unreadable"
    #: The rule's own protections (``protect``) spare it: used by whole-cgroup kills.
    PROTECTED = "protected"


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
    """What the guard did with an allowed signal."""

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
    path: str = attrs.field()

    @path.validator
    def _not_the_root(self, _attribute: object, value: str) -> None:
        if value.rstrip("/") in ("", self.mount.root.rstrip("/")):
            raise InvalidValue(
                f"a cgroup scope at the root of {self.mount.mountpoint} is the whole system:"
                " say SystemScope() explicitly"
            )

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

    def contains_path(self, path: str) -> bool:
        """Whether cgroup ``path`` (of this hierarchy) is this scope's cgroup or below it."""
        base = self.path.rstrip("/")
        return path == base or path.startswith(base + "/")

    def excludes(self, pid: int, procfs: ProcFS) -> str | None:
        for entry in procfs.cgroup(pid):
            if entry_matches(self.mount, entry.hierarchy_id, entry.controllers):
                if self.contains_path(entry.path):
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
        try:
            if in_subtree(pid, self.root_pid, lambda p: procfs.stat(p).ppid, {}):
                if procfs.stat(self.root_pid).start_time == self.root_start_time:
                    return None
                return f"PID {self.root_pid} no longer names the sub-tree's root"
        except NoSuchProcess as exc:
            return f"its ancestor {exc.pid} vanished while the chain was walked"
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
        return frozenset(int(t) for t in os.listdir(f"{REAL_PROC}/self/task"))
    except OSError:
        return frozenset({os.getpid()})


def _foreign_pid_namespace(procfs: ProcFS) -> str | None:
    """Why ``procfs`` (the real ``/proc``) does not show the reaper's own PID namespace, or
    ``None`` if it does. ``/proc/self`` names the reaper as that procfs's namespace sees it."""
    if not procfs.is_real:
        return None  # a fake tree: never signalled through anyway
    try:
        seen = os.readlink(f"{REAL_PROC}/self")
    except OSError:
        seen = "absent"  # a procfs of a namespace the reaper is not in
    if seen == str(os.getpid()):
        return None
    return (
        f"{REAL_PROC} shows another PID namespace than the reaper's ({REAL_PROC}/self is"
        f" {seen}, getpid() {os.getpid()}): mount the reaper's own procfs"
    )


def _is_scope(_guard: object, _attribute: object, value: Any) -> None:
    if not isinstance(value, Scope):
        raise TypeError(
            f"a KillGuard needs a Scope (CgroupScope, SubtreeScope or SystemScope), not {value!r}"
        )


@attrs.frozen
class GuardStatistics:
    refusals: Mapping[str, int] = attrs.field(converter=frozen_mapping)
    signals_sent: int
    dry_runs: int


@attrs.define(on_setattr=attrs.setters.frozen)
class KillGuard:
    """Stands between every action and every signal. See the module docstring.

    Its settings cannot be changed once made: a new policy makes a new guard.
    """

    scope: Scope = attrs.field(validator=_is_scope)
    dry_run: bool = attrs.field(default=False, kw_only=True)
    #: Allow victims with ``oom_score_adj == -1000``. Off unless a rule says so explicitly.
    allow_oom_score_adj_min: bool = attrs.field(default=False, kw_only=True)
    procfs: ProcFS = attrs.field(factory=ProcFS, kw_only=True)
    _refusals: collections.Counter[RefusalReason] = attrs.field(
        factory=collections.Counter, init=False
    )
    _counts: list[int] = attrs.field(factory=lambda: [0, 0], init=False)  # sent, dry runs
    _foreign: str | None = attrs.field(
        default=attrs.Factory(lambda guard: _foreign_pid_namespace(guard.procfs), takes_self=True),
        init=False,
    )

    @property
    def signals_enabled(self) -> bool:
        """False in dry-run mode, and always when reading a /proc other than the real one."""
        return not self.dry_run and self.procfs.is_real

    def statistics(self) -> GuardStatistics:
        return GuardStatistics(
            {r.value: n for r, n in self._refusals.items()}, self._counts[0], self._counts[1]
        )

    def check(self, pid: int, start_time: int | None) -> Refusal | None:
        """Whether process ``pid`` (that started at ``start_time``, if known) may be signalled:
        ``None`` if so, else the :class:`Refusal`. Signals nothing, logs only at debug level
        (selectors may call it for every candidate)."""
        refusal = self._check(pid, start_time)
        if refusal is not None:
            log.debug("%s", refusal)
        return refusal

    def _refuse(self, refusal: Refusal) -> KillRefused:
        self._refusals[refusal.reason] += 1
        log.warning("%s", refusal, extra={"refusal": refusal})
        return KillRefused(refusal)

    def _check(self, pid: int, start_time: int | None) -> Refusal | None:
        def refuse(reason: RefusalReason, detail: str) -> Refusal:
            return Refusal(pid, reason, detail)

        if pid <= 0:
            return refuse(RefusalReason.INVALID_PID, "not a process ID")
        if self._foreign is not None:
            return refuse(RefusalReason.FOREIGN_PID_NAMESPACE, self._foreign)
        if pid == 1:
            return refuse(
                RefusalReason.PID_ONE, "init: killing it panics the kernel or ends the container"
            )
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
            if stat.state in DEAD_STATES or stat.flags & PF_EXITING:
                # Already on its way out; past cgroup_exit() it even reads as being in the
                # root cgroup, so a scope check would misjudge it.
                return refuse(RefusalReason.GONE, f"{stat.comm!r} is already exiting")
            if stat.is_kernel_thread:
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
        except (ProcFormatError, AccessDenied) as exc:
            return refuse(RefusalReason.UNREADABLE, f"cannot decide: {exc}")
        return None

    def send_signal(self, ref: ProcessRef, sig: int) -> SignalOutcome:
        """Signal the pinned process if the guard allows it.

        Raises :class:`KillRefused` with the reason otherwise. In dry-run mode the checks run
        and are logged, but nothing is sent: returns :attr:`SignalOutcome.DRY_RUN`.
        """
        refusal = self._check(ref.pid, ref.start_time)
        if refusal is not None:
            raise self._refuse(refusal)
        name = signal.Signals(sig).name if sig else "signal 0"
        if not self.signals_enabled:
            self._counts[1] += 1
            log.info("dry-run: would send %s to process %d", name, ref.pid)
            return SignalOutcome.DRY_RUN
        ref.send_signal(sig)
        self._counts[0] += 1
        log.info("sent %s to process %d", name, ref.pid)
        return SignalOutcome.SENT

    def kill_cgroup(self, directory: str, *, max_rounds: int = 16) -> SignalOutcome:
        """SIGKILL every process in a cgroup and its descendants.

        Every member must pass the guard first: a cgroup holding PID 1, a kernel thread, a
        protected process or anything out of scope is refused whole (members already exiting
        are skipped). ``cgroup.kill`` (v2) is used only when the whole directory lies inside a
        :class:`CgroupScope` of the same hierarchy (or the scope is the system) and the reaper
        is not inside it: ``cgroup.kill`` reaches whoever is in the cgroup at that moment, so
        only a scope that contains every possible member may use it. Otherwise each member is
        pinned and signalled through its pidfd, round after round until no new one appears.
        """
        if self._foreign is not None:
            raise self._refuse(Refusal(0, RefusalReason.FOREIGN_PID_NAMESPACE, self._foreign))
        for pid in cgroup_members(directory):
            refusal = self._check(pid, None)
            if refusal is not None and refusal.reason is not RefusalReason.GONE:
                refusal = attrs.evolve(refusal, detail=f"{refusal.detail}; member of {directory}")
                raise self._refuse(refusal)
        if not self.signals_enabled:
            self._counts[1] += 1
            log.info("dry-run: would kill cgroup %s", directory)
            return SignalOutcome.DRY_RUN
        if self._may_use_cgroup_kill(directory):
            try:
                cgroup_kill(directory)
            except Unsupported:
                pass
            else:
                self._counts[0] += 1
                log.info("killed cgroup %s through cgroup.kill", directory)
                return SignalOutcome.SENT
        self._kill_members(directory, max_rounds)
        log.info("killed cgroup %s member by member", directory)
        return SignalOutcome.SENT

    def _may_use_cgroup_kill(self, directory: str) -> bool:
        try:
            mount = mount_containing(directory, cgroup_mounts())
        except (ValueError, OSError):
            return False
        if mount.version != 2:
            return False
        path = mount.cgroup_path(directory)
        if isinstance(self.scope, CgroupScope):
            if self.scope.mount.mountpoint != mount.mountpoint or not self.scope.contains_path(
                path
            ):
                return False
        elif not isinstance(self.scope, SystemScope):
            return False
        # Never when the reaper itself is inside: cgroup.kill would take it along.
        own = [
            e.path
            for e in ProcFS().cgroup(os.getpid())
            if entry_matches(mount, e.hierarchy_id, e.controllers)
        ]
        return not any(p == path or p.startswith(path.rstrip("/") + "/") for p in own)

    def _kill_members(self, directory: str, max_rounds: int) -> None:
        # systemd's cg_kill_recursive: repeat until a round finds nobody new (members may fork
        # meanwhile). Never re-check one already killed: it is exiting.
        signalled: set[int] = set()
        for _ in range(max_rounds):
            new = [pid for pid in cgroup_members(directory) if pid not in signalled]
            if not new:
                return
            for pid in new:
                signalled.add(pid)
                try:
                    with ProcessRef.open(pid, procfs=self.procfs) as ref:
                        self.send_signal(ref, signal.SIGKILL)
                except NoSuchProcess:
                    continue
                except KillRefused as exc:
                    if exc.refusal.reason not in (
                        RefusalReason.GONE,
                        RefusalReason.IDENTITY_CHANGED,
                    ):
                        raise


def cgroup_members(directory: str) -> Iterator[int]:
    """PIDs in a cgroup directory and every cgroup below it."""
    for dirpath, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue  # removed while walking
        yield from map(int, data.split())

"""The reap stage: a small pool of dedicated OS threads that call ``process_mrelease``.

``process_mrelease`` does its work in the *caller's* context: with the caller's CPU affinity,
scheduling policy, nice value and CPU time (``shared/KERNEL_NOTES.md``). So the reaps do not run
on the trio thread, nor on trio's shared worker threads, but on N threads of their own, each of
which pins itself and sets its own priority when it starts (Android's lmkd: 2 reaper threads,
``SCHED_OTHER`` nice -20). Work goes in through a thread-safe queue; results come back through
the trio token, so the trio loop never blocks on a reap (ctypes releases the GIL during the
system call).

Work is only ever handed to a reaper that is free: there is no backlog. When every reaper is
busy, :meth:`ReapStage.reap_nowait` refuses (``trio.WouldBlock``; :meth:`ReapStage.reap_or_skip`
returns ``None``) and the caller kills without reaping — the victim frees its own memory as it
exits — which lmkd does too; those refusals are counted (``busy_skips``).
:meth:`ReapStage.reap` instead waits for a free reaper.

A reap in progress cannot be interrupted: the system call runs to its end. Cancelling a waiter
never abandons the call half-way; the thread finishes it, the result is counted and logged,
and the pidfd duplicate the thread owns is closed by the thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Final, Literal, NoReturn, TypeAlias

import attrs
import trio

from ._errors import AccessDenied, InvalidValue, NotDying, Unsupported
from ._kernel._syscalls import MreleaseOutcome, process_mrelease
from ._process import ProcessRef

log = logging.getLogger("reapkit.reap")

SchedPolicy: TypeAlias = Literal["other", "batch", "idle", "fifo", "rr"]
ReapOutcome: TypeAlias = Literal["reaped", "already-freed", "not-dying", "unsupported", "failed"]

_POLICIES: Final[dict[str, int]] = {
    "other": os.SCHED_OTHER,
    "batch": os.SCHED_BATCH,
    "idle": os.SCHED_IDLE,
    "fifo": os.SCHED_FIFO,
    "rr": os.SCHED_RR,
}
_POLICY_NAMES: Final[dict[int, str]] = {number: name for name, number in _POLICIES.items()}
_REALTIME: Final = frozenset({"fifo", "rr"})
#: Policies under which a nice value changes nothing (real-time ones ignore it; SCHED_IDLE
#: runs at the lowest weight whatever the nice value).
_NICE_IGNORED: Final = frozenset({"fifo", "rr", "idle"})
_SCHED_RESET_ON_FORK: Final = getattr(os, "SCHED_RESET_ON_FORK", 0x40000000)

#: ``EAGAIN`` (part of the address space could not be reaped, an mmu notifier refused) is
#: retried this many times; the wrapper's own retry is switched off so attempts can be counted.
EAGAIN_RETRIES: Final = 1
THREAD_NAME_PREFIX: Final = "reapkit-reaper-"

_libc = ctypes.CDLL(None, use_errno=True)
_sched_getcpu = _libc.sched_getcpu
_sched_getcpu.argtypes = []
_sched_getcpu.restype = ctypes.c_int


def current_cpu() -> int:
    """The CPU the calling thread runs on now (``sched_getcpu(3)``), ``-1`` if unknown."""
    cpu: int = _sched_getcpu()
    return cpu if cpu >= 0 else -1


# -- settings ------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fmt_cpus(cpus: Iterable[int]) -> str:
    return "{" + ", ".join(str(c) for c in sorted(cpus)) + "}"


def _to_cpus(value: Iterable[int] | None) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        raise InvalidValue(f"cpus must be a set of CPU numbers, not {value!r}")
    try:
        return frozenset(value)
    except TypeError:
        raise InvalidValue(f"cpus must be a set of CPU numbers, not {value!r}") from None


#: The most reaper threads a stage may have (lmkd runs 2; each is an OS thread and a stack).
MAX_THREADS: Final = 64


def _check_threads(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if not _is_int(value) or not 1 <= value <= MAX_THREADS:
        raise InvalidValue(f"threads must be an integer within 1..{MAX_THREADS}, not {value!r}")


def _check_cpus(
    _inst: object, _attr: attrs.Attribute[frozenset[int] | None], value: frozenset[int] | None
) -> None:
    if value is None:
        return
    if not value:
        raise InvalidValue("cpus must name at least one CPU (or be left unset to inherit)")
    bad = [c for c in value if not _is_int(c) or c < 0]
    if bad:
        raise InvalidValue(f"cpus must be CPU numbers >= 0, not {bad[0]!r}")


def _check_nice(_inst: object, _attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (not _is_int(value) or not -20 <= value <= 19):
        raise InvalidValue(f"nice must be an integer within -20..19, not {value!r}")


def _check_policy(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or value not in _POLICIES:
        raise InvalidValue(f"policy must be one of {', '.join(_POLICIES)}, not {value!r}")


def _check_priority(inst: ReapSettings, _attr: attrs.Attribute[int], value: int) -> None:
    # attrs runs validators after every field is set: the policy is known here.
    if not _is_int(value):
        raise InvalidValue(f"priority must be an integer, not {value!r}")
    if inst.policy in _REALTIME:
        if not 1 <= value <= 99:
            raise InvalidValue(
                f"priority must be within 1..99 for policy {inst.policy!r}, not {value!r}"
            )
    elif value != 0:
        raise InvalidValue(
            f"priority must be 0 for policy {inst.policy!r}, not {value!r}: only 'fifo' and"
            " 'rr' take a real-time priority (use nice for the others)"
        )
    if inst.nice is not None and inst.policy in _NICE_IGNORED:
        raise InvalidValue(
            f"nice has no effect under policy {inst.policy!r}: leave nice unset, or use policy"
            " 'other' or 'batch'"
        )


@attrs.frozen(kw_only=True)
class ReapSettings:
    """How the reaper threads run. Every error names the option it is about.

    ``cpus=None`` and ``nice=None`` inherit from the thread that starts the stage. ``policy``
    is always applied (``"other"`` also takes threads out of a real-time policy the process
    may run under). A negative ``nice`` or a real-time ``policy`` (``"fifo"``, ``"rr"``, with a
    ``priority`` of 1..99) needs ``CAP_SYS_NICE``; without it the stage refuses to start with
    :class:`~reapkit.AccessDenied`.
    """

    #: Number of reaper threads: how many reaps can run at once (lmkd: 2).
    threads: int = attrs.field(default=2, validator=_check_threads)
    #: CPUs each reaper thread pins itself to; ``None``: inherit.
    cpus: frozenset[int] | None = attrs.field(
        default=None, converter=_to_cpus, validator=_check_cpus
    )
    #: Nice value of each reaper thread (-20..19); ``None``: inherit.
    nice: int | None = attrs.field(default=None, validator=_check_nice)
    #: Scheduling policy of each reaper thread.
    policy: SchedPolicy = attrs.field(default="other", validator=_check_policy)
    #: Real-time priority for ``"fifo"`` and ``"rr"`` (1..99); 0 for the other policies.
    priority: int = attrs.field(default=0, validator=_check_priority)


# -- records -------------------------------------------------------------------------------


@attrs.frozen
class ReaperThread:
    """What one reaper thread read back about itself, from inside itself, once its settings
    were applied (so it shows what the kernel really granted: a cpuset can narrow ``cpus``)."""

    name: str
    native_id: int
    cpus: frozenset[int]
    nice: int
    policy: str
    priority: int


@attrs.frozen
class ReapResult:
    """One ``process_mrelease`` call (with its ``EAGAIN`` retry) on a reaper thread.

    ``started`` and ``finished`` are on the trio clock (``trio.current_time()``), like every
    timestamp of a :class:`~reapkit.KillRecord`.
    """

    pid: int
    #: ``"reaped"``: the memory was stripped now (or a reap was already done);
    #: ``"already-freed"``: ``ESRCH``, the process had gone past freeing its memory, or was
    #: waited for; ``"not-dying"``: ``EINVAL``, no SIGKILL was pending (or the memory is shared
    #: with a live process); ``"unsupported"``: ``ENOSYS`` (Linux < 5.15) or ``EPERM``
    #: (seccomp); ``"failed"``: anything else, e.g. ``EAGAIN`` after the retry.
    outcome: ReapOutcome
    #: Why it was not ``"reaped"``/``"already-freed"``; ``None`` for those two.
    error: str | None
    started: float
    finished: float
    #: Name of the reaper thread that made the call.
    thread: str
    #: CPU the thread was on when the call returned (-1 if unknown).
    cpu: int
    #: Calls made: 1, or 2 after an ``EAGAIN``.
    attempts: int

    @property
    def duration(self) -> float:
        return self.finished - self.started


@attrs.frozen
class ReapStatistics:
    """A snapshot of the stage's counters."""

    #: Reaper threads running now.
    threads: int
    #: Reaps in progress now.
    busy: int
    reaped: int
    already_freed: int
    not_dying: int
    failed: int
    unsupported: int
    #: Reaps refused by :meth:`ReapStage.reap_nowait` because every reaper was busy.
    busy_skips: int


@attrs.define(eq=False)
class PendingReap:
    """A reap handed to a reaper thread by :meth:`ReapStage.reap_nowait`."""

    pid: int
    #: When it was handed over (trio clock).
    submitted: float
    _result: ReapResult | None = attrs.field(default=None, init=False)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)
    _abandoned: bool = attrs.field(default=False, init=False, repr=False)

    @property
    def result(self) -> ReapResult | None:
        """The result, once the thread has reported it; ``None`` before."""
        return self._result

    async def wait(self) -> ReapResult:
        """Wait for the result. Cancelling this wait does not stop the reap (it cannot be
        interrupted); the result still arrives in :attr:`result` and the statistics."""
        await self._done.wait()
        assert self._result is not None
        return self._result


# -- the stage -----------------------------------------------------------------------------


@attrs.frozen
class _Job:
    pid: int
    #: A duplicate of the ref's pidfd, owned (and closed) by the reaper thread: closing the
    #: ProcessRef meanwhile cannot make the thread use a number reused for another file.
    pidfd: int
    pending: PendingReap


@attrs.frozen
class _Done:
    outcome: ReapOutcome
    error: str | None
    started: float  # time.monotonic()
    finished: float  # time.monotonic()
    cpu: int
    attempts: int


@attrs.define(eq=False)
class _Worker:
    name: str
    thread: threading.Thread
    info: ReaperThread | None = None
    exited: bool = False
    #: The pid being reaped now. Written by the thread itself; read only for the shutdown
    #: warning.
    current_pid: int | None = None


_State: TypeAlias = Literal["new", "starting", "running", "closed"]


def _apply(settings: ReapSettings, name: str) -> ReaperThread:
    """Apply ``settings`` to the *calling* thread and read back what it got.

    On Linux ``sched_setaffinity(0)``, ``sched_setscheduler(0)`` and ``setpriority`` with a
    thread ID act on one thread, not on the whole process.
    """
    tid = threading.get_native_id()
    if settings.cpus is not None:
        try:
            os.sched_setaffinity(0, settings.cpus)
        except PermissionError as exc:
            raise AccessDenied(
                None, f"cpus={_fmt_cpus(settings.cpus)}: pinning the reaper thread: {exc.strerror}"
            ) from None
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise InvalidValue(
                f"cpus={_fmt_cpus(settings.cpus)}: none of these CPUs is online and allowed to"
                f" this process (it may use {_fmt_cpus(os.sched_getaffinity(0))})"
            ) from None
    try:
        os.sched_setscheduler(0, _POLICIES[settings.policy], os.sched_param(settings.priority))
    except PermissionError:
        if settings.policy in _REALTIME:
            why = (
                f"policy={settings.policy!r} priority={settings.priority} for the reaper threads"
                f" needs CAP_SYS_NICE (or an RLIMIT_RTPRIO of at least {settings.priority}), and"
                " real-time runtime in its cgroup v1 cpu controller (cpu.rt_runtime_us > 0)"
            )
        else:
            why = (
                f"policy={settings.policy!r} for the reaper threads needs CAP_SYS_NICE here"
                " (leaving SCHED_IDLE or a real-time policy is privileged beyond RLIMIT_NICE)"
            )
        raise AccessDenied(None, why) from None
    if settings.nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, settings.nice)
        except PermissionError:
            raise AccessDenied(
                None,
                f"nice={settings.nice} for the reaper threads needs CAP_SYS_NICE (or an"
                f" RLIMIT_NICE of at least {20 - settings.nice}): lowering a nice value is"
                " privileged",
            ) from None
    policy = os.sched_getscheduler(0) & ~_SCHED_RESET_ON_FORK
    return ReaperThread(
        name=name,
        native_id=tid,
        cpus=frozenset(os.sched_getaffinity(0)),
        nice=os.getpriority(os.PRIO_PROCESS, tid),
        policy=_POLICY_NAMES.get(policy, f"policy {policy}"),
        priority=os.sched_getparam(0).sched_priority,
    )


def _mrelease(pidfd: int, pid: int) -> tuple[ReapOutcome, str | None, int]:
    """Call ``process_mrelease`` with its ``EAGAIN`` retry; (outcome, error, attempts)."""
    attempts = 0
    try:
        while True:
            attempts += 1
            try:
                done = process_mrelease(pidfd, eagain_retries=0, pid=pid)
            except BlockingIOError:
                if attempts <= EAGAIN_RETRIES:
                    continue
                raise
            if done is MreleaseOutcome.REAPED:
                return "reaped", None, attempts
            return "already-freed", None, attempts
    except NotDying as exc:
        return "not-dying", str(exc), attempts
    except Unsupported as exc:
        return "unsupported", str(exc), attempts
    except BlockingIOError:
        return (
            "failed",
            f"process_mrelease: part of the address space of process {pid} could not be"
            f" reaped (EAGAIN) in {attempts} attempts",
            attempts,
        )
    except OSError as exc:
        return "failed", f"process_mrelease of process {pid}: {exc}", attempts
    except Exception as exc:  # a bug, not the kernel: still report, never kill the thread
        log.exception("reaping process %d failed unexpectedly", pid)
        return "failed", f"process_mrelease of process {pid}: {exc!r}", attempts


def _check_timeout(_inst: object, _attr: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e9:
        raise InvalidValue(f"shutdown_timeout must be a number of seconds >= 0, not {value!r}")


@attrs.define(eq=False)
class ReapStage:
    """The pinned ``process_mrelease`` thread pool. Run it with
    ``stage = await nursery.start(ReapStage(settings).serve)``.

    Only reap a victim that was sent SIGKILL: ``process_mrelease`` refuses any other (the
    result says ``"not-dying"``; nothing is raised).

    A reap in progress cannot be interrupted, neither by cancelling the task that waits for
    it nor by shutting the stage down: the thread finishes the call, then counts and logs its
    result. Shutdown waits up to ``shutdown_timeout`` seconds for that, then logs a warning
    and leaves the thread to finish on its own (the threads are not daemons, so the
    interpreter waits for them at exit rather than kill one inside the kernel).
    """

    settings: ReapSettings = attrs.field(
        factory=ReapSettings, validator=attrs.validators.instance_of(ReapSettings)
    )
    #: Seconds that shutdown waits for the threads to stop.
    shutdown_timeout: float = attrs.field(default=5.0, kw_only=True, validator=_check_timeout)
    _state: _State = attrs.field(default="new", init=False)
    _workers: list[_Worker] = attrs.field(factory=list, init=False, repr=False)
    _jobs: queue.SimpleQueue[_Job | None] = attrs.field(
        factory=queue.SimpleQueue, init=False, repr=False
    )
    _in_flight: int = attrs.field(default=0, init=False)
    _slot_freed: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, init=False, repr=False
    )
    _reports: int = attrs.field(default=0, init=False, repr=False)
    _startup_errors: list[BaseException] = attrs.field(factory=list, init=False, repr=False)
    _started: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)
    _all_exited: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)
    _counts: dict[ReapOutcome, int] = attrs.field(
        factory=lambda: dict.fromkeys(
            ("reaped", "already-freed", "not-dying", "unsupported", "failed"), 0
        ),
        init=False,
        repr=False,
    )
    _busy_skips: int = attrs.field(default=0, init=False)

    # -- serving ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[ReapStage] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Start the threads and serve until cancelled.

        ``task_status.started(self)`` comes only once every thread runs with its settings
        applied. If a thread cannot apply them, all are stopped and the error is raised:
        :class:`~reapkit.AccessDenied` naming the option and the capability, or
        :class:`~reapkit.InvalidValue` for CPUs that cannot be used. On cancellation, stop
        taking work, stop the threads (bounded by ``shutdown_timeout``) and re-raise.
        """
        if self._state != "new":
            raise RuntimeError("a ReapStage serves once: create a new one")
        self._state = "starting"
        token = trio.lowlevel.current_trio_token()
        try:
            self._start_threads(token)
            await self._started.wait()
            if self._startup_errors:
                raise self._startup_errors[0]
            self._state = "running"
            s = self.settings
            log.info(
                "reap stage: %d thread(s), cpus %s, policy %s%s, nice %s",
                len(self._workers),
                "inherited" if s.cpus is None else _fmt_cpus(s.cpus),
                s.policy,
                f" priority {s.priority}" if s.policy in _REALTIME else "",
                "inherited" if s.nice is None else s.nice,
            )
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            self._state = "closed"
            self._slot_freed.unpark_all()  # reap() waiters see the stage closed
            for _ in self._workers:
                self._jobs.put(None)  # one sentinel each, after any job already handed over
            deadline = time.monotonic() + self.shutdown_timeout
            with trio.move_on_after(self.shutdown_timeout, shield=True):
                await self._all_exited.wait()
            self._join(deadline)

    def _start_threads(self, token: trio.lowlevel.TrioToken) -> None:
        for i in range(self.settings.threads):
            name = f"{THREAD_NAME_PREFIX}{i}"
            thread = threading.Thread(
                target=self._thread_main, name=name, daemon=False, args=(i, token)
            )
            worker = _Worker(name, thread)
            self._workers.append(worker)
            try:
                thread.start()
            except RuntimeError as exc:  # "can't start new thread"
                self._workers.pop()
                self._startup_errors.append(
                    RuntimeError(f"reap stage: cannot start reaper thread {name}: {exc}")
                )
                break
        if not self._workers:
            self._all_exited.set()
        # The threads' reports are callbacks on this (trio) thread: none has run yet, so the
        # count below and in _on_started compares against the final number of workers.
        if self._reports == len(self._workers):
            self._started.set()

    def _join(self, deadline: float) -> None:
        stuck = []
        for worker in self._workers:
            if worker.exited:
                # It reported its exit as its last act: joining takes microseconds.
                worker.thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
            if worker.thread.is_alive():
                stuck.append(worker)
        for worker in stuck:
            pid = worker.current_pid
            log.warning(
                "reaper thread %s did not stop within %s s: %s; it exits on its own when that"
                " returns (the interpreter waits for it at exit)",
                worker.name,
                self.shutdown_timeout,
                "it is inside process_mrelease, which cannot be interrupted"
                if pid is None
                else f"it is inside process_mrelease for process {pid}, which cannot be"
                " interrupted",
            )

    # -- the threads -----------------------------------------------------------------------

    def _thread_main(self, index: int, token: trio.lowlevel.TrioToken) -> None:
        worker = self._workers[index]
        try:
            try:
                info = _apply(self.settings, worker.name)
            except BaseException as exc:
                _report(token, self._on_started, worker, None, exc)
                return
            _report(token, self._on_started, worker, info, None)
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                worker.current_pid = job.pid
                started = time.monotonic()
                try:
                    outcome, error, attempts = _mrelease(job.pidfd, job.pid)
                finally:
                    finished = time.monotonic()
                    os.close(job.pidfd)
                    worker.current_pid = None
                done = _Done(outcome, error, started, finished, current_cpu(), attempts)
                _report(token, self._on_done, worker, job, done)
        finally:
            _report(token, self._on_exit, worker)

    # Callbacks run on the trio thread through the token (as a system task: never raise).

    def _on_started(
        self, worker: _Worker, info: ReaperThread | None, exc: BaseException | None
    ) -> None:
        self._reports += 1
        if exc is not None:
            self._startup_errors.append(exc)
            log.debug("reaper thread %s could not apply its settings: %s", worker.name, exc)
        else:
            worker.info = info
            cpus = self.settings.cpus
            if info is not None and cpus is not None and info.cpus != cpus:
                log.warning(
                    "reaper thread %s asked for cpus %s and got %s (a cpuset limits this process)",
                    worker.name,
                    _fmt_cpus(cpus),
                    _fmt_cpus(info.cpus),
                )
        if self._reports == len(self._workers):
            self._started.set()

    def _on_done(self, worker: _Worker, job: _Job, done: _Done) -> None:
        try:
            # trio's SystemClock has a random offset on purpose: translate, do not mix.
            offset = time.monotonic() - trio.current_time()
            result = ReapResult(
                pid=job.pid,
                outcome=done.outcome,
                error=done.error,
                started=done.started - offset,
                finished=done.finished - offset,
                thread=worker.name,
                cpu=done.cpu,
                attempts=done.attempts,
            )
            self._counts[result.outcome] += 1
            pending = job.pending
            pending._result = result
            pending._done.set()
            level = logging.INFO if pending._abandoned else logging.DEBUG
            log.log(
                level,
                "reap of process %d%s: %s in %.1f ms on %s (cpu %d, %d attempt(s))%s",
                job.pid,
                " (its waiter was cancelled)" if pending._abandoned else "",
                result.outcome,
                result.duration * 1000,
                result.thread,
                result.cpu,
                result.attempts,
                f": {result.error}" if result.error else "",
            )
        except Exception:  # pragma: no cover - a bug; must not crash the trio run
            log.exception("reap stage: handling a result failed")
        finally:
            self._in_flight -= 1
            self._slot_freed.unpark()

    def _on_exit(self, worker: _Worker) -> None:
        worker.exited = True
        if self._state == "running":  # pragma: no cover - every error is caught in the thread
            log.error("reaper thread %s exited while the stage runs", worker.name)
        if all(w.exited for w in self._workers):
            self._all_exited.set()

    # -- reaping ---------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state == "closed":
            raise trio.ClosedResourceError("the reap stage was shut down")
        if self._state != "running":
            raise RuntimeError(
                "the reap stage is not running: start it with `await nursery.start(stage.serve)`"
            )

    def _submit(self, ref: ProcessRef) -> PendingReap:
        fd = os.dup(ref.fileno())  # non-inheritable (PEP 446), like the original
        pending = PendingReap(ref.pid, trio.current_time())
        self._in_flight += 1
        self._jobs.put(_Job(ref.pid, fd, pending))
        return pending

    def reap_nowait(self, ref: ProcessRef) -> PendingReap:
        """Hand ``ref``'s process to a free reaper thread now; never waits.

        The caller must have sent SIGKILL. Raises ``trio.WouldBlock`` if every reaper is busy
        (counted as ``busy_skips``: kill without reaping, as lmkd does),
        ``trio.ClosedResourceError`` once the stage was shut down, ``ValueError`` if ``ref``
        is closed. ``await pending.wait()`` for the :class:`ReapResult`.
        """
        self._check_running()
        if self._in_flight >= len(self._workers):
            self._busy_skips += 1
            raise trio.WouldBlock(f"all {len(self._workers)} reaper threads are busy")
        return self._submit(ref)

    async def reap_or_skip(self, ref: ProcessRef) -> ReapResult | None:
        """:meth:`reap_nowait` and wait for the result; ``None`` if every reaper was busy
        (counted). The engine's path: a kill never waits for a reaper to become free."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            pending = self.reap_nowait(ref)
        except trio.WouldBlock:
            log.info("every reaper thread is busy: process %d is killed without reaping", ref.pid)
            return None
        return await self._wait(pending)

    async def reap(self, ref: ProcessRef) -> ReapResult:
        """Reap ``ref``'s process on a reaper thread, waiting for one to be free first.

        The caller must have sent SIGKILL: a process that is not dying gives the outcome
        ``"not-dying"``, nothing is raised for what the kernel answers. The thread gets a
        duplicate of the pidfd, so ``ref`` may be closed meanwhile.

        Cancellation: waiting for a free thread is simply abandoned. Once handed over, the
        call cannot be interrupted; cancelling stops the *wait* only: the thread finishes,
        and its result is counted in :meth:`statistics` and logged, not returned.
        Raises ``trio.ClosedResourceError`` if the stage shuts down first.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_running()
            if self._in_flight < len(self._workers):
                break
            await self._slot_freed.park()
        return await self._wait(self._submit(ref))

    async def _wait(self, pending: PendingReap) -> ReapResult:
        try:
            return await pending.wait()
        finally:
            if pending.result is None:
                pending._abandoned = True
                log.info(
                    "waiting for the reap of process %d was cancelled: the reaper thread"
                    " finishes the call (it cannot be interrupted) and its result is logged",
                    pending.pid,
                )

    # -- introspection ---------------------------------------------------------------------

    def thread_info(self) -> tuple[ReaperThread, ...]:
        """What each running reaper thread read back about itself after applying the
        settings (affinity, nice, policy, priority), from inside itself."""
        return tuple(w.info for w in self._workers if w.info is not None and not w.exited)

    def statistics(self) -> ReapStatistics:
        return ReapStatistics(
            threads=sum(1 for w in self._workers if w.info is not None and not w.exited),
            busy=self._in_flight,
            reaped=self._counts["reaped"],
            already_freed=self._counts["already-freed"],
            not_dying=self._counts["not-dying"],
            failed=self._counts["failed"],
            unsupported=self._counts["unsupported"],
            busy_skips=self._busy_skips,
        )


def _report(token: trio.lowlevel.TrioToken, fn: Callable[..., object], *args: object) -> None:
    """Hand ``fn(*args)`` to the trio thread; never blocks. Once the run has ended nobody is
    left to tell: the report is dropped (and logged)."""
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        log.info("reap stage: the trio run has ended; %s%r is dropped", fn.__name__, args)

"""The reap stage's machinery: real threads, a faked ``process_mrelease``.

The system call is replaced (``reapkit._reap_stage.process_mrelease``) so that a reaper can be held
busy deterministically and every kernel answer can be produced; the threads, their settings,
the queue and the trio token are real. Nothing here needs root: the settings applied are
ones any process may take (a CPU it already has, a higher nice value). The pidfds are of this
test process itself, which the fake never touches.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from reapkit import (
    AccessDenied,
    InvalidValue,
    NotDying,
    ProcessRef,
    ReapkitError,
    Unsupported,
    _reap_stage,
)
from reapkit._reap_stage import (
    THREAD_NAME_PREFIX,
    PendingReap,
    ReapResult,
    ReapSettings,
    ReapStage,
)
from reapkit.lowlevel import MreleaseOutcome


def reaper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME_PREFIX)]


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def pidfd_pid(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError(f"fd {fd} is not a pidfd")


@contextlib.asynccontextmanager
async def running(settings: ReapSettings | None = None, **kwargs: Any) -> AsyncIterator[ReapStage]:
    async with trio.open_nursery() as nursery:
        stage = await nursery.start(ReapStage(settings or ReapSettings(threads=1), **kwargs).serve)
        try:
            yield stage
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
def ref() -> Any:
    with ProcessRef.open(os.getpid()) as r:
        yield r


class FakeMrelease:
    """Stands in for the system call. ``hold`` makes every call wait until ``release``."""

    def __init__(self, answer: Callable[[int], MreleaseOutcome] | None = None, hold: bool = False):
        self.answer = answer or (lambda attempt: MreleaseOutcome.REAPED)
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.entered = threading.Event()
        self.calls: list[dict[str, Any]] = []

    def __call__(self, pidfd: int, *, eagain_retries: int = 1, pid: int | None = None):
        tid = threading.get_native_id()
        call = {
            "pidfd": pidfd,
            "pid": pid,
            "eagain_retries": eagain_retries,
            "thread": threading.current_thread().name,
            "cpus": os.sched_getaffinity(0),
            "nice": os.getpriority(os.PRIO_PROCESS, tid),
        }
        self.calls.append(call)
        self.entered.set()
        assert self.release.wait(10), "the test never released the fake reap"
        # Read after the hold: the ref may have been closed and its number reused meanwhile.
        call["pidfd_names"] = pidfd_pid(pidfd)
        return self.answer(len(self.calls))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeMrelease:
    f = FakeMrelease()
    monkeypatch.setattr(_reap_stage, "process_mrelease", f)
    return f


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Any:
    f = FakeMrelease(hold=True)
    monkeypatch.setattr(_reap_stage, "process_mrelease", f)
    try:
        yield f
    finally:
        f.release.set()  # never leave a reaper thread waiting, even when the test failed


async def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


# -- settings --------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = ReapSettings()
    assert (s.threads, s.cpus, s.nice, s.policy, s.priority) == (2, None, None, "other", 0)
    assert ReapSettings(cpus=[1, 0, 1]).cpus == frozenset({0, 1})
    assert ReapSettings(policy="fifo", priority=1).priority == 1
    assert ReapSettings(policy="rr", priority=99).priority == 99
    assert ReapSettings(nice=-20, policy="batch").nice == -20


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"threads": 0}, "threads"),
        ({"threads": -1}, "threads"),
        ({"threads": True}, "threads"),
        ({"threads": "2"}, "threads"),
        ({"nice": 50}, "nice"),
        ({"nice": -21}, "nice"),
        ({"nice": 1.5}, "nice"),
        ({"policy": "deadline"}, "policy"),
        ({"priority": 5}, "priority"),
        ({"policy": "batch", "priority": 1}, "priority"),
        ({"policy": "fifo"}, "priority"),
        ({"policy": "rr", "priority": 100}, "priority"),
        ({"policy": "fifo", "priority": 1, "nice": -5}, "nice"),
        ({"policy": "idle", "nice": 5}, "nice"),
        ({"cpus": set()}, "cpus"),
        ({"cpus": {-1}}, "cpus"),
        ({"cpus": {"0"}}, "cpus"),
        ({"cpus": "01"}, "cpus"),
        ({"cpus": 3}, "cpus"),
    ],
)
def test_invalid_settings_name_the_option(kwargs: dict[str, Any], option: str) -> None:
    with pytest.raises(InvalidValue, match=rf"^{option} ") as info:
        ReapSettings(**kwargs)
    assert isinstance(info.value, ValueError)


def test_invalid_stage_options() -> None:
    with pytest.raises(InvalidValue, match=r"^shutdown_timeout "):
        ReapStage(shutdown_timeout=-1)
    with pytest.raises(TypeError, match="settings"):
        ReapStage({"threads": 2})  # type: ignore[arg-type]


# -- outcomes --------------------------------------------------------------------------------


def _raise(exc: BaseException) -> Callable[[int], MreleaseOutcome]:
    def answer(attempt: int) -> MreleaseOutcome:
        raise exc

    return answer


def _eagain_then(outcome: MreleaseOutcome, failures: int) -> Callable[[int], MreleaseOutcome]:
    def answer(attempt: int) -> MreleaseOutcome:
        if attempt <= failures:
            raise OSError(errno.EAGAIN, "process_mrelease: Resource temporarily unavailable")
        return outcome

    return answer


@pytest.mark.parametrize(
    ("answer", "outcome", "attempts", "error"),
    [
        (lambda a: MreleaseOutcome.REAPED, "reaped", 1, None),
        (lambda a: MreleaseOutcome.ALREADY_FREED, "already-freed", 1, None),
        (_raise(NotDying(42)), "not-dying", 1, "not dying"),
        (_raise(Unsupported("process_mrelease", "it needs Linux 5.15")), "unsupported", 1, "5.15"),
        (_eagain_then(MreleaseOutcome.REAPED, 1), "reaped", 2, None),
        (_eagain_then(MreleaseOutcome.REAPED, 2), "failed", 2, "EAGAIN"),
        (_raise(OSError(errno.EBADF, "Bad file descriptor")), "failed", 1, "Bad file"),
        (_raise(RuntimeError("a bug")), "failed", 1, "a bug"),
    ],
)
async def test_kernel_answers_become_outcomes(
    monkeypatch: pytest.MonkeyPatch,
    ref: ProcessRef,
    answer: Callable[[int], MreleaseOutcome],
    outcome: str,
    attempts: int,
    error: str | None,
) -> None:
    fake = FakeMrelease(answer)
    monkeypatch.setattr(_reap_stage, "process_mrelease", fake)
    async with running() as stage:
        result = await stage.reap(ref)
        stats = stage.statistics()
    assert result.outcome == outcome
    assert result.attempts == attempts == len(fake.calls)
    assert all(c["eagain_retries"] == 0 and c["pid"] == ref.pid for c in fake.calls)
    if error is None:
        assert result.error is None
    else:
        assert result.error is not None and error in result.error
    counted = {
        "reaped": stats.reaped,
        "already-freed": stats.already_freed,
        "not-dying": stats.not_dying,
        "unsupported": stats.unsupported,
        "failed": stats.failed,
    }
    assert counted == {k: int(k == outcome) for k in counted}


async def test_results_are_on_the_trio_clock(
    monkeypatch: pytest.MonkeyPatch, ref: ProcessRef
) -> None:
    def slow(attempt: int) -> MreleaseOutcome:
        time.sleep(0.05)
        return MreleaseOutcome.REAPED

    monkeypatch.setattr(_reap_stage, "process_mrelease", FakeMrelease(slow))
    async with running() as stage:
        before = trio.current_time()
        result = await stage.reap(ref)
        after = trio.current_time()
    assert before <= result.started < result.finished <= after
    assert 0.05 <= result.duration < 1
    assert result.thread == f"{THREAD_NAME_PREFIX}0"


# -- threads and their settings -------------------------------------------------------------


async def test_each_thread_applies_its_settings_and_reaps_with_them(
    fake: FakeMrelease, ref: ProcessRef
) -> None:
    cpu = max(os.sched_getaffinity(0))
    main_cpus, main_nice = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
    async with running(ReapSettings(threads=3, cpus={cpu}, nice=5)) as stage:
        info = stage.thread_info()
        result = await stage.reap(ref)
        assert stage.statistics().threads == 3
    assert [t.name for t in info] == [f"{THREAD_NAME_PREFIX}{i}" for i in range(3)]
    assert len({t.native_id for t in info}) == 3
    assert all(t.native_id != threading.get_native_id() for t in info)
    assert all(t.cpus == {cpu} and t.nice == 5 for t in info)
    assert all(t.policy == "other" and t.priority == 0 for t in info)
    # Read from inside the reaper thread, during the call:
    assert fake.calls[0]["cpus"] == {cpu} and fake.calls[0]["nice"] == 5
    assert result.cpu == cpu
    # Per thread, not per process: the trio thread kept its own.
    assert os.sched_getaffinity(0) == main_cpus
    assert os.getpriority(os.PRIO_PROCESS, 0) == main_nice


async def start_error(settings: ReapSettings) -> BaseException:
    """Start a stage that must fail to start; the error ``nursery.start`` raised."""
    async with trio.open_nursery() as nursery:
        with pytest.raises(ReapkitError) as info:
            await nursery.start(ReapStage(settings).serve)
    return info.value


async def test_unusable_cpus_stop_every_thread_and_name_the_option() -> None:
    fds = open_fds()
    error = await start_error(ReapSettings(threads=2, cpus={100000}))
    assert isinstance(error, InvalidValue)
    assert str(error).startswith("cpus={100000}: none of these CPUs")
    assert reaper_threads() == []
    assert open_fds() == fds


async def test_one_thread_failing_to_apply_stops_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = _reap_stage._apply

    def apply(settings: ReapSettings, name: str) -> Any:
        if name.endswith("-1"):
            raise AccessDenied(None, "nice=-5 for the reaper threads needs CAP_SYS_NICE")
        return real(settings, name)

    monkeypatch.setattr(_reap_stage, "_apply", apply)
    error = await start_error(ReapSettings(threads=3))
    assert isinstance(error, AccessDenied) and "CAP_SYS_NICE" in str(error)
    assert reaper_threads() == []


# -- busy reapers ----------------------------------------------------------------------------


async def test_busy_reapers_refuse_without_queueing_and_count_it(
    held: FakeMrelease, ref: ProcessRef
) -> None:
    async with running(ReapSettings(threads=1)) as stage:
        first = stage.reap_nowait(ref)
        assert isinstance(first, PendingReap) and first.result is None
        await trio.to_thread.run_sync(held.entered.wait, 10)
        with pytest.raises(trio.WouldBlock):
            stage.reap_nowait(ref)
        assert await stage.reap_or_skip(ref) is None
        stats = stage.statistics()
        assert (stats.busy, stats.busy_skips, stats.threads) == (1, 2, 1)
        assert len(held.calls) == 1  # nothing was queued behind the busy reaper
        held.release.set()
        result = await first.wait()
        assert result.outcome == "reaped" and first.result is result
        # Free again: the next one goes through.
        second = await stage.reap_or_skip(ref)
        assert second is not None and second.outcome == "reaped"
        assert stage.statistics().busy == 0


async def test_reap_waits_for_a_free_reaper(held: FakeMrelease, ref: ProcessRef) -> None:
    results: list[ReapResult] = []

    async def reap() -> None:
        results.append(await stage.reap(ref))

    async with running(ReapSettings(threads=1)) as stage, trio.open_nursery() as nursery:
        nursery.start_soon(reap)
        await trio.to_thread.run_sync(held.entered.wait, 10)
        nursery.start_soon(reap)
        await trio.sleep(0.05)
        assert len(held.calls) == 1 and results == []
        assert stage.statistics().busy_skips == 0  # waiting is not skipping
        held.release.set()
    assert [r.outcome for r in results] == ["reaped", "reaped"]
    assert len(held.calls) == 2


async def test_a_cancelled_wait_does_not_abandon_the_reap(
    held: FakeMrelease, ref: ProcessRef, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reapkit.reap")
    fds = open_fds()
    async with running(ReapSettings(threads=1)) as stage:
        with trio.move_on_after(10) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stage.reap, ref)
                await trio.to_thread.run_sync(held.entered.wait, 10)
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
        assert stage.statistics().busy == 1  # the call goes on
        held.release.set()
        await wait_for(lambda: stage.statistics().reaped == 1)
        assert stage.statistics().busy == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("was cancelled" in m and str(ref.pid) in m for m in messages)
    assert any("its waiter was cancelled" in m and "reaped" in m for m in messages)
    assert open_fds() == fds  # the thread closed its duplicate


async def test_the_thread_owns_a_duplicate_pidfd(held: FakeMrelease) -> None:
    fds = open_fds()
    async with running(ReapSettings(threads=1)) as stage:
        ref = ProcessRef.open(os.getpid())
        number = ref.fileno()
        pending = stage.reap_nowait(ref)
        await trio.to_thread.run_sync(held.entered.wait, 10)
        ref.close()  # the number is free now ...
        r, w = os.pipe()  # ... and taken by something else
        try:
            held.release.set()
            result = await pending.wait()
        finally:
            os.close(r)
            os.close(w)
    assert number in (r, w)  # the test did reuse the number
    assert held.calls[0]["pidfd"] != number
    assert held.calls[0]["pidfd_names"] == os.getpid()
    assert result.outcome == "reaped"
    assert open_fds() == fds


# -- lifecycle -------------------------------------------------------------------------------


async def test_cancelling_serve_joins_every_thread_and_leaks_no_fd(
    fake: FakeMrelease, ref: ProcessRef
) -> None:
    fds = open_fds()
    async with running(ReapSettings(threads=3)) as stage:
        assert len(reaper_threads()) == 3
        assert all(not t.daemon for t in reaper_threads())
        for _ in range(5):
            assert (await stage.reap(ref)).outcome == "reaped"
    assert reaper_threads() == []
    assert open_fds() == fds
    stats = stage.statistics()
    assert (stats.threads, stats.busy, stats.reaped) == (0, 0, 5)
    assert stage.thread_info() == ()


async def test_shutdown_is_bounded_and_warns_about_a_reap_in_progress(
    held: FakeMrelease, ref: ProcessRef, caplog: pytest.LogCaptureFixture
) -> None:
    fds = open_fds()
    async with running(ReapSettings(threads=2), shutdown_timeout=0.2) as stage:
        pending = stage.reap_nowait(ref)
        await trio.to_thread.run_sync(held.entered.wait, 10)
        stopping = trio.current_time()
    took = trio.current_time() - stopping
    assert 0.2 <= took < 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "did not stop within 0.2 s" in warnings[0] and f"process {ref.pid}" in warnings[0]
    (stuck,) = reaper_threads()  # the other one stopped
    assert stuck.is_alive()
    held.release.set()
    await trio.to_thread.run_sync(stuck.join, 10)
    assert reaper_threads() == []
    # The run is still going, so the late result arrives and is counted.
    await wait_for(lambda: pending.result is not None)
    assert stage.statistics().reaped == 1
    assert open_fds() == fds


async def test_not_running_and_closed(fake: FakeMrelease, ref: ProcessRef) -> None:
    stage = ReapStage(ReapSettings(threads=1))
    with pytest.raises(RuntimeError, match="not running"):
        stage.reap_nowait(ref)
    with pytest.raises(RuntimeError, match="not running"):
        await stage.reap(ref)
    async with trio.open_nursery() as nursery:
        await nursery.start(stage.serve)
        with pytest.raises(RuntimeError, match="serves once"):
            await stage.serve()
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.ClosedResourceError):
        stage.reap_nowait(ref)
    with pytest.raises(trio.ClosedResourceError):
        await stage.reap(ref)


async def test_a_waiter_for_a_free_reaper_sees_the_shutdown(
    held: FakeMrelease, ref: ProcessRef
) -> None:
    errors: list[BaseException] = []
    async with trio.open_nursery() as outer, trio.open_nursery() as nursery:
        stage = await nursery.start(ReapStage(ReapSettings(threads=1), shutdown_timeout=0.05).serve)
        stage.reap_nowait(ref)
        await trio.to_thread.run_sync(held.entered.wait, 10)

        async def waiter() -> None:
            with pytest.raises(trio.ClosedResourceError) as info:
                await stage.reap(ref)
            errors.append(info.value)

        outer.start_soon(waiter)
        await trio.sleep(0.02)  # parked: the only reaper is busy
        nursery.cancel_scope.cancel()
    assert len(errors) == 1 and len(held.calls) == 1
    held.release.set()
    for thread in reaper_threads():
        await trio.to_thread.run_sync(thread.join, 10)


async def test_a_closed_ref_is_refused(fake: FakeMrelease) -> None:
    async with running() as stage:
        ref = ProcessRef.open(os.getpid())
        ref.close()
        with pytest.raises(ValueError, match="closed"):
            stage.reap_nowait(ref)
        assert stage.statistics().busy == 0

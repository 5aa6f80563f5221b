"""Process identity on the real kernel: pidfd first, start time checked, PID reuse caught."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from reapkit import NoSuchProcess, ProcessChanged, ProcessRef
from reapkit.lowlevel import ProcFS

from ..conftest import PID_REUSE, Spawn, run_in_pid_namespace

pytestmark = pytest.mark.kernel


def test_open_pins_pid_start_time_and_a_pidfd(spawn: Spawn) -> None:
    child = spawn()
    ref = ProcessRef.open(child.pid)
    fd = ref.fileno()
    assert ref.start_time == ProcFS().stat(child.pid).start_time
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    assert not ref.has_exited()
    ref.send_signal(0)
    ref.close()
    ref.close()  # twice is fine
    assert ref.closed
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # the descriptor really is closed
    with pytest.raises(ValueError, match="closed"):
        ref.send_signal(0)


def test_open_with_another_start_time_is_process_changed(spawn: Spawn) -> None:
    child = spawn()
    start = ProcFS().stat(child.pid).start_time
    with pytest.raises(ProcessChanged) as info:
        ProcessRef.open(child.pid, start_time=start - 1)
    assert info.value.pid == child.pid and info.value.found_start == start
    assert isinstance(info.value, ProcessLookupError)  # generic handlers keep working
    assert child.poll() is None


def test_a_reaped_process_is_no_such_process(spawn: Spawn) -> None:
    child = spawn()
    ref = ProcessRef.open(child.pid)
    child.kill()
    child.wait(10)
    assert ref.has_exited()
    with pytest.raises(NoSuchProcess):
        ref.send_signal(signal.SIGKILL)
    ref.close()
    with pytest.raises(NoSuchProcess):
        ProcessRef.open(child.pid)


async def test_wait_wakes_on_exit(spawn: Spawn) -> None:
    child = spawn()
    with ProcessRef.open(child.pid) as ref:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:  # exits once wait returns
                nursery.start_soon(ref.wait)
                await trio.sleep(0.05)
                assert not ref.has_exited()
                ref.send_signal(signal.SIGTERM)
        assert ref.has_exited()
    assert child.wait(10) == -signal.SIGTERM


async def test_close_wakes_a_waiter_with_closed_resource_error(spawn: Spawn) -> None:
    child = spawn()
    ref = ProcessRef.open(child.pid)
    async with trio.open_nursery() as nursery:

        async def waiter() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await ref.wait()

        nursery.start_soon(waiter)
        await trio.sleep(0.05)
        ref.close()


# The PID-reuse scenario runs inside a private PID namespace, where writing N-1 to
# ns_last_pid makes the next fork get PID N (shared/KERNEL_NOTES.md).
_REUSE = (
    PID_REUSE
    + r"""
import json, signal, subprocess, time
from reapkit import KillGuard, ProcessChanged, ProcessRef, SystemScope
from reapkit.lowlevel import ProcFS

procfs = ProcFS()
first = subprocess.Popen(["sleep", "600"])
pid = first.pid
chosen_start = procfs.stat(pid).start_time     # what a selector saw
old_ref = ProcessRef.open(pid)                  # a pidfd opened before the process died
second = take_pid_of(first)
result = {"reused": second.pid == pid}
try:
    ProcessRef.open(pid, start_time=chosen_start).close()
    result["open"] = "accepted"
except ProcessChanged as exc:
    result["open"] = "ProcessChanged"
    result["found_start_differs"] = exc.found_start != chosen_start
try:
    old_ref.send_signal(signal.SIGKILL)
    result["old_ref"] = "sent"
except ProcessChanged:
    result["old_ref"] = "ProcessChanged"
refusal = KillGuard(SystemScope(), procfs=procfs).check(pid, chosen_start)
result["guard"] = refusal.reason.value if refusal else None
time.sleep(0.05)
result["successor_alive"] = second.poll() is None
second.kill()
second.wait()
print(json.dumps(result))
"""
)


def test_pid_reuse_is_caught_in_a_private_pid_namespace() -> None:
    assert run_in_pid_namespace(_REUSE) == {
        "reused": True,
        "open": "ProcessChanged",
        "found_start_differs": True,
        "old_ref": "ProcessChanged",
        "guard": "identity-changed",
        "successor_alive": True,
    }

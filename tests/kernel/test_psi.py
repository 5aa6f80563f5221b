"""PSI triggers on the real kernel: real pressure fires, idleness costs nothing."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from reapkit import InvalidValue, Unsupported
from reapkit._sources.psi import PressureEvent, PressureWatchEnded, PsiTriggerSource
from reapkit._testing._hog import disk_backed_tmp, filesystem_type, make_thrash_file, start_thrasher
from reapkit._units import parse_psi
from reapkit.lowlevel import Probe
from reapkit.testing import SandboxCgroup

from ..conftest import MiB, need

pytestmark = pytest.mark.kernel


@pytest.fixture
def psi(kernel: Probe) -> None:
    if not kernel.psi_triggers:
        need("PSI triggers (CONFIG_PSI, /proc/pressure/memory writable)")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _disk_dir(tmp_path: Path) -> Path:
    """A directory on a disk file system: tmpfs pages are shmem, which cannot be reclaimed
    without swap, so thrashing them makes no page-cache pressure."""
    if filesystem_type(str(tmp_path)) not in ("tmpfs", "ramfs"):
        return tmp_path
    found = disk_backed_tmp()
    if found is None:
        need("a disk-backed directory (tmp_path and /var/tmp are tmpfs)")
    return Path(found)


@pytest.fixture
def thrash_file(tmp_path: Path) -> Iterator[str]:
    directory = _disk_dir(tmp_path)
    path = directory / f"reapkit-thrash-{os.getpid()}"
    try:
        make_thrash_file(str(path), 256 * MiB)
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.usefixtures("psi")
@pytest.mark.slow
async def test_real_memory_pressure_fires_the_trigger(
    memory_cgroup: SandboxCgroup, thrash_file: str
) -> None:
    memory_cgroup.set_memory_limit(96 * MiB)  # well below the 256 MiB file
    source = PsiTriggerSource(parse_psi("memory some 100ms/2s"))
    send, receive = trio.open_memory_channel[PressureEvent | PressureWatchEnded](8)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        started = trio.current_time()
        with start_thrasher(thrash_file, [memory_cgroup.directory]), trio.fail_after(30):
            event = await receive.receive()
        nursery.cancel_scope.cancel()
    assert isinstance(event, PressureEvent)
    assert event.origin == "trigger"
    assert event.timestamp - started < 30
    assert event.snapshot is not None and event.snapshot.some.total_us > 0
    assert source.statistics().events == 1
    assert source.statistics().mode == "trigger"


@pytest.mark.usefixtures("psi")
@pytest.mark.slow
async def test_no_pressure_fires_nothing_and_costs_no_cpu() -> None:
    sources = [PsiTriggerSource(parse_psi(f"memory {k} 500ms/2s")) for k in ("some", "full")]
    send, receive = trio.open_memory_channel[PressureEvent | PressureWatchEnded](8)
    async with trio.open_nursery() as nursery:
        for source in sources:
            await nursery.start(source.run, send.clone())
        cpu = _cpu_seconds()
        await trio.sleep(4)
        spent = _cpu_seconds() - cpu
        nursery.cancel_scope.cancel()
    # A busy loop would burn ~4 s; waiting on the epoll fds burns next to nothing.
    assert spent < 0.2, f"{spent:.3f} s of CPU in 4 s idle"
    # No spurious wakeups: every wakeup delivered a trigger event, and an event only comes
    # from real stall (if something else on the machine made pressure meanwhile, the
    # snapshot shows it). On an idle machine this is zero events.
    events = []
    while True:
        try:
            events.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    assert [s.statistics().wakeups for s in sources] == [s.statistics().events for s in sources]
    for event in events:
        assert isinstance(event, PressureEvent) and event.snapshot is not None
        assert event.snapshot.some.avg10 > 0 or event.snapshot.some.total_us > 0


@pytest.mark.usefixtures("psi")
async def test_removing_the_cgroup_ends_the_watch(v2_cgroup: SandboxCgroup) -> None:
    if not Path(v2_cgroup.directory, "memory.pressure").exists():
        need("cgroup v2 pressure files (CONFIG_PSI)")
    source = PsiTriggerSource(parse_psi("memory some 100ms/2s", cgroup=v2_cgroup.directory))
    send, receive = trio.open_memory_channel[PressureEvent | PressureWatchEnded](8)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        v2_cgroup.remove()
        with trio.fail_after(10):
            event = await receive.receive()
    assert isinstance(event, PressureWatchEnded)
    assert "removed" in event.reason


async def test_a_window_the_kernel_refuses_is_named() -> None:
    source = PsiTriggerSource(parse_psi("memory some 150ms/1s"), unprivileged_only=True)
    send, _receive = trio.open_memory_channel[PressureEvent | PressureWatchEnded](1)
    refused = pytest.RaisesExc(InvalidValue, match=r"memory some 150ms/1s.*multiple of 2s.*2s, 4s")
    with pytest.RaisesGroup(refused):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)


async def test_a_missing_pressure_file_is_unsupported(tmp_path: Path) -> None:
    source = PsiTriggerSource(parse_psi("memory some 100ms/2s", cgroup=str(tmp_path / "gone")))
    send, _receive = trio.open_memory_channel[PressureEvent | PressureWatchEnded](1)
    with pytest.RaisesGroup(pytest.RaisesExc(Unsupported, match="does not exist")):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)


@pytest.mark.usefixtures("psi")
async def test_many_triggers_at_once_and_no_fd_left_behind() -> None:
    before = _open_fds()
    specs = [f"{r} {k} {t}ms/2s" for r in ("memory", "io", "cpu") for k in ("some", "full")
             for t in (100, 200, 300, 400, 500, 600, 700, 800)]  # fmt: skip
    sources = [PsiTriggerSource(parse_psi(s)) for s in specs]
    send, _receive = trio.open_memory_channel[PressureEvent | PressureWatchEnded](64)
    async with trio.open_nursery() as nursery:
        for source in sources:
            await nursery.start(source.run, send.clone())
        assert len(_open_fds() - before) >= 2 * len(sources)  # a trigger fd and an epoll each
        assert {s.statistics().mode for s in sources} == {"trigger"}
        nursery.cancel_scope.cancel()
    await send.aclose()
    assert _open_fds() == before

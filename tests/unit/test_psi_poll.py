"""The PSI polling fallback against a pressure file the test writes (autojump clock)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from reapkit import InvalidValue
from reapkit._sources.psi import PressureEvent, PressureWatchEnded, PsiTriggerSource, parse_pressure
from reapkit._units import parse_psi


def _write(path: Path, some_total: int, full_total: int = 0) -> None:
    path.write_text(
        f"some avg10=1.50 avg60=0.20 avg300=0.00 total={some_total}\n"
        f"full avg10=0.00 avg60=0.00 avg300=0.00 total={full_total}\n"
    )


def test_parse_pressure() -> None:
    snap = parse_pressure(b"some avg10=1.50 avg60=0.20 avg300=0.00 total=42\n")
    assert snap.some.avg10 == 1.5 and snap.some.total_us == 42 and snap.full is None
    with pytest.raises(InvalidValue):
        parse_pressure(b"some avg10=x\n")


async def test_polling_fires_when_the_stall_grows_past_the_threshold(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pressure = tmp_path / "memory.pressure"
    _write(pressure, 1000)
    spec = parse_psi("memory some 100ms/2s", cgroup=str(tmp_path))
    source = PsiTriggerSource(spec, mode="poll")
    send, receive = trio.open_memory_channel[PressureEvent | PressureWatchEnded](8)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        await trio.sleep(5)  # two windows with no new stall
        _write(pressure, 1000 + 99_999)  # just under 100 ms
        await trio.sleep(2)
        _write(pressure, 1000 + 99_999 + 100_000)  # 100 ms within one window
        with trio.fail_after(3):
            event = await receive.receive()
        assert isinstance(event, PressureEvent)
        assert event.origin == "poll"
        assert event.snapshot is not None and event.snapshot.some.avg10 == 1.5
        pressure.unlink()  # the cgroup went away
        with trio.fail_after(3):
            ended = await receive.receive()
        assert isinstance(ended, PressureWatchEnded)
    stats = source.statistics()
    assert stats.mode == "poll" and stats.events == 1
    assert 4 <= stats.wakeups <= 6  # one per window, never more

"""``records()`` subscribes when it is called (issue 14, item 1): the documented pattern,
``await reaper.trigger(...)`` and then ``reaper.records()``, gets the decision's record, in trio
and through ``reapkit.asyncio``.

A whole reaper on an empty fake /proc tree: every trigger makes a "no-candidate" decision at
once, with no plugin call to wait for (the decision that once came before the subscription:
always through asyncio, about every third time in trio). Each test asks many times.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trio

import reapkit
import reapkit.asyncio
from reapkit.lowlevel import ProcFS
from reapkit.testing import FakeProc

ROUNDS = 30


@pytest.fixture
def empty(tmp_path: Path) -> ProcFS:
    return ProcFS(FakeProc(tmp_path).root)


def _policy(procfs: ProcFS) -> reapkit.Policy:
    text = '[[rule]]\nname = "empty"\nscope = "system"\nactions = ["kill"]\ncooldown = "0s"\n'
    return reapkit.load_policy(text=text, procfs=procfs)


async def test_trio_records_called_after_trigger_gets_its_record(empty: ProcFS) -> None:
    with trio.fail_after(30):
        async with reapkit.open_reaper(_policy(empty), procfs=empty, live_table=False) as reaper:
            for i in range(ROUNDS):
                await reaper.trigger(f"round {i}")
                async with reaper.records() as records:
                    record = await records.receive()
                assert (record.outcome, record.condition) == ("no-candidate", f"manual: round {i}")


def _run_asyncio(empty: ProcFS, subscribe_first: bool) -> list[str]:
    async def main() -> list[str]:
        seen = []
        async with reapkit.asyncio.open_reaper(
            _policy(empty), procfs=empty, live_table=False
        ) as reaper:
            for i in range(ROUNDS):
                if subscribe_first:  # subscribed here, iterated only after the trigger
                    stream = reaper.records()
                    await reaper.trigger(f"round {i}")
                else:
                    await reaper.trigger(f"round {i}")
                    stream = reaper.records()
                async with stream:
                    async for record in stream:
                        seen.append(record.condition)
                        break
        return seen

    return asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("subscribe_first", [False, True], ids=["trigger-first", "records-first"])
def test_asyncio_records_gets_the_triggered_record(empty: ProcFS, subscribe_first: bool) -> None:
    assert _run_asyncio(empty, subscribe_first) == [f"manual: round {i}" for i in range(ROUNDS)]


def test_asyncio_records_ends_when_closed_and_when_the_reaper_stops(empty: ProcFS) -> None:
    async def main() -> tuple[list[object], list[object]]:
        async with reapkit.asyncio.open_reaper(
            _policy(empty), procfs=empty, live_table=False
        ) as reaper:
            closed = reaper.records()
            await closed.aclose()
            left_open = reaper.records()
            await reaper.trigger("one")
        # The reaper stopped: the stream still open gives its record, then ends.
        return [r async for r in closed], [r.condition async for r in left_open]

    closed, left_open = asyncio.run(asyncio.wait_for(main(), 30))
    assert closed == []
    assert left_open == ["manual: one"]

"""The asyncio side of a reaper in trio guest mode (public as :mod:`reapkit.asyncio`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import outcome
import trio

from ._policy import Policy
from ._reaper import Reaper, ReaperStatistics, serve_reaper
from ._records import KillRecord


@attrs.define
class AsyncioReaper:
    """The asyncio side of a reaper running in trio guest mode."""

    _reaper: Reaper
    _token: trio.lowlevel.TrioToken
    _nursery: trio.Nursery
    _loop: asyncio.AbstractEventLoop

    @property
    def policy(self) -> Policy:
        return self._reaper.policy

    def statistics(self) -> ReaperStatistics:
        """A frozen snapshot (safe to call: trio runs on this same thread)."""
        return self._reaper.statistics()

    async def _in_trio(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        future: asyncio.Future[Any] = self._loop.create_future()

        async def run() -> None:
            try:
                result = await fn()
            except BaseException as exc:  # handed over to the asyncio side
                if not future.done():
                    future.set_exception(exc)
                return
            if not future.done():
                future.set_result(result)

        self._token.run_sync_soon(self._nursery.start_soon, run)
        return await future

    async def trigger(self, reason: str) -> None:
        """Evaluate every rule now (see :meth:`reapkit.Reaper.trigger`)."""
        await self._in_trio(functools.partial(self._reaper.trigger, reason))

    async def reload(self, policy: Policy) -> None:
        await self._in_trio(functools.partial(self._reaper.reload, policy))

    def records(self, *, buffer: int = 256) -> RecordStream:
        """Every KillRecord from this call on (it subscribes at once: called right after
        ``await reaper.trigger(...)``, it still gets that decision's record), as an asyncio
        async iterator that ends with the reaper. Up to ``buffer`` records wait for the
        reader; a reader further behind loses the newest."""
        stream = RecordStream(self._token, buffer)
        receive = self._reaper.records()
        self._token.run_sync_soon(self._nursery.start_soon, stream._pump, receive)
        return stream


@attrs.define(eq=False)
class RecordStream:
    """What :meth:`AsyncioReaper.records` returns: ``async for record in stream``. Use it in
    ``async with`` (or ``await stream.aclose()``) to unsubscribe before the reaper stops."""

    _token: trio.lowlevel.TrioToken
    _buffer: int
    #: The records for the reader, then ``None`` at the end.
    _queue: asyncio.Queue[KillRecord | None] = attrs.field(factory=asyncio.Queue)
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _ended: bool = False

    def __aiter__(self) -> RecordStream:
        return self

    async def __anext__(self) -> KillRecord:
        if not self._ended:
            record = await self._queue.get()
            if record is not None:
                return record
            self._ended = True
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Unsubscribe; iterating ends."""
        self._ended = True
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._scope.cancel)

    async def __aenter__(self) -> RecordStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _pump(self, receive: trio.MemoryReceiveChannel[KillRecord]) -> None:
        """In trio: the subscription's records to the asyncio queue (same thread, no hand-over)."""
        try:
            with self._scope:
                async with receive:
                    async for record in receive:
                        if self._queue.qsize() < self._buffer:
                            self._queue.put_nowait(record)
        finally:
            self._queue.put_nowait(None)


@contextlib.asynccontextmanager
async def open_reaper(policy: Policy, **kwargs: Any) -> AsyncIterator[AsyncioReaper]:
    """Start a reaper (``serve_reaper(policy, **kwargs)``) in trio guest mode on the running
    asyncio loop; it is up (every source armed) when the block starts and stopped, with every
    fd closed and thread joined, when it ends."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[AsyncioReaper] = loop.create_future()
    done: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
    scope = trio.CancelScope()

    async def trio_main() -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                reaper = await nursery.start(functools.partial(serve_reaper, policy, **kwargs))
                token = trio.lowlevel.current_trio_token()
                started.set_result(AsyncioReaper(reaper, token, nursery, loop))
                await trio.sleep_forever()

    def finished(result: outcome.Outcome[None]) -> None:
        if not done.done():
            done.set_result(result)

    trio.lowlevel.start_guest_run(
        trio_main,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        done_callback=finished,
        host_uses_signal_set_wakeup_fd=True,
    )
    either: set[asyncio.Future[Any]] = {started, done}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():  # the reaper could not start: its error, as itself
        (await done).unwrap()
        raise RuntimeError("the reaper stopped before it started")  # pragma: no cover
    handle = started.result()
    try:
        yield handle
    finally:
        handle._token.run_sync_soon(scope.cancel)
        result = await asyncio.shield(done)
        if not isinstance(result, outcome.Value):
            with contextlib.suppress(trio.Cancelled):
                result.unwrap()

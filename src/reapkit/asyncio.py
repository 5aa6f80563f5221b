"""Run a reaper inside an asyncio program: trio in guest mode on the running asyncio loop.

::

    async with reapkit.asyncio.open_reaper(policy) as reaper:   # in an asyncio coroutine
        await reaper.trigger("the app knows it is in trouble")
        async for record in reaper.records():
            ...

trio runs on the asyncio thread, interleaved with it (``trio.lowlevel.start_guest_run``), so
its fds, threads and signals work as in a trio program. Leaving the block stops the reaper and
waits for it; if the reaper stops by itself with an error, the block's ``await``s see it raised.
"""

from ._guest import AsyncioReaper as AsyncioReaper
from ._guest import RecordStream as RecordStream
from ._guest import open_reaper as open_reaper

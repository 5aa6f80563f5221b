"""Waiting for processes to exit, on their pidfds.

A pidfd polls readable once the whole process has exited (is a zombie), so waiting is
``trio.lowlevel.wait_readable(pidfd)``, exactly what ``trio.Process.wait`` does: the fd sits in
trio's epoll set, and any number of waits cost nothing while nothing exits.
"""

from __future__ import annotations

import math

import trio

from .._process import ProcessRef


# A timeout parameter instead of a cancel scope (ASYNC109): the answer "did it exit in time"
# is the result here, not an error, and the reaper asks that question for every victim.
async def wait_exit(ref: ProcessRef, *, timeout: float | None = None) -> bool:  # noqa: ASYNC109
    """Wait until the process behind ``ref`` has exited: ``True``, or ``False`` if ``timeout``
    seconds passed first. Closing ``ref`` meanwhile raises ``trio.ClosedResourceError``."""
    with trio.move_on_after(math.inf if timeout is None else timeout):
        await ref.wait()
        return True
    return False

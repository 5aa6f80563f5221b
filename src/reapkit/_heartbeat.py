"""A heartbeat file that the trio loop itself refreshes, for liveness probes.

The same idea as the sd_notify watchdog, for hosts without systemd (a Kubernetes exec probe):
a loop that is stuck (a plugin blocking the trio thread, a deadlock) stops refreshing it, a
working kernel alone does not. The file holds the ``CLOCK_MONOTONIC`` time of the last beat,
not its mtime: a probe on the same host reads the same clock, and wall-clock steps (NTP,
an operator's ``date``) cannot make a stuck daemon look alive or a live one stale.
"""

from __future__ import annotations

import os
import time

import trio

#: Seconds between two beats of ``reapkit run --heartbeat``.
HEARTBEAT_EVERY = 5.0


def beat(path: str) -> None:
    """Write the time now to ``path``, atomically (a probe never reads half a file)."""
    partial = f"{path}.tmp"
    with open(partial, "w", encoding="ascii") as f:
        f.write(f"{time.monotonic():.3f}\n")
    os.replace(partial, path)


def heartbeat_age(path: str) -> float:
    """Seconds since the last beat written to ``path``. Raises ``OSError`` when it cannot be
    read, ``ValueError`` when it holds no time."""
    with open(path, encoding="ascii") as f:
        return time.monotonic() - float(f.read())


async def serve_heartbeat(path: str, every: float = HEARTBEAT_EVERY) -> None:
    """Beat every ``every`` seconds until cancelled. The write runs on a thread: a stalled
    disk stalls the heartbeat (the probe then fails), never the loop."""
    limiter = trio.CapacityLimiter(1)  # a hung write cannot pile up threads
    while True:
        await trio.to_thread.run_sync(beat, path, limiter=limiter, abandon_on_cancel=True)
        await trio.sleep(every)

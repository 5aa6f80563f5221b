"""A heartbeat file that the trio loop itself refreshes, for liveness probes.

The same idea as the sd_notify watchdog, for hosts without systemd (a Kubernetes exec probe):
a loop that is stuck (a plugin blocking the trio thread, a deadlock) stops refreshing it, a
working kernel alone does not. The file holds the ``CLOCK_MONOTONIC`` time of the last beat,
not its mtime: a probe on the same host reads the same clock, and wall-clock steps (NTP,
an operator's ``date``) cannot make a stuck daemon look alive or a live one stale.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Final

log = logging.getLogger("reapkit")

#: Seconds between two beats of ``reapkit run --heartbeat``.
HEARTBEAT_EVERY = 5.0
#: The temporary file: created here or not at all (never a link or a file planted before).
_TEMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def beat(path: str) -> None:
    """Write the time now to ``path``, atomically (a probe never reads half a file), through
    ``{path}.tmp`` created afresh with mode 0600. A symbolic link at either name is replaced,
    never followed. Raises ``OSError``."""
    partial = f"{path}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)  # left by a failed beat (or planted): unlink never follows a link
    fd = os.open(partial, _TEMP_FLAGS, 0o600)
    try:
        with open(fd, "w", encoding="ascii") as f:
            # Milliseconds, rounded down: rounded to nearest, a beat read at once was "from
            # the future" (a negative age).
            f.write(f"{time.monotonic_ns() // 1_000_000 / 1000:.3f}\n")
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def heartbeat_age(path: str) -> float:
    """Seconds since the last beat written to ``path``. Raises ``OSError`` when it cannot be
    read, ``ValueError`` when it holds no time."""
    with open(path, encoding="ascii") as f:
        return time.monotonic() - float(f.read())


async def serve_heartbeat(path: str, every: float = HEARTBEAT_EVERY) -> None:
    """Beat every ``every`` seconds until cancelled. The write runs on a thread: a stalled
    disk stalls the heartbeat (the probe then fails), never the loop. A failed beat (a full
    disk) is logged once, retried at the next beat, and the count of failures said when a
    beat works again."""
    import trio  # noqa: PLC0415 - here only: `reapkit probe`, a short-lived check, needs no trio

    limiter = trio.CapacityLimiter(1)  # a hung write cannot pile up threads
    failures = 0
    while True:
        try:
            await trio.to_thread.run_sync(beat, path, limiter=limiter, abandon_on_cancel=True)
        except OSError as exc:
            if not failures:
                why = exc.strerror or exc
                log.error("heartbeat: cannot write %s: %s; retrying every %g s", path, why, every)  # noqa: TRY400 - no traceback
            failures += 1
        else:
            if failures:
                log.warning("heartbeat: writing %s again after %d failed beat(s)", path, failures)
            failures = 0
        await trio.sleep(every)

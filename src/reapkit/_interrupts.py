"""Signal handling for cleanup that must not be cut short."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Final

#: Signals that end a command the way Ctrl-C does (their handlers raise KeyboardInterrupt).
INTERRUPTS: Final = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP for the block; a signal that arrived meanwhile is
    delivered when it ends. For teardown (thaw, kill, rmdir) that must finish once begun: a
    second Ctrl-C must not leave a frozen process or a cgroup behind."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_termination(*, hangup: bool = True) -> None:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt, like SIGINT: ``kill``, ``systemctl
    stop`` and a closed terminal then run the same ``finally`` blocks as Ctrl-C.

    ``hangup=False`` (the daemon, which reloads on SIGHUP once it runs): SIGHUP is ignored
    instead, until the daemon's own signal receiver takes it over."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt if hangup else signal.SIG_IGN)

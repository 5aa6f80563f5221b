"""What every event source shares."""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Iterator

import attrs
import trio


@attrs.frozen
class SourceStatistics:
    """A snapshot of one source's counters."""

    #: What the source watches, e.g. ``"psi memory some 100ms/2s (/proc/pressure/memory)"``.
    name: str
    #: Events sent into the channel.
    events: int
    #: Times the task woke up for the kernel (or a timer, for pollers).
    wakeups: int


@contextlib.contextmanager
def owned_fd(fd: int) -> Iterator[int]:
    """Own ``fd`` for the block: on exit wake any trio task waiting on it, then close it
    (trio's ``_FdHolder`` order: ``notify_closing`` before ``close``)."""
    try:
        yield fd
    finally:
        with contextlib.suppress(RuntimeError):  # outside trio: nobody can be waiting
            trio.lowlevel.notify_closing(fd)
        os.close(fd)


@contextlib.contextmanager
def owned_epoll(fd: int, events: int) -> Iterator[select.epoll]:
    """A private epoll watching ``fd`` for ``events``, closed (after ``notify_closing``) on exit.

    trio's own epoll only asks for ``EPOLLIN``/``EPOLLOUT`` (trio#61). For fds that signal with
    ``EPOLLPRI`` (PSI triggers, cgroup v2 ``*.events`` files) register them here and wait for
    this epoll's fd to become readable instead.
    """
    ep = select.epoll(flags=select.EPOLL_CLOEXEC)
    try:
        ep.register(fd, events)
        yield ep
    finally:
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(ep.fileno())
        ep.close()

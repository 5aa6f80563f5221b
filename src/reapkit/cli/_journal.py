"""Logs that fit the journal: under journald (stderr is its stream), each line starts with
its syslog priority, ``<4>`` for a warning, which journald takes as the entry's PRIORITY and
strips (sd-daemon(3)); the journal has the time, so the lines leave theirs out. Small on
purpose: every command imports it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Final

#: syslog priorities of logging's levels, highest first; below INFO: 7 (debug).
_PRIORITIES: Final = (
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6)
)  # fmt: skip


def prefixed(text: str, levelno: int) -> str:
    """``text``, each of its lines prefixed with the priority of ``levelno``."""
    priority = next((p for n, p in _PRIORITIES if levelno >= n), 7)
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def under_journald(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` (stderr) is connected to the journal: ``$JOURNAL_STREAM`` names its
    device and inode (systemd.exec(5)). A child whose stderr went elsewhere inherits the
    variable, so a mere ``JOURNAL_STREAM`` is no proof."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """Another formatter's lines, each prefixed with the record's syslog priority (``<4>``
    for WARNING), which journald takes as the entry's PRIORITY and strips (sd-daemon(3))."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return prefixed(self.inner.format(record), record.levelno)

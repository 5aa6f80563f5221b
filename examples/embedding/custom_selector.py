"""A custom selector: never kill the foreground app; kill the largest background one.

The desktop shell writes the foreground app's PID to a file; policies name the file:
``select = [{ name = "background-first", foreground_file = "/run/user/1000/foreground.pid" }]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import attrs

import reapkit


@attrs.frozen
class Options:
    foreground_file: str = "/run/reapkit/foreground.pid"


@reapkit.register
class BackgroundFirst(reapkit.Selector):
    """Drop the foreground app and its children; the largest of the rest first."""

    name: ClassVar[str] = "background-first"
    Options: ClassVar[type] = Options

    def select(
        self, situation: reapkit.Situation, candidates: Sequence[reapkit.Ranked]
    ) -> list[reapkit.Ranked]:
        try:
            with open(self.options.foreground_file) as f:
                foreground = int(f.read())
        except (OSError, ValueError):
            foreground = None  # no foreground app known: everything is background
        background = [
            r for r in candidates if foreground not in (r.candidate.pid, r.candidate.ppid)
        ]
        ranked = sorted(background, key=lambda r: -r.candidate.rss)
        return [
            reapkit.Ranked(
                r.candidate, r.candidate.rss, f"background, RSS {r.candidate.rss >> 20} MiB"
            )
            for r in ranked
        ]

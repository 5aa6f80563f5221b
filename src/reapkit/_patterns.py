"""Policy regular expressions, compiled with RE2: matching takes time linear in the text.

A process chooses its own ``comm`` and command line, so a pattern such as ``^(a+)+$`` must not
let it stall every decision (Python's ``re`` backtracks exponentially on it). RE2 refuses what it
cannot run in linear time (backreferences, lookaround): :func:`compile_pattern` says so at load.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final, Protocol

import re2

from ._errors import InvalidValue

#: Characters of a text that are matched: a command line, a path (PATH_MAX) or a cgroup path
#: longer than this is matched on its first 4096 characters (``comm`` has at most 15).
MATCH_LIMIT: Final = 4096

_OPTIONS: Final = re2.Options()
_OPTIONS.log_errors = False  # the error is raised (and reported with the key), not logged
_OPTIONS.never_capture = True


class Pattern(Protocol):
    """A compiled policy pattern: ``.pattern`` (its text) and ``.search(text)``."""

    @property
    def pattern(self) -> str: ...

    def search(self, text: str) -> object | None: ...


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Pattern:
    """Compile a policy regular expression with RE2; :class:`InvalidValue` if RE2 refuses it."""
    if not isinstance(pattern, str):
        raise InvalidValue(f"expected a regular expression (a string), got {pattern!r}")
    try:
        compiled: Pattern = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args else str(exc)
        raise InvalidValue(
            f"{pattern!r} is not a valid regular expression for RE2: {reason} (policy patterns"
            " run in linear time: no backreferences, no lookahead or lookbehind)"
        ) from None
    return compiled


def first_match(patterns: Sequence[Pattern], text: str) -> Pattern | None:
    """The first of ``patterns`` found in ``text`` (its first :data:`MATCH_LIMIT` characters)."""
    text = _matchable(text[:MATCH_LIMIT])
    for pattern in patterns:
        if pattern.search(text) is not None:
            return pattern
    return None


def _matchable(text: str) -> str:
    """``text`` as RE2 can take it: names read from /proc keep undecodable bytes as lone
    surrogates (surrogateescape), which UTF-8 cannot encode; they become U+FFFD."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")

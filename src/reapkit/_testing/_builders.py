"""Builders for plugin tests: candidates, situations and options as the engine makes them, and
a selector run through the engine's own check of what it returns."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .._engine import _validated
from .._plugins import Candidate, Plugin, Ranked, Selector, Situation
from .._plugins import make_options as _make_options
from .._procfs import MemInfo, ProcFS
from ._fakeproc import FakeProc

__all__ = [
    "check_selection",
    "make_candidate",
    "make_options",
    "make_situation",
    "read_candidates",
    "run_selector",
]


def _procfs(source: ProcFS | FakeProc | str | os.PathLike[str]) -> ProcFS:
    if isinstance(source, ProcFS):
        return source
    return ProcFS(source.root if isinstance(source, FakeProc) else source)


def make_candidate(
    pid: int,
    *,
    comm: str = "proc",
    rss: int = 0,
    oom_score: int = 0,
    ppid: int = 1,
    state: str = "S",
    start_time: int = 1,
) -> Candidate:
    """A :class:`reapkit.Candidate` with these fields (it reads nothing)."""
    return Candidate(pid, start_time, comm, ppid, state, rss, oom_score)


def read_candidates(
    source: ProcFS | FakeProc | str | os.PathLike[str], pids: Iterable[int] | None = None
) -> list[Ranked]:
    """The processes ``pids`` (all in the tree by default) of a ``/proc`` tree (a
    :class:`FakeProc`, a :class:`reapkit.lowlevel.ProcFS` or a path), as a rule's first
    selector gets them: each a :class:`reapkit.Ranked` with score 0 and no reason."""
    procfs = _procfs(source)
    return [
        Ranked(Candidate.from_info(procfs.process_info(pid)))
        for pid in (procfs.pids() if pids is None else pids)
    ]


def make_situation(
    source: ProcFS | FakeProc | str | os.PathLike[str] = "/proc",
    *,
    rule: str = "test",
    trigger: object = None,
    meminfo: MemInfo | None = None,
    now: float = 0.0,
) -> Situation:
    """A :class:`reapkit.Situation` reading ``source`` (a :class:`FakeProc`, a
    :class:`reapkit.lowlevel.ProcFS` or a path); ``meminfo`` is read from it unless given."""
    procfs = _procfs(source)
    return Situation(
        rule=rule,
        trigger=trigger,
        meminfo=procfs.meminfo() if meminfo is None else meminfo,
        procfs=procfs,
        now=now,
    )


def make_options(
    plugin: type[Plugin], table: Mapping[str, Any] | None = None, /, **options: Any
) -> Any:
    """``plugin.Options`` built from a policy's inline table (``table``, or keyword
    arguments), exactly as a policy builds them: an unknown option or a value its converter
    or validator refuses raises :class:`reapkit.PluginError` naming the plugin and the option
    (``.option``)."""
    return _make_options(plugin, {**(table or {}), **options})


def check_selection(candidates: Iterable[Ranked], result: Iterable[Any]) -> list[Ranked]:
    """What a selector returned (``result``), checked as the engine checks it against what
    it was given (``candidates``): only :class:`reapkit.Ranked` items holding given
    candidates. Raises ``TypeError`` or ``ValueError`` where the engine would count the
    selector as failed. For an async selector: ``check_selection(given, await
    selector.select(situation, given))``."""
    return list(_validated(tuple(candidates), result))


def run_selector(
    selector: Selector, situation: Situation, candidates: Iterable[Ranked]
) -> list[Ranked]:
    """Call a sync selector as the engine does (with a tuple of ``candidates``) and return
    its ranking, checked by :func:`check_selection`."""
    given = tuple(candidates)
    result = selector.select(situation, given)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(
            f"{type(selector).__name__}.select is async: use check_selection(candidates, "
            "await selector.select(situation, candidates))"
        )
    return check_selection(given, result)

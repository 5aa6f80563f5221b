"""reapkit.testing's builders: what a plugin author's tests build, and the engine's own check of
a selector's ranking (the same one a reaper applies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio

import reapkit
from reapkit.lowlevel import ProcFS
from reapkit.testing import (
    FakeProc,
    check_selection,
    make_candidate,
    make_options,
    make_situation,
    read_candidates,
    run_selector,
)

MiB = 1 << 20


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path / "proc")
    proc.set_meminfo(total=8 << 30, available=100 * MiB)
    proc.add_process(100, comm="a) Z (", rss=300 * MiB, oom_score=10)
    proc.add_process(101, comm="big", rss=900 * MiB, oom_score=900, ppid=100)
    return proc


def test_make_candidate_by_keyword() -> None:
    c = make_candidate(42, comm="hog", rss=3 * MiB, oom_score=800)
    assert c == reapkit.Candidate(42, 1, "hog", 1, "S", 3 * MiB, 800)
    assert (c.pid, c.ppid, c.state, c.start_time) == (42, 1, "S", 1)


def test_read_candidates_as_the_engine_reads_them(fake: FakeProc) -> None:
    procfs = ProcFS(fake.root)
    everyone = read_candidates(fake)
    assert [r.candidate.pid for r in everyone] == [100, 101]
    assert everyone[1].candidate == reapkit.Candidate.from_info(procfs.process_info(101))
    assert (everyone[0].score, everyone[0].reason) == (0, "")
    assert read_candidates(procfs, [101]) == read_candidates(fake.root, (101,)) == everyone[1:]


def test_make_situation_reads_memory_from_the_tree(fake: FakeProc) -> None:
    situation = make_situation(fake)
    assert (situation.rule, situation.trigger, situation.now) == ("test", None, 0.0)
    assert situation.meminfo.available == 100 * MiB
    assert situation.procfs.root == fake.root
    assert situation.uid(make_candidate(100)) == 0
    own = ProcFS(fake.root).meminfo()
    other = make_situation(ProcFS(fake.root), rule="r", trigger="t", meminfo=own, now=5.0)
    assert (other.rule, other.trigger, other.meminfo, other.now) == ("r", "t", own, 5.0)


@attrs.frozen
class _Options:
    limit: int = attrs.field(default=1, converter=int)
    label: str = "x"


class _Largest(reapkit.Selector):
    """Largest RSS first, at most ``limit``."""

    name: ClassVar[str] = "test-largest"
    Options: ClassVar[type[Any]] = _Options

    def select(self, situation: reapkit.Situation, candidates: Any) -> list[reapkit.Ranked]:
        ranked = sorted(candidates, key=lambda r: -r.candidate.rss)[: self.options.limit]
        return [reapkit.Ranked(r.candidate, r.candidate.rss, "largest") for r in ranked]


def test_make_options_as_a_policy_makes_them() -> None:
    assert make_options(_Largest) == _Options()
    assert make_options(_Largest, limit="3") == _Options(3)
    assert make_options(_Largest, {"name": "test-largest", "limit": 2}, label="y") == _Options(
        2, "y"
    )
    with pytest.raises(reapkit.PluginError) as info:
        make_options(_Largest, lmit=2)
    assert info.value.option == "lmit"
    assert "options: label, limit" in str(info.value)
    with pytest.raises(reapkit.PluginError) as info:
        make_options(_Largest, limit="many")
    assert info.value.option == "limit"


def test_run_selector_returns_the_checked_ranking(fake: FakeProc) -> None:
    given = read_candidates(fake)
    selector = _Largest(make_options(_Largest, limit=2))
    ranked = run_selector(selector, make_situation(fake), given)
    assert [r.candidate.comm for r in ranked] == ["big", "a) Z ("]
    assert ranked[0].candidate is given[1].candidate


class _Inventor(reapkit.Selector):
    """Returns a process it was not given."""

    name: ClassVar[str] = "test-inventor"

    def select(self, situation: reapkit.Situation, candidates: Any) -> Any:
        return [reapkit.Ranked(make_candidate(7))]


class _Wrong(reapkit.Selector):
    """Returns pids, not Ranked items."""

    name: ClassVar[str] = "test-wrong"

    def select(self, situation: reapkit.Situation, candidates: Any) -> Any:
        return [r.candidate.pid for r in candidates]


class _Copier(reapkit.Selector):
    """Returns equal copies of the candidates it was given."""

    name: ClassVar[str] = "test-copier"

    def select(self, situation: reapkit.Situation, candidates: Any) -> Any:
        return [
            reapkit.Ranked(make_candidate(c.pid, comm=c.comm, rss=c.rss, oom_score=c.oom_score,
                                          ppid=c.ppid, state=c.state, start_time=c.start_time))
            for c in (r.candidate for r in candidates)
        ]  # fmt: skip


def test_run_selector_refuses_what_the_engine_refuses(fake: FakeProc) -> None:
    situation, given = make_situation(fake), read_candidates(fake)
    with pytest.raises(ValueError, match="returned process 7, not a candidate"):
        run_selector(_Inventor(), situation, given)
    with pytest.raises(TypeError, match="must return Ranked items, not int"):
        run_selector(_Wrong(), situation, given)
    # An equal candidate is taken as the engine's own, as a reaper takes it.
    copied = run_selector(_Copier(), situation, given)
    assert [r.candidate for r in copied] == [r.candidate for r in given]
    assert all(a.candidate is b.candidate for a, b in zip(copied, given, strict=True))


class _Asking(reapkit.Selector):
    """An async selector: keeps the first candidate."""

    name: ClassVar[str] = "test-asking"

    async def select(self, situation: reapkit.Situation, candidates: Any) -> list[reapkit.Ranked]:
        await trio.lowlevel.checkpoint()
        return list(candidates[:1])


def test_an_async_selector_is_checked_with_check_selection(fake: FakeProc) -> None:
    situation, given = make_situation(fake), tuple(read_candidates(fake))
    with pytest.raises(TypeError, match="async: use check_selection"):
        run_selector(_Asking(), situation, given)

    async def main() -> list[reapkit.Ranked]:
        return check_selection(given, await _Asking().select(situation, given))

    assert trio.run(main) == [given[0]]
    with pytest.raises(ValueError, match="not a candidate"):
        check_selection(given[1:], [given[0]])


def test_a_function_selector_runs_too(fake: FakeProc) -> None:
    registry = reapkit.PluginRegistry()

    def not_root(situation: reapkit.Situation, candidates: Any) -> list[reapkit.Ranked]:
        return [r for r in candidates if situation.uid(r.candidate) != 0]

    cls = reapkit.selector("test-not-root", registry=registry)(not_root)
    assert run_selector(cls(), make_situation(fake), read_candidates(fake)) == []

"""Lazy candidates: one read (``oom_score``) per process in scope, ``stat`` only on use.

A fake ``/proc`` tree whose reads are counted shows what a decision reads; the real kernel's
side (kept-open files, ESRCH after exit) is in ``tests/kernel/test_kept_score_files.py``.
"""

from __future__ import annotations

import collections
import gc
import os
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from reapkit import KillGuard, SystemScope
from reapkit._engine import Engine, Rule
from reapkit._plugins import Candidate, Ranked, Selector, Situation
from reapkit._procfs import KeptScoreFiles
from reapkit.builtin.selectors import LargestRss, OomScore
from reapkit.lowlevel import ProcFS
from reapkit.testing import FakeProc

MiB = 1 << 20
KTHREAD = 0x00200000


class CountingProcFS(ProcFS):
    """A ProcFS that counts the per-process files it reads."""

    __slots__ = ("reads",)

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.reads: collections.Counter[str] = collections.Counter()

    def _read_pid(self, pid: int, name: str, bufsize: int = 4096) -> tuple[str, bytes]:
        self.reads[name] += 1
        return super()._read_pid(pid, name, bufsize)

    def oom_scores(self, pids: object, kept: object = None) -> list[tuple[int, int]]:
        result = super().oom_scores(pids, kept)  # type: ignore[arg-type]
        self.reads["oom_score"] += len(result)
        return result


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path)
    proc.set_meminfo(total=16 << 30, available=400 * MiB)
    proc.add_process(1, comm="init", oom_score=0)
    proc.add_process(2, comm="kthreadd", ppid=0, flags=KTHREAD, oom_score=0)
    proc.add_process(3, comm="kworker/0:1", ppid=2, flags=KTHREAD, oom_score=0)
    proc.add_process(90, comm="zombie", state="Z", oom_score=0)
    proc.add_process(95, comm="adj-999", rss=MiB, oom_score=0, oom_score_adj=-999)
    for pid in range(100, 200):
        proc.add_process(pid, comm=f"worker{pid}", rss=pid * MiB, oom_score=pid)
    return proc


def _engine(fs: ProcFS, selector: Selector) -> tuple[Engine, Rule]:
    rule = Rule(
        name="test",
        when=(),
        guard=KillGuard(SystemScope(), procfs=fs),
        selectors=(selector,),
        actions=(),
    )
    return Engine((rule,), emit=_ignore, procfs=fs), rule


async def _ignore(_record: object) -> None:
    return None


async def test_oom_score_selection_reads_stat_only_for_the_victim(fake: FakeProc) -> None:
    fs = CountingProcFS(fake.root)
    engine, rule = _engine(fs, OomScore(OomScore.Options()))
    chosen, ranked, _steps = await engine.preview(rule)
    assert chosen is not None and chosen.candidate.pid == 199
    assert chosen.candidate.comm == "worker199"
    # One oom_score per process (105); stat for the score-0 ones (init, 2 kernel threads,
    # the zombie, adj-999) and the victim; the guard reads the victim's stat once more.
    assert fs.reads["oom_score"] == 105
    assert fs.reads["stat"] == 5 + 1 + 1
    # Kernel threads and the zombie are never candidates; a score of 0 alone does not drop one.
    pids = {r.candidate.pid for r in ranked}
    assert {2, 3, 90}.isdisjoint(pids)
    assert {1, 95} <= pids
    assert len(pids) == 102


async def test_a_selector_that_looks_at_rss_reads_stat_for_every_candidate(
    fake: FakeProc,
) -> None:
    fs = CountingProcFS(fake.root)
    engine, rule = _engine(fs, LargestRss(LargestRss.Options(include_swap=False)))
    chosen, _ranked, _steps = await engine.preview(rule)
    assert chosen is not None and chosen.candidate.pid == 199
    assert fs.reads["stat"] == 105 + 1  # each read once (cached), the guard's own once more


async def test_reasons_are_written_only_when_read(fake: FakeProc) -> None:
    calls = []

    def why(r: Ranked, place: int) -> str:
        calls.append(place)
        return f"#{place}"

    c = Candidate(pid=5, start_time=1, comm="x", ppid=1, state="S", rss=0, oom_score=9)
    lazy = [Ranked.explained(c, 1.0, why, i) for i in range(1000)]
    assert calls == []
    assert lazy[3].reason == "#3"
    assert lazy[3].reason == "#3"
    assert calls == [3]
    assert lazy[3] == Ranked(c, 1.0, "#3")
    assert hash(lazy[3]) == hash(Ranked(c, 1.0, "#3"))
    assert "reason='#3'" in repr(lazy[3])


def test_candidate_and_ranked_are_read_only() -> None:
    c = Candidate(pid=5, start_time=1, comm="x", ppid=1, state="S", rss=0, oom_score=9)
    r = Ranked(c, 2.0, "why")
    for obj, name in ((c, "pid"), (c, "rss"), (c, "oom_score"), (r, "score"), (r, "reason")):
        with pytest.raises(AttributeError):
            setattr(obj, name, 1)
    assert c == Candidate(5, 1, "x", 1, "S", 0, 9)
    assert c != Candidate(5, 2, "x", 1, "S", 0, 9)
    assert len({c, Candidate(5, 1, "x", 1, "S", 0, 9)}) == 1


def test_a_lazy_candidate_reads_stat_once(fake: FakeProc) -> None:
    fs = CountingProcFS(fake.root)
    c = Candidate.lazy(150, 150, fs, born_from=10**9)
    assert fs.reads["stat"] == 0
    assert (c.comm, c.rss, c.ppid, c.state, c.start_time) == ("worker150", 150 * MiB, 1, "S", 1000)
    assert fs.reads["stat"] == 1
    assert c == Candidate(150, 1000, "worker150", 1, "S", 150 * MiB, 150)


def test_a_candidate_gone_before_its_stat_was_read_reads_as_exited(fake: FakeProc) -> None:
    fs = ProcFS(fake.root)
    c = Candidate.lazy(150, 150, fs, born_from=10**9)
    fake.remove_process(150)
    assert (c.state, c.rss, c.start_time, c.comm) == ("X", 0, -1, "")
    assert c.oom_score == 150  # what was read stays


def test_a_pid_that_may_have_changed_hands_reads_as_exited(fake: FakeProc) -> None:
    """The tick 5000 was taken before the score was read. A stat that says 'started at 5000'
    or later may be a newcomer's, which took the PID after the score was read: never taken
    for the one scored. One that started before existed when its score was read."""
    fs = ProcFS(fake.root)
    fake.add_process(300, comm="newcomer", start_time=5001, rss=MiB, oom_score=700)
    fake.add_process(301, comm="same-tick", start_time=5000, rss=MiB, oom_score=700)
    fake.add_process(302, comm="older", start_time=4999, rss=MiB, oom_score=700)
    for pid in (300, 301):
        gone = Candidate.lazy(pid, 700, fs, born_from=5000)
        assert (gone.state, gone.start_time, gone.rss) == ("X", -1, 0)
    assert Candidate.lazy(302, 700, fs, born_from=5000).comm == "older"


def test_a_reason_that_fails_says_so_and_fails_nothing(fake: FakeProc) -> None:
    def why(r: Ranked, place: int) -> str:
        raise KeyError("oops")

    c = Candidate(pid=5, start_time=1, comm="x", ppid=1, state="S", rss=0, oom_score=9)
    assert Ranked.explained(c, 1.0, why).reason == "(its reason failed: KeyError: 'oops')"


class BadReasons(Selector):
    name: ClassVar[str] = "test-bad-reasons"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        def why(r: Ranked, place: int) -> str:
            raise RuntimeError("plugin bug")

        ordered = sorted(candidates, key=lambda r: -r.candidate.oom_score)
        return [Ranked.explained(r.candidate, r.candidate.oom_score, why) for r in ordered]


async def test_a_selector_whose_reasons_fail_still_chooses(fake: FakeProc) -> None:
    engine, rule = _engine(ProcFS(fake.root), BadReasons())
    chosen, _ranked, steps = await engine.preview(rule)
    assert chosen is not None and chosen.candidate.pid == 199
    assert steps[0].reason == "(its reason failed: RuntimeError: plugin bug)"


async def test_a_malformed_score_leaves_that_process_out(fake: FakeProc) -> None:
    fake.write("150/oom_score", "garbage\n")
    engine, rule = _engine(ProcFS(fake.root), OomScore(OomScore.Options()))
    chosen, ranked, _steps = await engine.preview(rule)
    assert chosen is not None and chosen.candidate.pid == 199
    assert 150 not in {r.candidate.pid for r in ranked}


def test_an_engine_keeps_no_files_of_a_fake_tree(fake: FakeProc) -> None:
    """A fake tree's files are replaced, not regenerated: a kept file would read stale."""
    rule = _engine(ProcFS(fake.root), OomScore(OomScore.Options()))[1]
    engine = Engine((rule,), emit=_ignore, procfs=ProcFS(fake.root), keep_score_files=100)
    assert engine._kept is None


class EqualCopy(Selector):
    """Returns equal (not identical) candidates: allowed, they are the same processes."""

    name: ClassVar[str] = "test-equal-copy"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        return [
            Ranked(
                Candidate(
                    r.candidate.pid, r.candidate.start_time, r.candidate.comm,
                    r.candidate.ppid, r.candidate.state, r.candidate.rss, r.candidate.oom_score,
                ),
                r.candidate.oom_score,
            )
            for r in sorted(candidates, key=lambda r: -r.candidate.oom_score)
        ]  # fmt: skip


async def test_a_selector_may_return_equal_copies_of_its_candidates(fake: FakeProc) -> None:
    fs = ProcFS(fake.root)
    engine, rule = _engine(fs, EqualCopy())
    chosen, _ranked, steps = await engine.preview(rule)
    assert chosen is not None and chosen.candidate.pid == 199
    assert steps[0].error is None


class CollectorState(Selector):
    """Records whether the cyclic garbage collector runs while it selects."""

    name: ClassVar[str] = "test-collector-state"
    inline: ClassVar[bool] = True
    seen: ClassVar[list[bool]] = []

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        self.seen.append(gc.isenabled())
        return list(candidates)


class CollectorStateRaises(CollectorState):
    name: ClassVar[str] = "test-collector-state-raises"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        super().select(situation, candidates)
        raise RuntimeError("plugin bug")


@pytest.mark.parametrize("selector", [CollectorState, CollectorStateRaises])
async def test_the_collector_pauses_for_a_choice_and_comes_back(
    fake: FakeProc, selector: type[Selector]
) -> None:
    engine, rule = _engine(ProcFS(fake.root), selector(selector.Options()))
    CollectorState.seen.clear()
    assert gc.isenabled()
    await engine.preview(rule)
    assert CollectorState.seen == [False]
    assert gc.isenabled()
    gc.disable()  # an embedding program that runs without it keeps it off
    try:
        await engine.preview(rule)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_kept_files_give_way_when_descriptors_run_out(
    fake: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    fs = ProcFS(fake.root)
    pids = list(range(100, 200))
    kept = KeptScoreFiles(fs, limit=1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 80, hard))
    try:
        scores = kept.read(pids)
        assert scores == [(pid, pid) for pid in pids]  # every process read all the same
        assert kept.limit == len(kept) < 80
        assert "oom_score files open, not more" in caplog.text
        assert kept.read(pids) == scores
    finally:
        kept.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

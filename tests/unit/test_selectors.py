"""Tests for the built-in selectors (reapkit.builtin.selectors) against fake /proc trees.

Candidates are built the way the engine builds them (``ProcFS.process_info`` →
``Candidate.from_info``); a process removed between that and ``select`` is a process that
vanished meanwhile. The cgroup-victims tests use real temporary directories standing for cgroup
directories (``cgroup_root``), with user xattrs where the filesystem has them.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reapkit._plugins import (
    Candidate,
    PluginError,
    PluginRegistry,
    Ranked,
    Selector,
    Situation,
    make_options,
    validate_plugin,
)
from reapkit._procfs import ProcFS
from reapkit.builtin import BUILTIN_SELECTORS, ensure_registered, register_builtins
from reapkit.builtin.selectors import (
    CgroupVictims,
    LargestRss,
    MemoryGrowth,
    Newest,
    Oldest,
    OomScore,
    OomScoreAdjTiers,
    PreferAvoid,
    Protect,
    Scope,
)
from reapkit.testing import FakeProc

from ..conftest import Spawn

MiB = 1 << 20
GiB = 1 << 30
HOSTILE = "a) Z 1 ("
CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def situation(fake: FakeProc, now: float = 100.0) -> Situation:
    procfs = ProcFS(fake.root)
    return Situation(rule="test", trigger=None, meminfo=procfs.meminfo(), procfs=procfs, now=now)


def ranked(fake: FakeProc, *pids: int, score: float = 0.0) -> list[Ranked]:
    """Candidates as the engine makes them: from stat and oom_score, in the order given."""
    procfs = ProcFS(fake.root)
    return [Ranked(Candidate.from_info(procfs.process_info(p)), score) for p in pids]


def pids(result: Sequence[Ranked]) -> list[int]:
    return [r.candidate.pid for r in result]


def run(
    selector: Selector, fake: FakeProc, candidates: Sequence[Ranked], now: float = 100.0
) -> list[Ranked]:
    result = selector.select(situation(fake, now), candidates)
    assert isinstance(result, list)
    assert result is not candidates
    return result


def options(cls: type[Selector], **table: Any) -> Any:
    """Options the way a policy builds them (errors become PluginError)."""
    return make_options(cls, table)


# -- scope ----------------------------------------------------------------------------------------


def test_scope_cgroup_prefix_matches_whole_components(fake: FakeProc) -> None:
    fake.add_process(10, cgroup="/a")
    fake.add_process(11, cgroup="/a/b")
    fake.add_process(12, cgroup="/ab")
    fake.add_process(13, cgroup="/c")
    result = run(Scope(options(Scope, cgroup=["/a/"])), fake, ranked(fake, 13, 12, 11, 10))
    assert pids(result) == [11, 10]  # incoming order kept
    assert result[0].reason == "in scope: cgroup /a/b under /a"
    everything = run(Scope(options(Scope, cgroup="/")), fake, ranked(fake, 10, 11, 12, 13))
    assert pids(everything) == [10, 11, 12, 13]


def test_scope_uses_the_v1_memory_hierarchy_path(fake: FakeProc) -> None:
    fake.add_process(10, cgroup="5:memory:/jobs/x\n1:name=systemd:/other\n0::/other\n")
    fake.add_process(11, cgroup="5:memory:/other\n0::/jobs/x\n")
    assert pids(run(Scope(options(Scope, cgroup=["/jobs"])), fake, ranked(fake, 10, 11))) == [10]


def test_scope_uid_and_combined_options_must_all_hold(fake: FakeProc) -> None:
    fake.add_process(10, uid=1000, cgroup="/user")
    fake.add_process(11, uid=0, cgroup="/user")
    fake.add_process(12, uid=1000, cgroup="/system")
    fake.add_process(13, uid=1001, cgroup="/user")
    by_uid = run(Scope(options(Scope, uid=[1000, 1001])), fake, ranked(fake, 10, 11, 12, 13))
    assert pids(by_uid) == [10, 12, 13]
    assert by_uid[0].reason == "in scope: uid 1000"
    both = run(
        Scope(options(Scope, uid=1000, cgroup=["/user"])), fake, ranked(fake, 10, 11, 12, 13)
    )
    assert pids(both) == [10]
    assert both[0].reason == "in scope: cgroup /user under /user, uid 1000"


def test_scope_subtree_walks_ppid_through_non_candidates(fake: FakeProc) -> None:
    fake.add_process(10, ppid=1)  # the subtree's root: not itself in scope
    fake.add_process(11, ppid=10)  # not a candidate, but on the way
    fake.add_process(12, ppid=11)
    fake.add_process(13, ppid=12)
    fake.add_process(14, ppid=1)
    fake.add_process(15, ppid=14)
    result = run(Scope(options(Scope, subtree=10)), fake, ranked(fake, 15, 14, 13, 12, 10))
    assert pids(result) == [13, 12]
    assert result[0].reason == "in scope: descendant of pid 10"


def test_scope_subtree_with_a_vanished_ancestor_or_a_ppid_loop(fake: FakeProc) -> None:
    fake.add_process(10, ppid=1)
    fake.add_process(11, ppid=10)
    fake.add_process(12, ppid=11)
    fake.add_process(20, ppid=21)  # a loop, as a pid-reuse race could show it
    fake.add_process(21, ppid=20)
    candidates = ranked(fake, 12, 20)
    fake.remove_process(11)  # exited: 12 was reparented, and is no longer under 10
    assert run(Scope(options(Scope, subtree=10)), fake, candidates) == []


def test_scope_drops_vanished_candidates(fake: FakeProc) -> None:
    fake.add_process(10, cgroup="/a", uid=5)
    fake.add_process(11, cgroup="/a", uid=5)
    candidates = ranked(fake, 10, 11)
    fake.remove_process(10)
    assert pids(run(Scope(options(Scope, cgroup=["/a"])), fake, candidates)) == [11]
    assert pids(run(Scope(options(Scope, uid=[5])), fake, candidates)) == [11]


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({}, "at least one of the options cgroup, cgroup_regex, uid, subtree"),
        ({"cgroup": ["a/b"]}, "cgroup"),
        ({"uid": [-1]}, "uid"),
        ({"uid": ["root"]}, "uid"),
        ({"subtree": 0}, "subtree"),
        ({"subtree": True}, "subtree"),
        ({"pid": 3}, "unknown option 'pid'"),
    ],
)
def test_scope_options_are_validated(table: dict[str, Any], named: str) -> None:
    with pytest.raises(PluginError, match="plugin 'scope'") as info:
        options(Scope, **table)
    assert named in str(info.value)
    assert info.value.option == named.split("'")[1] if "'" in named else named


# -- protect --------------------------------------------------------------------------------------


def test_protect_always_drops_oom_score_adj_minus_1000(fake: FakeProc) -> None:
    fake.add_process(1, comm="systemd", oom_score_adj=-1000)
    fake.add_process(10, comm="worker", oom_score_adj=-999)
    fake.add_process(11, comm="hog", oom_score_adj=500)
    result = run(Protect(), fake, ranked(fake, 11, 1, 10, score=7))
    assert pids(result) == [11, 10]
    assert [r.score for r in result] == [7, 7]  # a filter keeps the incoming score
    assert result[0].reason == (
        "not protected (protected 1 of 3: pid 1 'systemd': oom_score_adj -1000)"
    )


def test_protect_by_regexes_over_comm_cmdline_exe_and_cgroup(
    fake: FakeProc, tmp_path: Path
) -> None:
    fake.add_process(10, comm="sshd")
    fake.add_process(11, comm="python3", cmdline=["python3", "/srv/keep-me.py"])
    fake.add_process(12, comm="db", cgroup="/system.slice/postgres.service")
    fake.add_process(13, comm="app")
    fake.add_process(14, comm="sshd-session")  # re.search, but anchored by the author
    fake.add_process(15, comm="Xorg")
    xorg = tmp_path / "usr" / "lib" / "xorg" / "Xorg"  # exe is matched only if the file exists
    xorg.parent.mkdir(parents=True)
    xorg.touch()
    os.symlink(xorg, os.path.join(fake.root, "15", "exe"))
    selector = Protect(
        options(
            Protect,
            comm=["^sshd$"],
            cmdline="keep-me",
            exe=[r"/Xorg$"],
            cgroup=[r"postgres\.service"],
        )
    )
    result = run(selector, fake, ranked(fake, 10, 11, 12, 13, 14, 15))
    assert pids(result) == [13, 14]
    assert result[0].reason == (
        "not protected (protected 4 of 6: pid 10 'sshd': comm 'sshd' matches '^sshd$';"
        " pid 11 'python3': cmdline 'python3 /srv/keep-me.py' matches 'keep-me';"
        " pid 12 'db': cgroup '/system.slice/postgres.service' matches 'postgres\\\\.service'"
        " and 1 more)"
    )


def test_protect_nothing_protected_reason(fake: FakeProc) -> None:
    fake.add_process(10)
    fake.add_process(11)
    result = run(Protect(options(Protect, comm=["^nope$"])), fake, ranked(fake, 11, 10))
    assert pids(result) == [11, 10]
    assert result[0].reason == "not protected (none of 2 protected)"


def test_protect_hostile_comm(fake: FakeProc) -> None:
    fake.add_process(10, comm=HOSTILE)
    fake.add_process(11, comm="x) S 1 (y")
    candidates = ranked(fake, 10, 11)
    assert candidates[0].candidate.comm == HOSTILE
    result = run(Protect(options(Protect, comm=[r"^a\) Z 1 \($"])), fake, candidates)
    assert pids(result) == [11]
    assert "pid 10 'a) Z 1 ('" in result[0].reason


def test_protect_drops_vanished_processes_without_raising(fake: FakeProc) -> None:
    fake.add_process(10, comm="gone")
    fake.add_process(11, comm="here")
    candidates = ranked(fake, 10, 11)
    fake.remove_process(10)
    result = run(
        Protect(options(Protect, cmdline=["x"], exe=["y"], cgroup=["z"])), fake, candidates
    )
    assert pids(result) == [11]
    assert "pid 10 'gone': oom_score_adj unreadable (gone?)" in result[0].reason


def test_protect_exe_of_a_deleted_file_is_not_identity(spawn: Spawn, tmp_path: Path) -> None:
    # After a package upgrade /proc/<pid>/exe reads "<path> (deleted)": nothing can say
    # which file that was, so an unanchored "^<path>" must not protect it.
    copy = shutil.copy("/bin/sleep", tmp_path / "upgraded")
    process = spawn([str(copy), "600"])
    while os.readlink(f"/proc/{process.pid}/exe") != str(copy):  # until exec is done
        assert process.poll() is None
    procfs = ProcFS("/proc")
    candidate = [Ranked(Candidate.from_info(procfs.process_info(process.pid)))]
    selector = Protect(options(Protect, exe=[f"^{re.escape(str(copy))}"]))

    def decide() -> list[Ranked]:
        s = Situation(rule="t", trigger=None, meminfo=procfs.meminfo(), procfs=procfs, now=0.0)
        return selector.select(s, candidate)

    assert decide() == []  # the genuine file, still there: protected
    os.unlink(copy)
    assert os.readlink(f"/proc/{process.pid}/exe") == f"{copy} (deleted)"
    assert pids(decide()) == [process.pid]


@pytest.mark.parametrize("option", ["comm", "cmdline", "exe", "cgroup"])
def test_protect_bad_regex_fails_when_the_policy_loads(option: str) -> None:
    with pytest.raises(PluginError) as info:
        options(Protect, **{option: ["ok", "(unclosed"]})
    message = str(info.value)
    assert message.startswith("plugin 'protect': ")
    assert info.value.option == option
    assert f"{option}: '(unclosed' is not a valid regular expression" in message
    with pytest.raises(PluginError, match=f"{option}: expected a list of regular expressions"):
        options(Protect, **{option: [3]})


# -- oom-score ------------------------------------------------------------------------------------


def test_oom_score_orders_descending_with_reasons(fake: FakeProc) -> None:
    fake.add_process(10, oom_score=300)
    fake.add_process(11, oom_score=812)
    fake.add_process(12, oom_score=5)
    result = run(OomScore(), fake, ranked(fake, 10, 11, 12))
    assert pids(result) == [11, 10, 12]
    assert [r.score for r in result] == [812, 300, 5]
    assert [r.reason for r in result] == [
        "oom_score 812 (highest of 3)",
        "oom_score 300 (#2 of 3)",
        "oom_score 5 (#3 of 3)",
    ]


def test_oom_score_ties_keep_the_incoming_order(fake: FakeProc) -> None:
    for pid in (10, 11, 12, 13):
        fake.add_process(pid, oom_score=100 if pid != 13 else 1)
    result = run(OomScore(), fake, ranked(fake, 12, 10, 13, 11))
    assert pids(result) == [12, 10, 11, 13]
    assert result[0].reason == (
        "oom_score 100 (highest of 4, tied with 2 others: kept incoming order)"
    )


def test_scorers_on_an_empty_list(fake: FakeProc) -> None:
    for cls in BUILTIN_SELECTORS:
        table = {"cgroup": ["/"]} if cls is Scope else {}
        assert run(cls(options(cls, **table)), fake, []) == []


# -- largest-rss ----------------------------------------------------------------------------------


def test_largest_rss_counts_swap_by_default(fake: FakeProc) -> None:
    fake.set_meminfo(total=16 * GiB, available=8 * GiB, swap_total=4 * GiB, swap_free=3 * GiB)
    fake.add_process(10, rss=300 * MiB, swap=0)
    fake.add_process(11, rss=200 * MiB, swap=200 * MiB)
    fake.add_process(12, rss=100 * MiB)
    with_swap = run(LargestRss(), fake, ranked(fake, 10, 11, 12))
    assert pids(with_swap) == [11, 10, 12]
    assert with_swap[0].score == 400 * MiB
    assert with_swap[0].reason == (
        "RSS+swap 400.0 MiB (RSS 200.0 MiB, swap 200.0 MiB) (largest of 3)"
    )
    rss_only = run(
        LargestRss(options(LargestRss, include_swap=False)), fake, ranked(fake, 10, 11, 12)
    )
    assert pids(rss_only) == [10, 11, 12]
    assert rss_only[0].reason == "RSS 300.0 MiB (largest of 3)"


def test_largest_rss_without_swap_reads_no_status(fake: FakeProc) -> None:
    """SwapTotal 0: no process has swap, so no status read per candidate."""
    fake.set_meminfo(total=16 * GiB, available=8 * GiB)
    fake.add_process(10, rss=300 * MiB)
    fake.add_process(11, rss=200 * MiB)
    candidates = ranked(fake, 10, 11)
    for pid in (10, 11):
        os.remove(f"{fake.root}/{pid}/status")  # a read would now fail
    result = run(LargestRss(), fake, candidates)
    assert pids(result) == [10, 11]
    assert result[0].reason == "RSS 300.0 MiB (largest of 2)"


def test_largest_rss_with_a_vanished_process_counts_no_swap(fake: FakeProc) -> None:
    fake.set_meminfo(total=16 * GiB, available=8 * GiB, swap_total=4 * GiB, swap_free=3 * GiB)
    fake.add_process(10, rss=100 * MiB, swap=500 * MiB)
    fake.add_process(11, rss=200 * MiB)
    candidates = ranked(fake, 10, 11)
    fake.remove_process(10)
    assert pids(run(LargestRss(), fake, candidates)) == [11, 10]


def test_largest_rss_option_must_be_a_bool() -> None:
    with pytest.raises(PluginError, match="include_swap: expected true or false"):
        options(LargestRss, include_swap="yes")


# -- memory-growth --------------------------------------------------------------------------------


def test_memory_growth_size_first_then_growth(fake: FakeProc) -> None:
    fake.set_meminfo(total=1 * GiB, available=100 * MiB)
    fake.add_process(10, rss=100 * MiB)
    fake.add_process(11, rss=600 * MiB)  # >= 50% of MemTotal
    fake.add_process(12, rss=50 * MiB)
    fake.add_process(13, rss=700 * MiB)
    selector = MemoryGrowth()
    first = run(selector, fake, ranked(fake, 10, 11, 12, 13), now=10.0)
    assert pids(first) == [13, 11, 10, 12]  # large by size; the rest unseen: incoming order
    assert first[0].reason == (
        "RSS 700.0 MiB at or above size_threshold 512.0 MiB (50% of MemTotal) (largest of 2)"
    )
    assert first[2].reason == (
        "RSS 100.0 MiB below size_threshold 512.0 MiB (50% of MemTotal), after 2 larger;"
        " not seen before: growth counted as 0 (fastest of 2, tied with 1 other: kept"
        " incoming order)"
    )
    # Two seconds later 12 grew by 20 MiB, 10 shrank.
    fake.add_process(10, rss=90 * MiB)
    fake.add_process(12, rss=70 * MiB)
    second = run(selector, fake, ranked(fake, 10, 11, 12, 13), now=12.0)
    assert pids(second) == [13, 11, 12, 10]
    assert second[2].score == 10 * MiB
    assert second[2].reason.endswith("growing 10.0 MiB/s over 2.00s (fastest of 2)")
    assert second[3].reason.endswith("shrinking 5.0 MiB/s over 2.00s (#2 of 2)")


def test_memory_growth_identity_prune_and_same_instant(fake: FakeProc) -> None:
    fake.add_process(10, rss=10 * MiB, start_time=500)
    fake.add_process(11, rss=10 * MiB)
    selector = MemoryGrowth(options(MemoryGrowth, size_threshold="1GiB"))
    run(selector, fake, ranked(fake, 10, 11), now=1.0)
    # Same instant: no rate from a zero interval; the first sample stays the baseline.
    fake.add_process(11, rss=30 * MiB)
    same = run(selector, fake, ranked(fake, 10, 11), now=1.0)
    assert same[1].reason.endswith("seen again at the same time: growth counted as 0 (#2 of 2)")
    later = run(selector, fake, ranked(fake, 10, 11), now=3.0)
    assert pids(later) == [11, 10]
    assert later[0].score == 10 * MiB  # (30 - 10) MiB over 2 s from the kept baseline
    # PID 10 reused by another process (another start time): not seen before.
    fake.add_process(10, rss=500 * MiB, start_time=900)
    reused = run(selector, fake, ranked(fake, 10, 11), now=4.0)
    assert pids(reused) == [10, 11]  # both at growth 0 now: incoming order
    assert "not seen before" in reused[0].reason
    # 11 is absent from one call: forgotten, so unseen again afterwards.
    run(selector, fake, ranked(fake, 10), now=5.0)
    fake.add_process(11, rss=600 * MiB)
    back = run(selector, fake, ranked(fake, 10, 11), now=6.0)
    assert "not seen before" in next(r.reason for r in back if r.candidate.pid == 11)


def test_memory_growth_vanished_process(fake: FakeProc) -> None:
    fake.add_process(10, rss=10 * MiB)
    fake.add_process(11, rss=10 * MiB)
    candidates = ranked(fake, 10, 11)
    fake.remove_process(10)
    assert pids(run(MemoryGrowth(), fake, candidates)) == [10, 11]


@pytest.mark.parametrize("value", ["lots", "150%", -1, True])
def test_memory_growth_bad_size_threshold(value: object) -> None:
    with pytest.raises(PluginError, match="size_threshold: "):
        options(MemoryGrowth, size_threshold=value)


# -- prefer-avoid ---------------------------------------------------------------------------------


def test_prefer_avoid_after_oom_score_like_earlyoom(fake: FakeProc) -> None:
    fake.add_process(10, comm="postgres", oom_score=900)
    fake.add_process(11, comm="chrome", oom_score=300)
    fake.add_process(12, comm="bash", oom_score=500)
    fake.add_process(13, comm="chromium-avoid", oom_score=200)
    incoming = run(OomScore(), fake, ranked(fake, 10, 11, 12, 13))
    selector = PreferAvoid(options(PreferAvoid, prefer=["^chrom"], avoid=["^postgres$", "avoid"]))
    result = run(selector, fake, incoming)
    assert pids(result) == [11, 12, 13, 10]
    assert [r.score for r in result] == [1300, 500, 200, -100]
    assert result[0].reason == (
        "prefer: comm 'chrome' matches '^chrom'; score 300 + 1000 = 1300 (highest of 4)"
    )
    assert result[1].reason == "no prefer/avoid match; score 500 (#2 of 4)"
    assert result[2].reason == (
        "prefer: comm 'chromium-avoid' matches '^chrom'; avoid: comm 'chromium-avoid' matches"
        " 'avoid'; score 200 + 0 = 200 (#3 of 4)"
    )
    assert result[3].reason == (
        "avoid: comm 'postgres' matches '^postgres$'; score 900 - 1000 = -100 (#4 of 4)"
    )


def test_prefer_avoid_fields_and_weight(fake: FakeProc) -> None:
    fake.add_process(10, comm="python3", cmdline=["python3", "train.py"])
    fake.add_process(11, comm="train", cmdline=["/bin/train"])
    candidates = ranked(fake, 10, 11)
    by_comm = PreferAvoid(options(PreferAvoid, prefer=["train"], weight=5))
    assert pids(run(by_comm, fake, candidates)) == [11, 10]
    by_cmdline = PreferAvoid(options(PreferAvoid, prefer=[r"train\.py"], field="cmdline"))
    result = run(by_cmdline, fake, candidates)
    assert pids(result) == [10, 11]
    assert result[0].reason.startswith("prefer: cmdline 'python3 train.py' matches")
    both = PreferAvoid(options(PreferAvoid, avoid=["python"], field="both", weight=2.5))
    result = run(both, fake, candidates)
    assert pids(result) == [11, 10]
    assert result[1].score == -2.5


def test_prefer_avoid_vanished_and_hostile(fake: FakeProc) -> None:
    fake.add_process(10, comm=HOSTILE)
    fake.add_process(11, comm="x")
    candidates = ranked(fake, 11, 10)
    fake.remove_process(11)
    selector = PreferAvoid(options(PreferAvoid, prefer=[r"\) Z"], field="both"))
    result = run(selector, fake, candidates)
    assert pids(result) == [10, 11]
    assert result[0].reason.startswith("prefer: comm 'a) Z 1 (' matches")


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"prefer": ["[a-"]}, "prefer: '[a-' is not a valid regular expression"),
        ({"avoid": ["*"]}, "avoid: '*' is not a valid regular expression"),
        ({"field": "exe"}, "'field' must be in"),
        ({"weight": -1}, "weight: expected a positive number"),
        ({"weight": float("nan")}, "weight: expected a positive number"),
        ({"weight": "1000"}, "weight: expected a positive number"),
    ],
)
def test_prefer_avoid_options_are_validated(table: dict[str, Any], named: str) -> None:
    with pytest.raises(PluginError, match="plugin 'prefer-avoid'") as info:
        options(PreferAvoid, **table)
    assert named in str(info.value)


# -- oom-score-adj-tiers --------------------------------------------------------------------------


def test_oom_score_adj_tiers_like_lmkd(fake: FakeProc) -> None:
    fake.add_process(10, oom_score_adj=900, rss=10 * MiB)
    fake.add_process(11, oom_score_adj=900, rss=50 * MiB)
    fake.add_process(12, oom_score_adj=500, rss=900 * MiB)
    fake.add_process(13, oom_score_adj=0, rss=1 * GiB)
    fake.add_process(14, oom_score_adj=-100, rss=2 * GiB)
    fake.add_process(15, oom_score_adj=-1000, rss=2 * GiB)
    fake.add_process(16, oom_score_adj=900, rss=10 * MiB)
    candidates = ranked(fake, 10, 11, 12, 13, 14, 15, 16)
    result = run(OomScoreAdjTiers(), fake, candidates)
    assert pids(result) == [11, 10, 16, 12, 13]
    assert [r.score for r in result] == [900, 900, 900, 500, 0]
    assert result[0].reason == (
        "oom_score_adj 900: highest of 3 non-empty tiers at or above min_adj 0;"
        " RSS 50.0 MiB (largest of 3 in the tier)"
    )
    assert result[3].reason == (
        "oom_score_adj 500: #2 of 3 non-empty tiers; RSS 900.0 MiB (largest of 1 in the tier)"
    )
    high = run(OomScoreAdjTiers(options(OomScoreAdjTiers, min_adj=600)), fake, candidates)
    assert pids(high) == [11, 10, 16]


def test_oom_score_adj_tiers_drop_vanished(fake: FakeProc) -> None:
    fake.add_process(10, oom_score_adj=900)
    fake.add_process(11, oom_score_adj=100)
    candidates = ranked(fake, 10, 11)
    fake.remove_process(10)
    assert pids(run(OomScoreAdjTiers(), fake, candidates)) == [11]


@pytest.mark.parametrize("value", [-1, -1000, 1001, "0", 0.5, True])
def test_oom_score_adj_tiers_min_adj_is_validated(value: object) -> None:
    with pytest.raises(PluginError, match="min_adj: expected an oom_score_adj from 0 to 1000"):
        options(OomScoreAdjTiers, min_adj=value)


# -- newest / oldest ------------------------------------------------------------------------------


def test_newest_and_oldest(fake: FakeProc) -> None:
    fake.add_process(10, start_time=5 * CLK_TCK)
    fake.add_process(11, start_time=50 * CLK_TCK)
    fake.add_process(12, start_time=5 * CLK_TCK)
    fake.add_process(13, start_time=20 * CLK_TCK)
    candidates = ranked(fake, 12, 10, 11, 13)
    newest = run(Newest(), fake, candidates)
    assert pids(newest) == [11, 13, 12, 10]
    assert newest[0].reason == "started 50.00s after boot (newest of 4)"
    oldest = run(Oldest(), fake, candidates)
    assert pids(oldest) == [12, 10, 13, 11]  # 12 and 10 tie: incoming order
    assert oldest[0].reason == (
        "started 5.00s after boot (oldest of 4, tied with 1 other: kept incoming order)"
    )


# -- cgroup-victims -------------------------------------------------------------------------------


@pytest.fixture
def cgroups(tmp_path: Path) -> Path:
    """A directory standing for the cgroup root: /a, /a/b, /b."""
    root = tmp_path / "cgroup"
    for sub in ("a", "a/b", "b"):
        (root / sub).mkdir(parents=True)
    return root


def set_xattr(path: Path, name: str, value: bytes = b"1") -> None:
    try:
        os.setxattr(path, name, value)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip(f"needs user xattrs (user.*) on {path}'s filesystem: {exc}")
        raise


def victims(fake: FakeProc, root: Path, *pids_: int, **table: Any) -> list[Ranked]:
    selector = CgroupVictims(options(CgroupVictims, cgroup_root=str(root), **table))
    return run(selector, fake, ranked(fake, *pids_))


def add_cgroup_tree(fake: FakeProc) -> None:
    fake.add_process(10, cgroup="/a", rss=100 * MiB)
    fake.add_process(11, cgroup="/b", rss=120 * MiB)
    fake.add_process(12, cgroup="/a", rss=150 * MiB)
    fake.add_process(13, cgroup="/a/b", rss=10 * MiB)


def test_cgroup_victims_by_usage(fake: FakeProc, cgroups: Path) -> None:
    add_cgroup_tree(fake)
    result = victims(fake, cgroups, 10, 11, 12, 13)
    assert pids(result) == [12, 10]
    assert [r.score for r in result] == [150 * MiB, 100 * MiB]
    assert result[0].reason == (
        "cgroup /a: usage 250.0 MiB in 2 processes (largest usage of 3); RSS 150.0 MiB"
        " (largest of 2)"
    )


def test_cgroup_victims_by_pressure(fake: FakeProc, cgroups: Path) -> None:
    add_cgroup_tree(fake)
    (cgroups / "a" / "memory.pressure").write_text(
        "some avg10=1.50 avg60=0.00 avg300=0.00 total=10\n"
        "full avg10=0.50 avg60=0.00 avg300=0.00 total=5\n"
    )
    (cgroups / "b" / "memory.pressure").write_text(
        "some avg10=42.25 avg60=3.00 avg300=1.00 total=999\n"
        "full avg10=40.00 avg60=0.00 avg300=0.00 total=5\n"
    )
    (cgroups / "a" / "b" / "memory.pressure").write_text("garbage\n")
    result = victims(fake, cgroups, 10, 11, 12, 13, by="pressure")
    assert pids(result) == [11]
    assert result[0].reason == (
        "cgroup /b: usage 120.0 MiB in 1 process, memory pressure some avg10 42.25"
        " (highest pressure of 3); RSS 120.0 MiB (largest of 1)"
    )
    # No pressure anywhere: counted as 0, usage breaks the tie.
    for sub in ("a", "b"):
        (cgroups / sub / "memory.pressure").unlink()
    result = victims(fake, cgroups, 10, 11, 12, 13, by="pressure")
    assert pids(result) == [12, 10]
    assert "memory.pressure unreadable (counted as 0)" in result[0].reason


def test_cgroup_victims_xattrs(fake: FakeProc, cgroups: Path) -> None:
    add_cgroup_tree(fake)
    set_xattr(cgroups / "a" / "b", "user.oomd_prefer")
    result = victims(fake, cgroups, 10, 11, 12, 13)
    assert pids(result) == [13]
    assert result[0].reason.startswith(
        "cgroup /a/b: usage 10.0 MiB in 1 process (user.oomd_prefer set (1 of 3);"
        " largest usage of 1)"
    )
    os.removexattr(cgroups / "a" / "b", "user.oomd_prefer")
    set_xattr(cgroups / "a" / "b", "user.oomd_prefer", b"0")  # set to false: not preferred
    set_xattr(cgroups / "a", "user.oomd_avoid")
    result = victims(fake, cgroups, 10, 11, 12, 13)
    assert pids(result) == [11]
    assert "1 with user.oomd_avoid skipped" in result[0].reason
    # Only avoided cgroups left: the avoided one is chosen after all.
    result = victims(fake, cgroups, 10, 12)
    assert pids(result) == [12, 10]
    assert "every usable cgroup has user.oomd_avoid (1)" in result[0].reason
    # omit: never.
    set_xattr(cgroups / "b", "user.oomd_omit", b"yes")
    result = victims(fake, cgroups, 10, 11, 12, 13)
    assert pids(result) == [13]
    assert "1 with user.oomd_omit skipped" in result[0].reason
    assert victims(fake, cgroups, 11) == []


def test_cgroup_victims_ignores_xattrs_of_cgroups_not_owned_by_root(
    fake: FakeProc, cgroups: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory away (chown)")
    add_cgroup_tree(fake)
    set_xattr(cgroups / "b", "user.oomd_prefer")
    os.chown(cgroups / "b", 65534, 65534)
    assert pids(victims(fake, cgroups, 10, 11, 12, 13)) == [12, 10]  # by usage: /a
    trusting = victims(fake, cgroups, 10, 11, 12, 13, xattrs_root_only=False)
    assert pids(trusting) == [11]


def test_cgroup_victims_vanished_and_hostile(fake: FakeProc, cgroups: Path) -> None:
    fake.add_process(10, comm=HOSTILE, cgroup="/a", rss=1 * MiB)
    fake.add_process(11, cgroup="/b", rss=500 * MiB)
    fake.add_process(12, cgroup="/missing", rss=2 * MiB)  # no directory: no xattrs, no pressure
    candidates = ranked(fake, 10, 11, 12)
    fake.remove_process(11)  # its cgroup is unknown now
    selector = CgroupVictims(options(CgroupVictims, cgroup_root=str(cgroups), by="pressure"))
    result = run(selector, fake, candidates)
    assert pids(result) == [12]
    fake.remove_process(12)
    fake.remove_process(10)
    assert run(selector, fake, candidates) == []


def test_cgroup_victims_with_the_hosts_cgroup_mount(fake: FakeProc) -> None:
    # No cgroup_root: the directory comes from this host's mountinfo. Fake paths do not exist
    # there, so nothing is preferred or avoided; nothing raises.
    fake.add_process(10, cgroup="/reapkit-test-does-not-exist/a", rss=1 * MiB)
    fake.add_process(11, cgroup="/reapkit-test-does-not-exist/b", rss=2 * MiB)
    result = run(CgroupVictims(options(CgroupVictims, by="pressure")), fake, ranked(fake, 10, 11))
    assert pids(result) == [11]


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"by": "swap"}, "'by' must be in ('usage', 'pressure')"),
        ({"cgroup_root": "sys/fs/cgroup"}, "cgroup_root: expected an absolute directory path"),
        ({"xattrs_root_only": 1}, "xattrs_root_only: expected true or false"),
    ],
)
def test_cgroup_victims_options_are_validated(table: dict[str, Any], named: str) -> None:
    with pytest.raises(PluginError, match="plugin 'cgroup-victims'") as info:
        options(CgroupVictims, **table)
    assert named in str(info.value)


# -- registration ---------------------------------------------------------------------------------

NAMES = {
    "scope",
    "protect",
    "oom-score",
    "largest-rss",
    "memory-growth",
    "prefer-avoid",
    "oom-score-adj-tiers",
    "cgroup-victims",
    "newest",
    "oldest",
}

# A valid policy table for each, every option given.
TABLES: dict[str, dict[str, Any]] = {
    "scope": {"cgroup": ["/user.slice"], "uid": [1000], "subtree": 1},
    "protect": {"comm": ["^sshd$"], "cmdline": [], "exe": ["/bin/"], "cgroup": ["init"]},
    "oom-score": {},
    "largest-rss": {"include_swap": False},
    "memory-growth": {"size_threshold": "2GiB"},
    "prefer-avoid": {"prefer": ["a"], "avoid": ["b"], "field": "both", "weight": 300},
    "oom-score-adj-tiers": {"min_adj": 200},
    "cgroup-victims": {"by": "pressure", "cgroup_root": "/sys/fs/cgroup"},
    "newest": {},
    "oldest": {},
}


def test_register_builtins() -> None:
    registry = PluginRegistry()
    registered = register_builtins(registry)
    assert set(registry.names("selector")) == NAMES
    assert {cls.name for cls in registered if cls.kind == "selector"} == NAMES
    assert set(BUILTIN_SELECTORS) <= set(registered)
    assert set(registry.names("action"))  # the built-in actions come along
    register_builtins(registry)  # again: harmless
    ensure_registered(registry)
    infos = {info.name: info for info in registry.plugins()}
    for name in NAMES:
        cls = registry.get("selector", name)
        assert validate_plugin(cls) is cls
        assert cls.inline
        assert attrs.has(cls.Options)
        assert infos[name].source == "built-in"
        assert cls.__doc__
    assert infos["protect"].options == ("comm", "cmdline", "exe", "cgroup", "uid", "require")


@pytest.mark.parametrize("name", sorted(NAMES))
def test_options_from_policy_tables(name: str) -> None:
    registry = PluginRegistry()
    register_builtins(registry)
    cls = registry.get("selector", name)
    opts = make_options(cls, {"name": name, **TABLES[name]})
    instance = cls(opts)
    assert instance.options == opts
    assert hash(opts) == hash(make_options(cls, TABLES[name]))  # frozen, comparable on reload
    with pytest.raises(PluginError, match=r"unknown option 'colour'"):
        make_options(cls, {**TABLES[name], "colour": "red"})


def test_options_classes_are_frozen() -> None:
    opts = make_options(Protect, {"comm": ["x"]})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        opts.comm = ("y",)


# -- properties -----------------------------------------------------------------------------------

comms = st.one_of(
    st.sampled_from(["bash", "chrome", "postgres", HOSTILE, "x) S 1 (y", " ", ""]),
    st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
        max_size=15,
    ),
)
processes = st.lists(
    st.fixed_dictionaries(
        {
            "comm": comms,
            "rss": st.integers(0, 64),  # pages
            "swap": st.integers(0, 8),  # kB multiples of 1024
            "oom_score": st.integers(0, 2000),
            "oom_score_adj": st.integers(-1000, 1000),
            "start_time": st.integers(0, 6),  # few values: many ties
            "uid": st.integers(0, 2),
            "cgroup": st.sampled_from(["/", "/a", "/a/b", "/ab", "/b"]),
            "ppid": st.integers(1, 30),
        }
    ),
    max_size=14,
)


@contextlib.contextmanager
def tree(specs: list[dict[str, Any]]) -> Iterator[FakeProc]:
    """A fake /proc with pids 2, 3, ... as ``specs`` say (hypothesis cannot use tmp_path)."""
    with tempfile.TemporaryDirectory() as directory:
        fake = FakeProc(directory)
        for i, spec in enumerate(specs):
            fake.add_process(
                i + 2,
                **{**spec, "rss": spec["rss"] * fake.page_size, "swap": spec["swap"] * 1024},
            )
        yield fake


def stable_ties(result: Sequence[Ranked], incoming: Sequence[int]) -> bool:
    """Candidates of equal score keep their incoming relative order."""
    position = {pid: i for i, pid in enumerate(incoming)}
    return all(
        position[a.candidate.pid] < position[b.candidate.pid]
        for a, b in itertools.pairwise(result)
        if a.score == b.score
    )


SCORERS: list[tuple[type[Selector], dict[str, Any], bool]] = [
    # (class, options, whether the scores come out sorted descending)
    (OomScore, {}, True),
    (LargestRss, {}, True),
    (LargestRss, {"include_swap": False}, True),
    (Newest, {}, True),
    (Oldest, {}, False),
    (MemoryGrowth, {"size_threshold": "50%"}, False),
    (PreferAvoid, {"prefer": ["^c"], "avoid": [r"\)"], "field": "both"}, True),
]


@settings(max_examples=60, deadline=None)
@given(specs=processes, data=st.data())
def test_scorers_return_a_stable_permutation(specs: list[dict[str, Any]], data: Any) -> None:
    with tree(specs) as fake:
        order = data.draw(st.permutations([i + 2 for i in range(len(specs))]), label="order")
        candidates = ranked(fake, *order)
        gone = data.draw(st.sets(st.sampled_from(order)) if order else st.just(set()))
        for pid in gone:
            fake.remove_process(pid)
        for cls, table, descending in SCORERS:
            result = run(cls(options(cls, **table)), fake, candidates)
            assert sorted(pids(result)) == sorted(order), cls.name
            assert all(r.reason for r in result), cls.name
            scores = [r.score for r in result]
            if descending:
                assert scores == sorted(scores, reverse=True), cls.name
                assert stable_ties(result, order), cls.name
            elif cls is Oldest:
                assert scores == sorted(scores), cls.name
                assert stable_ties(result, order), cls.name


@settings(max_examples=60, deadline=None)
@given(specs=processes, data=st.data())
def test_filters_return_a_subset_in_the_same_order(specs: list[dict[str, Any]], data: Any) -> None:
    with tree(specs) as fake:
        order = data.draw(st.permutations([i + 2 for i in range(len(specs))]), label="order")
        candidates = ranked(fake, *order, score=3.0)
        gone = data.draw(st.sets(st.sampled_from(order)) if order else st.just(set()))
        for pid in gone:
            fake.remove_process(pid)
        alive = [p for p in order if p not in gone]
        spec = {i + 2: s for i, s in enumerate(specs)}

        def under_2(pid: int) -> bool:
            # The candidate's own ppid is from its snapshot; ancestors are read at select
            # time, so a vanished or missing ancestor (or a ppid loop) ends the walk.
            if pid == 2:
                return False
            seen, parent = {pid}, spec[pid]["ppid"]
            while parent != 2:
                if parent <= 1 or parent in seen or parent not in spec or parent in gone:
                    return False
                seen.add(parent)
                parent = spec[parent]["ppid"]
            return True

        # (selector, which candidates it keeps)
        filters: list[tuple[Selector, Any]] = [
            (Scope(options(Scope, cgroup=["/a"])), lambda p: spec[p]["cgroup"] in ("/a", "/a/b")),
            (Scope(options(Scope, uid=[1])), lambda p: spec[p]["uid"] == 1),
            (
                Protect(options(Protect, comm=["^c"])),
                lambda p: spec[p]["oom_score_adj"] != -1000 and not spec[p]["comm"].startswith("c"),
            ),
        ]
        for selector, keeps in filters:
            result = run(selector, fake, candidates)
            assert pids(result) == [p for p in alive if keeps(p)], selector
            assert all(r.score == 3.0 for r in result), selector
        # subtree reads no file of the candidate itself: a vanished child of 2 is still its child.
        result = run(Scope(options(Scope, subtree=2)), fake, candidates)
        assert pids(result) == [p for p in order if under_2(p)]
        assert all(r.score == 3.0 for r in result)

        min_adj = data.draw(st.integers(0, 1000), label="min_adj")
        tiers = run(OomScoreAdjTiers(options(OomScoreAdjTiers, min_adj=min_adj)), fake, candidates)
        assert set(pids(tiers)) == {p for p in alive if spec[p]["oom_score_adj"] >= min_adj}
        keys = [(spec[p]["oom_score_adj"], spec[p]["rss"]) for p in pids(tiers)]
        assert keys == sorted(keys, reverse=True)

        with tempfile.TemporaryDirectory() as root:
            chosen = run(CgroupVictims(options(CgroupVictims, cgroup_root=root)), fake, candidates)
        assert set(pids(chosen)) <= set(alive)
        assert len({spec[p]["cgroup"] for p in pids(chosen)}) <= 1
        assert bool(chosen) == bool(alive)
        assert [r.score for r in chosen] == sorted((r.score for r in chosen), reverse=True)

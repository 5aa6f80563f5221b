"""Whole incidents, replayed over every example policy and the default (``reapkit replay`` on
synthetic traces: deterministic, nothing killed, no kernel needed).

The machine: 8 GiB, 6 GiB available, ``sshd`` (a system account), an editor, a browser and
the process the incident is about. What each policy must do is what its file's comments promise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reapkit.testing import TraceBuilder, replay

POLICIES = Path(__file__).resolve().parent.parent / "examples" / "policies"
EXAMPLES = sorted(p.name for p in POLICIES.glob("*.toml"))
#: The default policy is ``None``.
ALL = [None, *EXAMPLES]


USER = "/user.slice/user-1000.slice"
#: Where the leaker runs: a BestEffort pod for the Kubernetes policy (it acts on pods only).
LEAKER_CGROUP = {
    "kubernetes.toml": "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice"
}


def _machine() -> TraceBuilder:
    trace = TraceBuilder(mem_total="8GiB", mem_available="6GiB")
    trace.process(300, "sshd", uid=0, rss="8MiB", cgroup="/system.slice/ssh.service")
    trace.process(1100, "editor", rss="300MiB", cgroup=USER)
    trace.process(1200, "browser", rss="900MiB", cgroup=USER)
    return trace


def _path(name: str | None) -> str | None:
    return None if name is None else str(POLICIES / name)


def _victims(name: str | None, trace: TraceBuilder) -> list[str]:
    """Whom the policy chose, up to and including the first kill the trace does not show
    (after it, the trace shows a world where that victim lived on: counterfactual)."""
    result = replay(_path(name), trace.build())
    return [
        d.record.victim.comm
        for d in result.decisions
        if d.record.victim is not None and not d.counterfactual
    ]


@pytest.mark.parametrize("name", [n for n in ALL if n != "lmkd.toml"], ids=lambda n: n or "default")
def test_a_fast_leak_costs_the_leaker_first(name: str | None) -> None:
    trace = _machine()
    trace.process(2000, "leaker", rss="200MiB", cgroup=LEAKER_CGROUP.get(name or "", USER))
    trace.leak(2000, "1GiB", start=1.0, seconds=7.0)  # 6 GiB gone by 7 s
    victims = _victims(name, trace)
    assert victims, f"{name or 'the default policy'} let memory run out"
    assert victims[0] == "leaker"
    assert "sshd" not in victims


def test_lmkd_takes_cached_apps_first_and_never_the_foreground() -> None:
    # Android's tiers by oom_score_adj: a cached app 900, a perceptible one 200, the
    # foreground 0. Under partial stall lmkd takes cached apps only (lmkd.toml's medium).
    trace = _machine()
    trace.process(2000, "foreground", rss="1GiB", oom_score_adj=0, cgroup=USER)
    trace.process(2100, "cached", rss="200MiB", oom_score_adj=900, cgroup=USER)
    trace.process(2200, "perceptible", rss="300MiB", oom_score_adj=200, cgroup=USER)
    trace.thrashing_cache(start=1.0, seconds=6.0, some=0.3, full=0.1, available="20%")
    victims = _victims("lmkd.toml", trace)
    assert victims == ["cached"]


@pytest.mark.parametrize("name", ALL, ids=lambda n: n or "default")
def test_pressure_with_plenty_of_memory_kills_nobody(name: str | None) -> None:
    # A page cache thrashing while 30 % of memory is available (nohang #25: PSI alone killed
    # with 90 % free). lmkd acts on PSI alone, as its file says, but only on cached apps
    # (oom_score_adj 900 and up): there are none here.
    trace = _machine()
    trace.thrashing_cache(start=1.0, seconds=8.0, some=0.6, full=0.4, available="30%")
    assert _victims(name, trace) == []


@pytest.mark.parametrize("name", ALL, ids=lambda n: n or "default")
def test_a_fork_storm_of_small_workers_with_memory_left_kills_nobody(name: str | None) -> None:
    trace = _machine()
    trace.process(3000, "make", rss="20MiB", cgroup="/user.slice/user-1000.slice")
    trace.fork_storm(3000, 400, start=1.0, seconds=4.0, rss="8MiB", lifetime=0.5, comm="cc1")
    assert _victims(name, trace) == []

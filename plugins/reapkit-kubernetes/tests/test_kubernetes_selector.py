"""The ``kubernetes-qos`` selector on fake ``/proc`` trees, its options, and its registration.

Candidates are built the way the engine builds them (``reapkit.testing.read_candidates``);
every result goes through the engine's own check that a selector returns only candidates it
was given (``reapkit.testing.run_selector``).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import reapkit
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from reapkit import PluginError, PluginRegistry, Ranked, load_policy
from reapkit.lowlevel import Engine, ProcFS
from reapkit.testing import FakeProc, make_options, make_situation, read_candidates, run_selector

from reapkit_kubernetes import KubernetesQos, KubernetesQosOptions, parse_cgroup_path

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")

UIDS = {
    "guaranteed": "11111111-2222-4333-8444-555555555555",
    "burstable": "22222222-3333-4444-8555-666666666666",
    "burstable2": "23232323-3434-4545-8656-767676767676",
    "besteffort": "33333333-4444-4555-8666-777777777777",
    "besteffort2": "34343434-4545-4656-8767-878787878787",
}


def cid(n: int) -> str:
    return f"{n:x}".rjust(64, "c")


def systemd(qos: str, uid: str, container: str) -> str:
    u = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{container}.scope"
    return (
        f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"
        f"/cri-containerd-{container}.scope"
    )


def cgroupfs(qos: str, uid: str, container: str) -> str:
    if qos == "guaranteed":
        return f"/kubepods/pod{uid}/{container}"
    return f"/kubepods/{qos}/pod{uid}/{container}"


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    """A node: system daemons, a Guaranteed pod, two Burstable and two BestEffort containers.

    oom_score as the kubelet's oom_score_adj makes them (Guaranteed -997, BestEffort 1000,
    Burstable in between); RSS in a different order, to tell ``within`` apart."""
    proc = FakeProc(tmp_path / "proc")
    proc.add_process(1, comm="systemd", cgroup="/init.scope", rss=12 * MiB, oom_score=0)
    proc.add_process(
        90, comm="kubelet", cgroup="/system.slice/kubelet.service", rss=300 * MiB, oom_score=10
    )
    proc.add_process(
        91,
        comm="containerd",
        cgroup="/system.slice/containerd.service",
        rss=900 * MiB,
        oom_score=40,
    )
    pods = [
        # pid, comm, QoS class, pod UID, RSS, oom_score
        (200, "postgres", "guaranteed", UIDS["guaranteed"], 4000 * MiB, 3),
        (300, "java", "burstable", UIDS["burstable"], 2000 * MiB, 700),
        (301, "nginx", "burstable", UIDS["burstable2"], 100 * MiB, 900),
        (400, "batch", "besteffort", UIDS["besteffort"], 50 * MiB, 1010),
        (401, "cache", "besteffort", UIDS["besteffort2"], 800 * MiB, 1002),
    ]
    for pid, comm, qos_class, uid, rss, score in pods:
        cgroup = systemd(qos_class, uid, cid(pid))
        proc.add_process(pid, comm=comm, cgroup=cgroup, rss=rss, oom_score=score)
    return proc


ALL = (1, 90, 91, 200, 300, 301, 400, 401)


def ranked(fake: FakeProc, *pids: int) -> list[Ranked]:
    return read_candidates(fake, pids)


def pids(result: Sequence[Ranked]) -> list[int]:
    return [r.candidate.pid for r in result]


def run(selector: KubernetesQos, fake: FakeProc, candidates: Sequence[Ranked]) -> list[Ranked]:
    # As the engine calls it, and through its own check: only candidates it was given.
    return run_selector(selector, make_situation(fake), candidates)


def qos(**table: Any) -> KubernetesQos:
    """The selector with options built the way a policy builds them."""
    return KubernetesQos(make_options(KubernetesQos, **table))


# -- choosing ------------------------------------------------------------------------------------


def test_default_besteffort_then_burstable_never_guaranteed_nor_non_pods(fake: FakeProc) -> None:
    result = run(qos(), fake, ranked(fake, *ALL))
    assert pids(result) == [400, 401, 301, 300]  # by oom_score inside each class
    assert [r.score for r in result] == [2.0, 2.0, 1.0, 1.0]
    tail = "order: BestEffort, then Burstable; dropped 3 not in a pod, 1 Guaranteed"
    assert result[0].reason == (
        f"BestEffort pod {UIDS['besteffort']} container {cid(400)[:12]} (containerd, systemd),"
        f" oom_score 1010 (highest of 2 BestEffort; {tail})"
    )
    assert result[2].reason == (
        f"Burstable pod {UIDS['burstable2']} container {cid(301)[:12]} (containerd, systemd),"
        f" oom_score 900 (highest of 2 Burstable; {tail})"
    )
    assert result[3].reason.endswith(f"oom_score 700 (#2 of 2 Burstable; {tail})")


def test_the_default_options_are_the_documented_ones() -> None:
    assert KubernetesQos().options == KubernetesQosOptions(
        never=("guaranteed",),
        order=("besteffort", "burstable"),
        non_pods="protect",
        within="oom-score",
        cgroupns_root=None,
    )


def test_largest_rss_within_a_class(fake: FakeProc) -> None:
    result = run(qos(within="largest-rss"), fake, ranked(fake, *ALL))
    assert pids(result) == [401, 400, 300, 301]
    assert ", RSS 800.0 MiB (largest of 2 BestEffort;" in result[0].reason
    assert ", RSS 2.0 GiB (largest of 2 Burstable;" in result[2].reason


def test_burstable_first_when_ordered_so(fake: FakeProc) -> None:
    result = run(qos(order=["burstable", "besteffort"]), fake, ranked(fake, *ALL))
    assert pids(result) == [301, 300, 400, 401]


def test_only_besteffort(fake: FakeProc) -> None:
    result = run(
        qos(order=["besteffort"], never=["burstable", "guaranteed"]), fake, ranked(fake, *ALL)
    )
    assert pids(result) == [400, 401]
    assert result[0].reason.endswith("dropped 3 not in a pod, 1 Guaranteed, 2 Burstable)")


def test_guaranteed_only_when_asked_for_by_name(fake: FakeProc) -> None:
    result = run(
        qos(never=[], order=["BestEffort", "Burstable", "Guaranteed"]), fake, ranked(fake, *ALL)
    )
    assert pids(result) == [400, 401, 301, 300, 200]
    assert result[-1].reason.startswith(f"Guaranteed pod {UIDS['guaranteed']} container")
    assert [r.score for r in result] == [3.0, 3.0, 2.0, 2.0, 1.0]


@pytest.mark.parametrize(
    ("non_pods", "expected"),
    [
        ("protect", [400, 401, 301, 300]),
        ("last", [400, 401, 301, 300, 91, 90, 1]),
        ("first", [91, 90, 1, 400, 401, 301, 300]),
    ],
)
def test_non_pods(fake: FakeProc, non_pods: str, expected: list[int]) -> None:
    result = run(qos(non_pods=non_pods), fake, ranked(fake, *ALL))
    assert pids(result) == expected
    if non_pods != "protect":
        daemon = next(r for r in result if r.candidate.pid == 91)
        assert daemon.reason.startswith(
            "not in a pod (cgroup /system.slice/containerd.service), oom_score 40"
            " (highest of 3 not in a pod; order: "
        )
    # Only the Guaranteed pod is dropped then, and the reasons say so.
    assert result[0].reason.endswith(
        "dropped 3 not in a pod, 1 Guaranteed)"
        if non_pods == "protect"
        else "dropped 1 Guaranteed)"
    )


def test_ties_keep_the_incoming_order(fake: FakeProc) -> None:
    u = UIDS["besteffort"]
    for pid in (500, 501, 502):
        fake.add_process(pid, cgroup=cgroupfs("besteffort", u, cid(pid)), oom_score=1500)
    assert pids(run(qos(), fake, ranked(fake, 501, 500, 502))) == [501, 500, 502]
    assert pids(run(qos(), fake, ranked(fake, 502, 401, 500))) == [502, 500, 401]


def test_cgroupfs_driver_and_other_runtimes(fake: FakeProc) -> None:
    u = UIDS["besteffort"]
    fake.add_process(500, cgroup=cgroupfs("besteffort", u, f"crio-{cid(500)}"), oom_score=1990)
    fake.add_process(502, cgroup=cgroupfs("besteffort", u, cid(502)), oom_score=1970)
    fake.add_process(503, cgroup=f"/kubepods/besteffort/pod{u}", oom_score=1960)
    result = run(qos(), fake, ranked(fake, 500, 502, 503))
    assert [r.reason.split(", oom_score")[0] for r in result] == [
        f"BestEffort pod {u} container {cid(500)[:12]} (CRI-O, cgroupfs)",
        f"BestEffort pod {u} container {cid(502)[:12]} (cgroupfs)",
        f"BestEffort pod {u} in the pod's own cgroup (cgroupfs)",
    ]


def test_pod_helpers_are_never_chosen(fake: FakeProc) -> None:
    """The sandbox (pause: killing it restarts the whole pod) and CRI-O's conmon (killing it
    frees nothing) are not the pod's workload."""
    u = UIDS["besteffort"]
    sandbox = systemd("besteffort", u, cid(600))
    fake.add_process(600, comm="pause", cgroup=sandbox, oom_score=2, oom_score_adj=-998)
    conmon = f"/kubepods/besteffort/pod{u}/crio-conmon-{cid(400)}"
    fake.add_process(601, comm="conmon", cgroup=conmon, oom_score=1999)
    # A container process calling itself "pause" is not protected by its name alone: it cannot
    # lower its own oom_score_adj to the sandbox's.
    fake.add_process(602, comm="pause", cgroup=systemd("besteffort", u, cid(602)), oom_score=1500)
    result = run(qos(), fake, ranked(fake, 600, 601, 602, 400, 300))
    assert pids(result) == [602, 400, 300]
    assert result[0].reason.endswith("dropped 1 pod sandbox (pause), 1 CRI-O conmon)")


def test_cgroup_v1_reads_the_memory_hierarchy(fake: FakeProc) -> None:
    u = UIDS["besteffort"]
    fake.add_process(
        500,
        cgroup=(
            f"12:memory:{cgroupfs('besteffort', u, cid(500))}\n"
            "11:cpu,cpuacct:/system.slice/other.service\n"
            "1:name=systemd:/system.slice/other.service\n"
        ),
        oom_score=1500,
    )
    fake.add_process(
        501,
        cgroup=f"12:memory:/system.slice/x.service\n0::{cgroupfs('besteffort', u, cid(501))}\n",
        oom_score=1600,
    )
    assert pids(run(qos(), fake, ranked(fake, 500, 501))) == [500]


def test_a_process_gone_meanwhile_is_dropped(fake: FakeProc) -> None:
    candidates = ranked(fake, *ALL)
    fake.remove_process(400)
    result = run(qos(non_pods="last"), fake, candidates)
    assert 400 not in pids(result)
    assert result[0].reason.endswith("dropped 1 Guaranteed, 1 gone (cgroup unreadable))")


def test_nothing_in(fake: FakeProc) -> None:
    assert run(qos(), fake, []) == []
    assert run(qos(), fake, ranked(fake, 1, 90, 200)) == []


def test_cgroupns_root_resolves_cgroupfs_paths_seen_from_a_pod(tmp_path: Path) -> None:
    """A reaper in a Burstable pod (cgroupfs driver, cgroup v2, own cgroup namespace)."""
    fake = FakeProc(tmp_path / "proc")
    me = f"/kubepods/burstable/pod{UIDS['burstable']}/{cid(1)}"
    fake.add_process(10, comm="reapkit", cgroup="/", oom_score=900)  # itself
    fake.add_process(11, cgroup=f"/../../pod{UIDS['burstable2']}/{cid(11)}", oom_score=800)
    fake.add_process(12, cgroup=f"/../../../pod{UIDS['guaranteed']}/{cid(12)}", oom_score=1)
    fake.add_process(
        13, cgroup=f"/../../../besteffort/pod{UIDS['besteffort']}/{cid(13)}", oom_score=1000
    )
    fake.add_process(14, cgroup="/../../../../../system.slice/kubelet.service", oom_score=10)
    candidates = ranked(fake, 10, 11, 12, 13, 14)
    # Without the root, the same-class pod cannot be told from a system daemon: protected.
    assert pids(run(qos(), fake, candidates)) == [13]
    # With it, every path resolves; "/" is the reaper's own container, in a Burstable pod (the
    # guard, oom_score_adj -1000 or a protect rule keep the reaper itself alive).
    assert pids(run(qos(cgroupns_root=me), fake, candidates)) == [13, 10, 11]
    assert pids(run(qos(cgroupns_root=me, non_pods="last"), fake, candidates)) == [13, 10, 11, 14]


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "option", "words"),
    [
        ({"never": ["guarantee"]}, "never", "'guarantee'"),
        ({"never": "burstable"}, "never", "'burstable' is also in never"),
        ({"never": []}, "never", "'guaranteed' is in neither order nor never"),
        ({"never": [3]}, "never", "got 3"),
        ({"order": ["besteffort", "burstable", "guaranteed"]}, "order", "also in never"),
        ({"order": ["besteffort", "besteffort"]}, "order", "listed twice"),
        ({"order": ["besteffort"]}, "order", "'burstable' is in neither"),
        ({"non_pods": "kill"}, "non_pods", "'protect', 'last', 'first'"),
        ({"within": "newest"}, "within", "'oom-score', 'largest-rss'"),
        ({"cgroupns_root": "kubepods"}, "cgroupns_root", "starting with '/'"),
        ({"cgroupns_root": 7}, "cgroupns_root", "got 7"),
        (
            {"order": [], "never": ["besteffort", "burstable", "guaranteed"]},
            "never",
            "nothing could ever be chosen",
        ),
        ({"qos": ["besteffort"]}, "qos", "unknown option 'qos'"),
    ],
)
def test_option_errors_name_the_option(table: dict[str, Any], option: str, words: str) -> None:
    with pytest.raises(PluginError) as info:
        make_options(KubernetesQos, table)
    assert info.value.plugin == "kubernetes-qos"
    assert info.value.option == option
    assert words in str(info.value)
    assert str(info.value).startswith("plugin 'kubernetes-qos': ")


def test_valid_option_spellings() -> None:
    o = make_options(KubernetesQos, {"order": "BestEffort", "never": ["Burstable", "GUARANTEED"]})
    assert (o.order, o.never) == (("besteffort",), ("burstable", "guaranteed"))
    # Everything may be dropped from the pods' side when non-pods are still chosen.
    o = make_options(
        KubernetesQos,
        {"order": [], "never": ["besteffort", "burstable", "guaranteed"], "non_pods": "last"},
    )
    assert o.order == ()


# -- registration --------------------------------------------------------------------------------


def test_registered_through_the_entry_point() -> None:
    (ep,) = [
        ep
        for ep in importlib.metadata.entry_points(group="reapkit.plugins")
        if ep.name == "kubernetes-qos"
    ]
    assert ep.value == "reapkit_kubernetes:KubernetesQos"
    assert ep.dist is not None
    assert ep.dist.name == "reapkit-kubernetes"
    assert ep.load() is KubernetesQos
    assert PluginRegistry().register(KubernetesQos) is KubernetesQos  # it validates

    registry = PluginRegistry()
    failures = registry.load_entry_points()
    assert not [f for f in failures if f.source == "reapkit-kubernetes"], failures
    assert registry.get("selector", "kubernetes-qos") is KubernetesQos
    (info,) = [i for i in registry.plugins() if i.name == "kubernetes-qos"]
    assert (info.kind, info.source) == ("selector", "reapkit-kubernetes")
    assert info.options == ("never", "order", "non_pods", "within", "cgroupns_root")


POLICY = """
[[rule]]
name = "pods"
when = ["mem_available < 5%"]
scope = "system"
actions = ["kill"]

[[rule.select]]
name = "protect"

[[rule.select]]
name = "kubernetes-qos"
order = ["besteffort", "burstable"]
never = ["guaranteed"]
non_pods = "protect"
within = "oom-score"
"""


def _registry() -> PluginRegistry:
    registry = PluginRegistry()
    registry.load_entry_points()
    return registry


async def test_a_policy_chooses_the_besteffort_pod(fake: FakeProc) -> None:
    policy = load_policy(text=POLICY, registry=_registry(), procfs=ProcFS(fake.root), dry_run=True)
    (rule,) = policy.rules
    assert isinstance(rule.selectors[-1], KubernetesQos)

    async def emit(record: object) -> None:  # pragma: no cover - preview emits nothing
        raise AssertionError(record)

    engine = Engine(policy.rules, emit=emit, procfs=ProcFS(fake.root))
    chosen, ranking, steps = await engine.preview(rule)
    assert chosen is not None
    assert chosen.candidate.pid == 400
    assert pids(ranking) == [400, 401, 301, 300]
    step = next(s for s in steps if s.selector == "kubernetes-qos")
    assert (step.candidates_out, step.top_pid, step.error) == (4, 400, None)
    assert chosen.reason.startswith(f"BestEffort pod {UIDS['besteffort']} ")
    await trio.lowlevel.checkpoint()


def test_a_policy_error_names_the_key(fake: FakeProc) -> None:
    bad = POLICY.replace('never = ["guaranteed"]', 'never = ["guarantee"]')
    with pytest.raises(reapkit.PolicyError) as info:
        load_policy(text=bad, registry=_registry(), procfs=ProcFS(fake.root), dry_run=True)
    assert "rule[0].select[1].never: " in str(info.value)


# -- properties ----------------------------------------------------------------------------------

KINDS = ("guaranteed", "burstable", "besteffort", "non-pod", "gone")
process_specs = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.sampled_from(["systemd", "cgroupfs", "v1"]),
        st.integers(min_value=0, max_value=2000),  # oom_score
        st.integers(min_value=0, max_value=1 << 18),  # RSS in pages
    ),
    max_size=12,
)
option_tables = st.fixed_dictionaries(
    {},
    optional={
        "order": st.sampled_from([["besteffort", "burstable"], ["burstable", "besteffort"]]),
        "non_pods": st.sampled_from(["protect", "last", "first"]),
        "within": st.sampled_from(["oom-score", "largest-rss"]),
    },
)


@settings(max_examples=60, deadline=None)
@given(process_specs, option_tables, st.randoms(use_true_random=False))
def test_the_output_is_a_subset_of_the_input_without_guaranteed_pods(
    specs: list[tuple[str, str, int, int]], table: dict[str, Any], random: Any
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeProc(Path(tmp) / "proc")
        gone = []
        for n, (kind, layout, score, pages) in enumerate(specs):
            pid = 1000 + n
            uid = f"{n:08x}-0000-4000-8000-000000000000"
            if kind in ("non-pod", "gone"):
                path = f"/system.slice/daemon-{n}.service"
            elif layout == "systemd":
                path = systemd(kind, uid, cid(pid))
            else:
                path = cgroupfs(kind, uid, cid(pid))
            text = f"9:memory:{path}\n0::/\n" if layout == "v1" else path
            fake.add_process(pid, cgroup=text, oom_score=score, rss=pages * PAGE)
            if kind == "gone":
                gone.append(pid)
        candidates = ranked(fake, *range(1000, 1000 + len(specs)))
        random.shuffle(candidates)
        for pid in gone:
            fake.remove_process(pid)

        selector = qos(**table)
        result = run(selector, fake, candidates)
        s = make_situation(fake)

        given_ids = [(r.candidate.pid, r.candidate.start_time) for r in candidates]
        out_ids = [(r.candidate.pid, r.candidate.start_time) for r in result]
        assert set(out_ids) <= set(given_ids)
        assert len(set(out_ids)) == len(out_ids)
        infos = [parse_cgroup_path(s.cgroup(r.candidate)) for r in result]
        assert all(i is None or i.qos != "guaranteed" for i in infos)
        assert not set(gone) & {pid for pid, _ in out_ids}
        if selector.options.non_pods == "protect":
            assert None not in infos
        # Scores never increase down the list: a later stable sort keeps the classes apart.
        scores = [r.score for r in result]
        assert scores == sorted(scores, reverse=True)
        # Every pod candidate of a chosen class is there.
        wanted = {
            1000 + n
            for n, (kind, _, _, _) in enumerate(specs)
            if kind in ("burstable", "besteffort")
            or (kind == "non-pod" and selector.options.non_pods != "protect")
        }
        assert {pid for pid, _ in out_ids} == wanted


def test_the_readme_policy_loads_with_the_default_options(fake: FakeProc) -> None:
    """The README's policy is valid, and spells out the defaults."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    text = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    policy = load_policy(text=text, registry=_registry(), procfs=ProcFS(fake.root), dry_run=True)
    (rule,) = policy.rules
    assert isinstance(rule.selectors[-1], KubernetesQos)
    assert rule.selectors[-1].options == KubernetesQosOptions()
    short = load_policy(
        text=text.split("[[rule.select]]")[0] + 'select = ["protect", "kubernetes-qos"]\n',
        registry=_registry(),
        procfs=ProcFS(fake.root),
        dry_run=True,
    )
    assert short.rules[0].selectors[-1].options == KubernetesQosOptions()

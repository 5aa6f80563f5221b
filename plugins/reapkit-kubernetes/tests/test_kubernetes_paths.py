"""The cgroup path parser against real-world layouts.

The paths are as ``/proc/<pid>/cgroup`` shows them (the memory hierarchy's line on cgroup v1,
the ``0::`` line on v2: the kubelet uses the same names in both) on nodes run with either
kubelet cgroup driver and containerd, CRI-O or Docker (dockershim / cri-dockerd); on kind and
k3d nodes, which are containers themselves; and from inside a cgroup namespace (a reaper
running in a pod on cgroup v2 sees paths relative to its own cgroup, climbing out with ``..``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reapkit_kubernetes import PodInfo, parse_cgroup_path

UID = "8f4a7c1e-2b3d-4e5f-9a6b-7c8d9e0f1a2b"
UID_ = UID.replace("-", "_")  # as the systemd driver escapes it in slice names
UID2 = "0d6c1f9e-74b2-4a83-b1c5-2e9f8d7a6b50"
STATIC_UID = "6e2f5a0c1d9b8e7f4a3c2b1d0e9f8a7b"  # a static pod's: md5 of its manifest
CID = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
CID2 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
NODE = "4a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"  # kind's node container

BURSTABLE_SLICE = "/kubepods.slice/kubepods-burstable.slice"
BESTEFFORT_SLICE = "/kubepods.slice/kubepods-besteffort.slice"


def pod(
    qos: str,
    driver: str,
    container: str | None = CID,
    runtime: str | None = None,
    uid: str = UID,
    conmon: bool = False,
) -> PodInfo:
    return PodInfo(qos, uid, container, driver, runtime, conmon)  # type: ignore[arg-type]


PODS = [
    # -- cgroupfs driver: GKE (COS), EKS on AL2, k3s, kubeadm defaults before 1.22 ------------
    pytest.param(
        f"/kubepods/burstable/pod{UID}/{CID}", pod("burstable", "cgroupfs"), id="cgroupfs-burstable"
    ),
    pytest.param(
        f"/kubepods/besteffort/pod{UID}/{CID}",
        pod("besteffort", "cgroupfs"),
        id="cgroupfs-besteffort",
    ),
    pytest.param(
        f"/kubepods/pod{UID}/{CID}", pod("guaranteed", "cgroupfs"), id="cgroupfs-guaranteed"
    ),
    pytest.param(
        f"/kubepods/burstable/pod{UID}/crio-{CID}",
        pod("burstable", "cgroupfs", runtime="crio"),
        id="cgroupfs-crio",
    ),
    pytest.param(
        f"/kubepods/besteffort/pod{UID}/crio-conmon-{CID}",
        pod("besteffort", "cgroupfs", runtime="crio", conmon=True),
        id="cgroupfs-crio-conmon",
    ),
    pytest.param(
        f"/kubepods/burstable/pod{UID}",
        pod("burstable", "cgroupfs", container=None),
        id="cgroupfs-pod-cgroup-itself",
    ),
    pytest.param(
        f"/kubepods/burstable/pod{UID}/{CID}/init.scope",
        pod("burstable", "cgroupfs"),
        id="cgroupfs-container-sub-cgroup",
    ),
    pytest.param(
        f"/kubepods/pod{STATIC_UID}/{CID}",
        pod("guaranteed", "cgroupfs", uid=STATIC_UID),
        id="cgroupfs-static-pod",
    ),
    pytest.param(
        f"/kubepods/burstable/pod{UID}/notacontainer",
        pod("burstable", "cgroupfs", container=None),
        id="cgroupfs-unknown-child",
    ),
    pytest.param(
        f"/custom/kubepods/besteffort/pod{UID}/{CID}",
        pod("besteffort", "cgroupfs"),
        id="cgroupfs-cgroup-root",
    ),
    # -- systemd driver: kubeadm >= 1.22, OpenShift (CRI-O), EKS AL2023, cgroup v2 distros --
    pytest.param(
        f"{BURSTABLE_SLICE}/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
        pod("burstable", "systemd", runtime="containerd"),
        id="systemd-containerd-burstable",
    ),
    pytest.param(
        f"{BESTEFFORT_SLICE}/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
        pod("besteffort", "systemd", runtime="containerd"),
        id="systemd-containerd-besteffort",
    ),
    pytest.param(
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        pod("guaranteed", "systemd", runtime="containerd"),
        id="systemd-containerd-guaranteed",
    ),
    pytest.param(
        f"{BURSTABLE_SLICE}/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope",
        pod("burstable", "systemd", runtime="crio"),
        id="systemd-crio",
    ),
    pytest.param(
        f"{BURSTABLE_SLICE}/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope/container",
        pod("burstable", "systemd", runtime="crio"),
        id="systemd-crio-crun-subgroup",
    ),
    pytest.param(
        f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope",
        pod("guaranteed", "systemd", runtime="crio", conmon=True),
        id="systemd-crio-conmon",
    ),
    pytest.param(
        f"{BESTEFFORT_SLICE}/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope",
        pod("besteffort", "systemd", runtime="docker"),
        id="systemd-docker",
    ),
    pytest.param(
        f"{BURSTABLE_SLICE}/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope",
        pod("burstable", "systemd", runtime="containerd", uid=STATIC_UID),
        id="systemd-static-pod",
    ),
    pytest.param(
        f"{BURSTABLE_SLICE}/kubepods-burstable-pod{UID_}.slice",
        pod("burstable", "systemd", container=None),
        id="systemd-pod-slice-itself",
    ),
    pytest.param(
        f"{BURSTABLE_SLICE}/kubepods-burstable-pod{UID_}.slice/cri-containerd-xyz.scope",
        pod("burstable", "systemd", container=None),
        id="systemd-unknown-child",
    ),
    # -- nodes that are containers: kind, k3d, nested prefixes ------------------------------
    pytest.param(
        f"/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice"
        f"/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice"
        f"/cri-containerd-{CID}.scope",
        pod("besteffort", "systemd", runtime="containerd"),
        id="kind-v2-from-the-host",
    ),
    pytest.param(
        f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"
        f"/cri-containerd-{CID}.scope",
        pod("guaranteed", "systemd", runtime="containerd"),
        id="kind-v2-inside-the-node",
    ),
    pytest.param(
        f"/docker/{NODE}/kubelet/kubepods/burstable/pod{UID}/{CID}",
        pod("burstable", "cgroupfs"),
        id="kind-v1-cgroupfs",
    ),
    pytest.param(
        f"/docker/{NODE}/kubepods/besteffort/pod{UID}/{CID}",
        pod("besteffort", "cgroupfs"),
        id="k3d-v1",
    ),
    pytest.param(
        f"/kubepods/burstable/pod{UID}/{CID}/kubelet/kubepods/besteffort/pod{UID2}/{CID2}",
        pod("burstable", "cgroupfs"),
        id="nested-cluster-outermost-pod-wins",
    ),
    pytest.param(
        f"/kubepods/pod{UID}/{CID}/kubepods/besteffort/pod{UID2}/{CID2}",
        pod("guaranteed", "cgroupfs"),
        id="nested-in-a-guaranteed-pod-stays-guaranteed",
    ),
    # -- seen from a cgroup namespace -------------------------------------------------------
    pytest.param(
        f"/../../kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        f"/cri-containerd-{CID}.scope",
        pod("burstable", "systemd", runtime="containerd"),
        id="cgroupns-from-a-system-service",
    ),
    pytest.param(
        f"/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        f"/cri-containerd-{CID}.scope",
        pod("besteffort", "systemd", runtime="containerd"),
        id="cgroupns-from-another-class",
    ),
    pytest.param(
        f"/../../kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope",
        pod("burstable", "systemd", runtime="crio"),
        id="cgroupns-from-the-same-class",
    ),
    pytest.param(
        f"/../kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        pod("guaranteed", "systemd", runtime="containerd"),
        id="cgroupns-guaranteed",
    ),
    pytest.param(
        f"/../../kubepods/burstable/pod{UID}/{CID}",
        pod("burstable", "cgroupfs"),
        id="cgroupns-cgroupfs-whole",
    ),
    pytest.param(
        f"/../../../besteffort/pod{UID}/{CID}",
        pod("besteffort", "cgroupfs"),
        id="cgroupns-cgroupfs-class-visible",
    ),
]


@pytest.mark.parametrize(("path", "expected"), PODS)
def test_real_world_pod_paths(path: str, expected: PodInfo) -> None:
    assert parse_cgroup_path(path) == expected
    assert parse_cgroup_path(path + "/") == expected  # a trailing slash changes nothing


NOT_PODS = [
    # system daemons, users, the root
    "/",
    "/init.scope",
    "/system.slice/kubelet.service",
    "/system.slice/containerd.service",
    "/system.slice/crio.service",
    "/system.slice/k3s.service",
    "/user.slice/user-1000.slice/session-3.scope",
    "/user.slice/user-1000.slice/user@1000.service/app.slice/firefox.scope",
    f"/system.slice/docker-{CID}.scope",  # a plain Docker container
    f"/docker/{CID}",
    f"/system.slice/docker-{NODE}.scope/init.scope",  # kind's node systemd
    # the QoS cgroups themselves, without a pod
    "/kubepods",
    "/kubepods/burstable",
    "/kubepods/besteffort",
    "/kubepods.slice",
    BURSTABLE_SLICE,
    # near misses
    "/kubepods/burstable/notapod",
    "/kubepods/burstable/pod",
    "/kubepods/burstable/podnot-a-uid",
    f"/kubepods/burstable/pod{UID_}/{CID}",  # systemd's escaping under cgroupfs
    f"/kubepods/burstable/pod{UID.upper()}/{CID}",
    f"/kubepods/burstable/pod{UID[:-1]}/{CID}",
    f"/kubepods/guaranteed/pod{UID}/{CID}",  # there is no such cgroup
    f"/kubepods/burstable/besteffort/pod{UID}/{CID}",
    f"/system.slice/pod{UID}/{CID}",
    f"/burstable/pod{UID}/{CID}",
    f"/pod{UID}/{CID}",
    f"/kubepods/burstable/pod{UID}/../pod{UID2}",
    f"kubepods/burstable/pod{UID}/{CID}",  # not absolute
    "",
    f"{BURSTABLE_SLICE}/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
    f"{BURSTABLE_SLICE}/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
    f"/system.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
    f"/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",  # parents missing
    f"/kubepods.slice/kubepods-pod{UID}.slice/cri-containerd-{CID}.scope",  # dashes unescaped
    f"{BURSTABLE_SLICE}/kubepods-burstable-pod{UID_}/cri-containerd-{CID}.scope",
    f"{BURSTABLE_SLICE}/kubepods-burstable-pod{UID_}.scope",
    f"{BURSTABLE_SLICE}/kubepods-burstable-podzzzz.slice",
    f"/kubelet.slice/kubepods.slice/kubelet-kubepods-pod{UID_}.slice",  # prefix mismatch
    # from a cgroup namespace: the cgroupfs class was cut off, it cannot be told
    f"/../../pod{UID}/{CID}",
    f"/../pod{UID}",
]


@pytest.mark.parametrize("path", NOT_PODS)
def test_non_pod_and_malformed_paths(path: str) -> None:
    assert parse_cgroup_path(path) is None


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        (f"/kubepods/burstable/pod{UID2}/{CID2}", "burstable"),
        (f"/kubepods/besteffort/pod{UID2}/{CID2}", "besteffort"),
        (f"/kubepods/pod{UID2}/{CID2}", "guaranteed"),
        (f"/kubepods/pod{UID2}/{CID2}/", "guaranteed"),
    ],
)
def test_namespace_root_resolves_a_cut_off_cgroupfs_class(root: str, expected: str) -> None:
    """A reaper in a pod (cgroupfs driver, cgroup v2) sees a pod of its own class as
    ``/../../pod<uid>/<id>``: its own container cgroup, given, resolves it."""
    assert parse_cgroup_path(f"/../../pod{UID}/{CID}", namespace_root=root) == pod(
        expected, "cgroupfs"
    )
    # "/" is the namespace root itself: the reader's own container.
    assert parse_cgroup_path("/", namespace_root=root) == pod(expected, "cgroupfs", CID2, uid=UID2)
    # Climbing above the host's root stops there.
    assert parse_cgroup_path("/../../../../../../../system.slice", namespace_root=root) is None


def test_display_names() -> None:
    assert pod("besteffort", "cgroupfs").qos_name == "BestEffort"
    assert pod("burstable", "cgroupfs").qos_name == "Burstable"
    assert pod("guaranteed", "cgroupfs").qos_name == "Guaranteed"


# -- properties ----------------------------------------------------------------------------------

_hex = "0123456789abcdef"
uuids = st.uuids().map(str)
static_uids = st.text(_hex, min_size=32, max_size=32)
container_ids = st.text(_hex, min_size=64, max_size=64)
qos_classes = st.sampled_from(["guaranteed", "burstable", "besteffort"])
prefixes = st.sampled_from(["", "/custom", f"/docker/{NODE}", f"/system.slice/docker-{NODE}.scope"])


@st.composite
def layouts(draw: st.DrawFn) -> tuple[str, PodInfo]:
    """A path the kubelet and a runtime would make, and what it says."""
    qos = draw(qos_classes)
    uid = draw(st.one_of(uuids, static_uids))
    cid = draw(container_ids)
    driver = draw(st.sampled_from(["cgroupfs", "systemd"]))
    prefix = draw(prefixes)
    if driver == "cgroupfs":
        container, runtime, conmon = draw(
            st.sampled_from(
                [
                    (cid, None, False),
                    (f"crio-{cid}", "crio", False),
                    (f"crio-conmon-{cid}", "crio", True),
                ]
            )
        )
        parts = ["kubepods"] + ([] if qos == "guaranteed" else [qos]) + [f"pod{uid}", container]
    else:
        container, runtime, conmon = draw(
            st.sampled_from(
                [
                    (f"cri-containerd-{cid}.scope", "containerd", False),
                    (f"crio-{cid}.scope", "crio", False),
                    (f"crio-conmon-{cid}.scope", "crio", True),
                    (f"docker-{cid}.scope", "docker", False),
                ]
            )
        )
        root = draw(st.sampled_from(["", "kubelet"]))  # kind's cgroupRoot: /kubelet
        head = f"{root}-" if root else ""
        parts = ([f"{root}.slice"] if root else []) + [f"{head}kubepods.slice"]
        if qos != "guaranteed":
            parts.append(f"{head}kubepods-{qos}.slice")
        klass = "" if qos == "guaranteed" else f"{qos}-"
        parts += [f"{head}kubepods-{klass}pod{uid.replace('-', '_')}.slice", container]
    below = draw(st.sampled_from([[], ["container"], ["init.scope"]]))
    path = prefix + "/" + "/".join(parts + below)
    return path, PodInfo(qos, uid, cid, driver, runtime, conmon)  # type: ignore[arg-type]


@given(layouts())
def test_every_generated_layout_round_trips(layout: tuple[str, PodInfo]) -> None:
    path, expected = layout
    assert parse_cgroup_path(path) == expected


@given(layouts(), st.data())
def test_paths_survive_a_cgroup_namespace_cut(
    layout: tuple[str, PodInfo], data: st.DataObject
) -> None:
    """Seen from a cgroup namespace, the top of a path is replaced by ``..``. systemd slice
    names still tell the class as long as the pod's slice is visible; cgroupfs paths as long
    as ``kubepods`` is."""
    path, expected = layout
    components = path.strip("/").split("/")
    if expected.driver == "systemd":
        last = next(i for i, c in enumerate(components) if "-pod" in c and c.endswith(".slice"))
    else:
        last = components.index("kubepods")
    start = data.draw(st.integers(min_value=0, max_value=last), label="start")
    depth = data.draw(st.integers(min_value=1, max_value=4), label="depth")
    cut = "/" + "/".join([".."] * depth + components[start:])
    assert parse_cgroup_path(cut) == expected


_pieces = st.sampled_from([*"/.-_", "..", "pod", "kubepods", ".slice", "burstable", *_hex, UID_])


@given(st.lists(_pieces, max_size=40).map("".join))
def test_any_text_gives_a_pod_or_none_and_never_raises(text: str) -> None:
    result = parse_cgroup_path(text)
    assert result is None or isinstance(result, PodInfo)

"""Kubernetes pods from cgroup paths: the QoS class, the pod UID and the container.

The kubelet puts every pod in a cgroup named after its QoS class and UID, and the container
runtime puts each container in a child of it. The layouts (``pkg/kubelet/cm``:
``qos_container_manager_linux.go``, ``pod_container_manager_linux.go``,
``cgroup_manager_linux.go``), the same under cgroup v1 (the memory hierarchy) and v2::

    cgroupfs driver
      /kubepods/pod<uid>/<container>                             Guaranteed
      /kubepods/burstable/pod<uid>/<container>                   Burstable
      /kubepods/besteffort/pod<uid>/<container>                  BestEffort

    systemd driver (each slice's name repeats its ancestors'; "-" in the UID becomes "_")
      /kubepods.slice/kubepods-pod<u_i_d>.slice/<container>.scope
      /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<u_i_d>.slice/<...>.scope
      /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<u_i_d>.slice/<...>.scope

The container's cgroup, by runtime:

    containerd   <id> (cgroupfs)            cri-containerd-<id>.scope (systemd)
    CRI-O        crio-<id> (cgroupfs)       crio-<id>.scope (systemd)
                 crio-conmon-<id>           crio-conmon-<id>.scope      (its conmon monitor)
    Docker       <id> (cgroupfs)            docker-<id>.scope (systemd; dockershim, cri-dockerd)

A bare ``<id>`` is containerd's or Docker's: the runtime is then unknown (``None``). Anything
below the container's cgroup (crun's ``container`` sub-cgroup on v2, or a container's own
sub-cgroups) belongs to that container.

Prefixes are allowed: ``--cgroup-root`` (``/custom/kubepods/...``; kind's ``cgroupRoot:
/kubelet`` gives ``/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/
kubelet-kubepods-burstable-pod<u_i_d>.slice``), and a node that is itself a container (kind,
k3d: ``/docker/<id>/kubepods/...``, ``/system.slice/docker-<id>.scope/kubelet.slice/...``).
Where pods nest (a cluster running inside a pod) the outermost pod wins: it is the one whose
QoS class the host's memory is accounted and protected by.

A reader in a cgroup namespace (a reaper in a pod, on cgroup v2) sees paths relative to its
namespace root, climbing out with ``..``: ``/../../kubepods.slice/...``, or from inside
another pod ``/../../kubepods-besteffort-pod<u_i_d>.slice/...``. systemd slice names say the
QoS class themselves; a cgroupfs path whose class was cut off (``/../../pod<uid>/<id>`` from a
reader in a pod of the same class) cannot say it and is not taken for a pod, unless the
namespace root is given to resolve every path against.

Pod UIDs are what the API server gives (a UUID) or, for static pods, the kubelet's 32-digit
hex hash of the manifest. A static pod whose manifest sets some other ``metadata.uid`` is not
recognised (and so is treated like a system daemon: protected by default).
"""

from __future__ import annotations

import posixpath
import re
from typing import Final, Literal

import attrs

__all__ = [
    "QOS_CLASSES",
    "Driver",
    "PodInfo",
    "QosClass",
    "Runtime",
    "parse_cgroup_path",
    "qos_display_name",
]

QosClass = Literal["guaranteed", "burstable", "besteffort"]
Driver = Literal["cgroupfs", "systemd"]
Runtime = Literal["containerd", "crio", "docker"]

#: The QoS classes in the order the kubelet evicts them under memory pressure.
QOS_CLASSES: Final[tuple[QosClass, ...]] = ("besteffort", "burstable", "guaranteed")

_DISPLAY: Final[dict[str, str]] = {
    "guaranteed": "Guaranteed",
    "burstable": "Burstable",
    "besteffort": "BestEffort",
}


def qos_display_name(qos: str) -> str:
    """``"besteffort"`` → ``"BestEffort"``, as Kubernetes spells the classes."""
    return _DISPLAY.get(qos, qos)


@attrs.frozen
class PodInfo:
    """What a cgroup path says about the pod a process runs in."""

    qos: QosClass
    #: With dashes, as the API server shows it (``metadata.uid``).
    pod_uid: str
    #: The full container id (``crictl ps --id`` takes a prefix), or ``None`` for a process
    #: in the pod's own cgroup or in a child cgroup this module does not recognise.
    container_id: str | None
    #: The kubelet's cgroup driver, as the path's form shows it.
    driver: Driver
    #: ``None`` where the path does not tell (a bare id: containerd or Docker).
    runtime: Runtime | None
    #: CRI-O's ``conmon``, the monitor of ``container_id`` rather than the container itself.
    conmon: bool = False

    @property
    def qos_name(self) -> str:
        """``"BestEffort"``, ``"Burstable"`` or ``"Guaranteed"``."""
        return qos_display_name(self.qos)


# A UID as the API server makes it (a UUID), or a static pod's md5 hex digest.
_UID: Final = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}"
_UID_RE: Final = re.compile(_UID)
_CGROUPFS_POD: Final = re.compile(rf"pod(?P<uid>{_UID})")
# kubepods[-<qos>]-pod<uid>.slice, after the name of the slice above kubepods, if any
# ("kubelet-" in kind). The UID is checked after its underscores become dashes again.
_SYSTEMD_POD: Final = re.compile(
    r"(?P<prefix>(?:[^/]+-)?)kubepods(?:-(?P<qos>burstable|besteffort))?-pod(?P<uid>[0-9a-f_]+)"
    r"\.slice"
)
_CGROUPFS_QOS: Final = frozenset({"burstable", "besteffort"})

_ID: Final = r"(?P<id>[0-9a-f]{12,64})"
# (pattern, runtime, conmon), tried in order: crio-conmon- before crio-.
_CONTAINERS: Final[tuple[tuple[re.Pattern[str], Runtime | None, bool], ...]] = (
    (re.compile(rf"cri-containerd-{_ID}\.scope"), "containerd", False),
    (re.compile(rf"crio-conmon-{_ID}(?:\.scope)?"), "crio", True),
    (re.compile(rf"crio-{_ID}(?:\.scope)?"), "crio", False),
    (re.compile(rf"docker-{_ID}\.scope"), "docker", False),
    (re.compile(_ID), None, False),
)


def parse_cgroup_path(path: str, *, namespace_root: str | None = None) -> PodInfo | None:
    """The pod ``path`` (as ``/proc/<pid>/cgroup`` shows it) belongs to, or ``None``.

    ``namespace_root`` is the cgroup path, as the host sees it, of the reader's cgroup
    namespace root: every path is relative to it, and is resolved against it first (``/`` is
    the root itself, ``/../..`` climbs out of it). Without it, paths climbing out of the
    namespace are read as they are, their top cut off.
    """
    if not path.startswith("/"):
        return None
    if namespace_root is not None:
        path = posixpath.normpath(posixpath.join(namespace_root, path.lstrip("/")))
    parts = [p for p in path.split("/") if p and p != "."]
    cut = 0
    while cut < len(parts) and parts[cut] == "..":
        cut += 1
    components = parts[cut:]
    if ".." in components:  # the kernel never writes one below a real component
        return None
    truncated = cut > 0
    for i in range(len(components)):
        info = _pod_at(components, i, truncated)
        if info is not None:
            return info  # the outermost pod
    return None


def _is(components: list[str], j: int, expected: str, truncated: bool) -> bool:
    """Whether component ``j`` is ``expected``; one cut off above the visible path may be."""
    if j >= 0:
        return components[j] == expected
    return truncated


def _pod_at(components: list[str], i: int, truncated: bool) -> PodInfo | None:
    name = components[i]
    driver: Driver
    qos: QosClass
    if m := _CGROUPFS_POD.fullmatch(name):
        driver = "cgroupfs"
        uid = m["uid"]
        parent = components[i - 1] if i >= 1 else None
        if parent == "kubepods":
            qos = "guaranteed"
        elif parent == "burstable" and _is(components, i - 2, "kubepods", truncated):
            qos = "burstable"
        elif parent == "besteffort" and _is(components, i - 2, "kubepods", truncated):
            qos = "besteffort"
        else:  # not under kubepods, or the class was cut off (/../pod<uid>)
            return None
    elif m := _SYSTEMD_POD.fullmatch(name):
        driver = "systemd"
        uid = m["uid"].replace("_", "-")
        if not _UID_RE.fullmatch(uid):
            return None
        prefix = m["prefix"]
        root = f"{prefix}kubepods.slice"
        if m["qos"] is None:
            qos = "guaranteed"
            if not _is(components, i - 1, root, truncated):
                return None
        else:
            qos = "burstable" if m["qos"] == "burstable" else "besteffort"
            if not (
                _is(components, i - 1, f"{prefix}kubepods-{qos}.slice", truncated)
                and _is(components, i - 2, root, truncated)
            ):
                return None
    else:
        return None
    container_id: str | None = None
    runtime: Runtime | None = None
    conmon = False
    if i + 1 < len(components):
        child = components[i + 1]
        for pattern, which, is_conmon in _CONTAINERS:
            if c := pattern.fullmatch(child):
                container_id, runtime, conmon = c["id"], which, is_conmon
                break
    return PodInfo(qos, uid, container_id, driver, runtime, conmon)

"""The ``kubernetes-qos`` selector: choose by pod QoS class, as the kubelet evicts.

Each candidate's cgroup path (:meth:`reapkit.Situation.cgroup`) is parsed into a
:class:`~reapkit_kubernetes.PodInfo`. Candidates are grouped into classes — the pod QoS
classes, and "not in a pod" (the kubelet, the runtime, sshd, …) — and the classes are put in
the configured order; classes in ``never`` (and non-pods, by default) are dropped, and so are
the pods' helpers: the sandbox ("pause", which would take every container of its pod down with
it) and CRI-O's ``conmon`` monitors (which free nothing). Inside a class the order is by
``oom_score`` or RSS, highest first; the sort is stable, so ties keep the order the previous
selector gave them.

Every returned item's score is its class's rank (higher: sooner), the same for every member of
a class, so that a later stable sort by score keeps the classes apart and the order inside
them. A candidate whose cgroup cannot be read (it exited meanwhile) is dropped: it cannot be
classified, and cannot be killed anyway.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Final, Literal

import attrs
from reapkit import Candidate, Ranked, Selector, Situation

from ._paths import QOS_CLASSES, PodInfo, parse_cgroup_path, qos_display_name

__all__ = ["KubernetesQos", "KubernetesQosOptions"]

log = logging.getLogger("reapkit.kubernetes")

NonPods = Literal["protect", "last", "first"]
Within = Literal["oom-score", "largest-rss"]

_NON_PODS: Final = ("protect", "last", "first")
_WITHIN: Final = ("oom-score", "largest-rss")
_NON_POD: Final = "non-pod"  # the class key of processes not in a pod
#: The kubelet's PodInfraOOMAdj: the oom_score_adj of a pod's sandbox ("pause") process.
_SANDBOX_OOM_SCORE_ADJ: Final = -998


# -- options -------------------------------------------------------------------------------------
# Messages start with the option's name: make_options finds the culprit by it, and a policy
# error then names the key (rule[0].select[1].never: ...).


def _classes(value: object) -> Any:
    """A TOML list (or a single name) of QoS classes, lowercased: ``"BestEffort"`` will do."""
    items = tuple(value) if isinstance(value, list | tuple) else (value,)
    return tuple(v.lower() if isinstance(v, str) else v for v in items)


def _check_classes(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    for item in value:
        if item not in QOS_CLASSES:
            raise ValueError(
                f"{attribute.name}: expected QoS classes among 'besteffort', 'burstable' and"
                f" 'guaranteed', got {item!r}"
            )
    if len(set(value)) != len(value):
        raise ValueError(f"{attribute.name}: a QoS class is listed twice in {list(value)!r}")


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            expected = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{attribute.name}: expected one of {expected}, got {value!r}")

    return check


def _check_root(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.startswith("/")):
        raise ValueError(
            f"{attribute.name}: expected the cgroup path (starting with '/') of the reaper's"
            f" cgroup namespace root as the host sees it, got {value!r}"
        )


@attrs.frozen
class KubernetesQosOptions:
    """Options of ``kubernetes-qos``. Every QoS class is in exactly one of ``order`` and
    ``never``: choosing Guaranteed pods must be asked for by name."""

    #: QoS classes never chosen.
    never: tuple[str, ...] = attrs.field(
        default=("guaranteed",), converter=_classes, validator=_check_classes
    )
    #: QoS classes in the order they are chosen from: the first non-empty one first.
    order: tuple[str, ...] = attrs.field(
        default=("besteffort", "burstable"), converter=_classes, validator=_check_classes
    )
    #: Processes not in a pod (the kubelet, the container runtime, system daemons):
    #: ``"protect"`` (never chosen), ``"last"`` (after every pod) or ``"first"``.
    non_pods: NonPods = attrs.field(default="protect", validator=_one_of(_NON_PODS))
    #: The order inside a class: ``"oom-score"`` (highest ``oom_score`` first) or
    #: ``"largest-rss"``.
    within: Within = attrs.field(default="oom-score", validator=_one_of(_WITHIN))
    #: For a reaper inside a cgroup namespace (a pod, on cgroup v2) under the cgroupfs driver:
    #: the host's path of the namespace root, which every path it sees is relative to.
    cgroupns_root: str | None = attrs.field(default=None, validator=_check_root)

    def __attrs_post_init__(self) -> None:
        both = [q for q in self.order if q in self.never]
        if both:
            raise ValueError(f"order: {both[0]!r} is also in never; a class is in one of them")
        missing = [q for q in QOS_CLASSES if q not in self.order and q not in self.never]
        if missing:
            raise ValueError(
                f"order: {missing[0]!r} is in neither order nor never; list every QoS class in"
                " one of them"
            )
        if not self.order and self.non_pods == "protect":
            raise ValueError(
                "never: every QoS class is in never and non_pods is 'protect': nothing could"
                " ever be chosen"
            )


# -- reasons -------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    """``1288490188`` → ``"1.2 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _class_name(key: str) -> str:
    return "not in a pod" if key == _NON_POD else qos_display_name(key)


def _describe(info: PodInfo | None, path: str) -> str:
    """``"BestEffort pod <uid> container 3f4e5a6b7c8d (containerd, systemd)"``."""
    if info is None:
        return f"not in a pod (cgroup {path})"
    if info.container_id is None:
        where = "in the pod's own cgroup"
    elif info.conmon:
        where = f"conmon of container {info.container_id[:12]}"
    else:
        where = f"container {info.container_id[:12]}"
    runtime = {"containerd": "containerd", "crio": "CRI-O", "docker": "Docker", None: None}[
        info.runtime
    ]
    how = f"{runtime}, {info.driver}" if runtime else info.driver
    return f"{info.qos_name} pod {info.pod_uid} {where} ({how})"


def _place(i: int, n: int, best: str) -> str:
    return f"{best} of {n}" if i == 0 else f"#{i + 1} of {n}"


@attrs.frozen
class _Entry:
    ranked: Ranked
    info: PodInfo | None
    path: str


# -- the selector --------------------------------------------------------------------------------


class KubernetesQos(Selector):
    """Pods by QoS class, as the kubelet evicts them: BestEffort first, then Burstable, never
    Guaranteed, and processes outside pods protected (all configurable); inside a class the
    highest ``oom_score`` (or the largest RSS) first."""

    name: ClassVar[str] = "kubernetes-qos"
    Options: ClassVar[type[Any]] = KubernetesQosOptions
    # Trusted and non-blocking: one small /proc read per candidate, cached per decision.
    inline: ClassVar[bool] = True
    # It spares Guaranteed pods and processes outside pods: failing, it must fail safe.
    protective: ClassVar[bool] = True
    options: KubernetesQosOptions

    def __init__(self, options: KubernetesQosOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        sequence = list(o.order)
        if o.non_pods == "first":
            sequence.insert(0, _NON_POD)
        elif o.non_pods == "last":
            sequence.append(_NON_POD)
        #: The classes that may be chosen, first chosen first.
        self._sequence: tuple[str, ...] = tuple(sequence)
        self._order_text = ", then ".join(_class_name(k) for k in self._sequence)
        self._root = None if o.cgroupns_root is None else posixpath.normpath(o.cgroupns_root)

    def classify(self, path: str) -> PodInfo | None:
        """The pod of cgroup ``path`` (relative to ``cgroupns_root``, where given)."""
        return parse_cgroup_path(path, namespace_root=self._root)

    @staticmethod
    def _helper(situation: Situation, c: Candidate, info: PodInfo) -> str | None:
        """What ``c`` is, if it is a pod's helper rather than its workload: killing it frees
        next to nothing and does harm."""
        if info.conmon:
            # CRI-O's monitor: the container outlives it, its exit status and logs do not.
            return "CRI-O conmon"
        if c.comm == "pause":
            # The pod's sandbox: killing it restarts every container of the pod. The kubelet
            # and runtimes give it oom_score_adj -998 (PodInfraOOMAdj), which a container
            # cannot give itself (lowering it needs CAP_SYS_RESOURCE): the name alone is not
            # trusted.
            adj = situation.oom_score_adj(c)
            if adj is not None and adj <= _SANDBOX_OOM_SCORE_ADJ:
                return "pod sandbox (pause)"
        return None

    def _key(self, c: Candidate) -> int:
        return c.oom_score if self.options.within == "oom-score" else c.rss

    def _metric(self, c: Candidate) -> str:
        if self.options.within == "oom-score":
            return f"oom_score {c.oom_score}"
        return f"RSS {_fmt_bytes(c.rss)}"

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        classes: dict[str, list[_Entry]] = {k: [] for k in self._sequence}
        dropped: Counter[str] = Counter()  # "1 Guaranteed, 3 not in a pod", in order met
        parsed: dict[str, PodInfo | None] = {}
        for r in candidates:
            path = situation.cgroup(r.candidate)
            if not path:  # gone meanwhile, or no cgroup to read
                dropped["gone (cgroup unreadable)"] += 1
                continue
            if path not in parsed:
                parsed[path] = self.classify(path)
            info = parsed[path]
            member_of: str = _NON_POD if info is None else info.qos
            if member_of not in classes:
                dropped[_class_name(member_of)] += 1
            elif info is not None and (helper := self._helper(situation, r.candidate, info)):
                dropped[helper] += 1
            else:
                classes[member_of].append(_Entry(r, info, path))

        notes = [f"order: {self._order_text}"]
        if dropped:
            notes.append("dropped " + ", ".join(f"{n} {what}" for what, n in dropped.items()))
        tail = "; ".join(notes)
        best = "highest" if self.options.within == "oom-score" else "largest"

        out: list[Ranked] = []
        n_classes = len(self._sequence)
        for rank, class_key in enumerate(self._sequence):
            # sorted(reverse=True) is stable: equal keys keep their incoming order.
            members = sorted(
                classes[class_key], key=lambda e: self._key(e.ranked.candidate), reverse=True
            )
            for i, e in enumerate(members):
                c = e.ranked.candidate
                place = _place(i, len(members), best)
                reason = (
                    f"{_describe(e.info, e.path)}, {self._metric(c)}"
                    f" ({place} {_class_name(class_key)}; {tail})"
                )
                out.append(Ranked(c, float(n_classes - rank), reason))
        log.debug(
            "kubernetes-qos kept %d of %d candidates (dropped: %s)",
            len(out),
            len(candidates),
            dict(dropped) or "none",
        )
        return out

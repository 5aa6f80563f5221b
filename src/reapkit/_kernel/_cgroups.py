"""Where the cgroup hierarchies are mounted, and which cgroup directory a process is in.

Hosts differ: most are cgroup v2 only (``/sys/fs/cgroup``), some are hybrid (v1 controllers
under ``/sys/fs/cgroup/<controller>`` and a v2 tree at ``/sys/fs/cgroup/unified``). Nothing here
assumes a layout: everything comes from ``/proc/self/mountinfo``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import attrs

#: Mount options of a v1 cgroup mount that are not controller names.
_V1_NON_CONTROLLER_OPTIONS = frozenset(
    {"rw", "ro", "noprefix", "clone_children", "xattr", "cpuset_v2_mode", "favordynmods"}
    | {"none", "all"}
)
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@attrs.frozen
class CgroupMount:
    """One mounted cgroup hierarchy."""

    #: Where it is mounted, e.g. ``/sys/fs/cgroup/memory``.
    mountpoint: str
    #: 1 or 2.
    version: int
    #: v1: the controllers bound to this hierarchy (``("cpu", "cpuacct")``, or ``("name=systemd",)``
    #: for a named one); v2: the controllers available at its root (``cgroup.controllers``).
    controllers: tuple[str, ...]
    #: The hierarchy path mounted there: ``/`` unless a container bind-mounted a sub-tree.
    root: str = "/"

    def directory(self, cgroup_path: str) -> str | None:
        """The directory of ``cgroup_path`` (as ``/proc/<pid>/cgroup`` names it) in this mount,
        or ``None`` if that cgroup is outside the mounted sub-tree."""
        rel = _relative(cgroup_path, self.root)
        if rel is None:
            return None
        return os.path.join(self.mountpoint, rel) if rel else self.mountpoint

    def cgroup_path(self, directory: str) -> str:
        """The inverse of :meth:`directory`: ``/sys/fs/cgroup/memory/a/b`` → ``/a/b``."""
        rel = os.path.relpath(os.path.realpath(directory), self.mountpoint)
        if rel.startswith(".."):
            raise ValueError(f"{directory} is not inside the cgroup mount {self.mountpoint}")
        path = "/" if rel == "." else "/" + rel
        return path if self.root == "/" else self.root.rstrip("/") + path


def _relative(path: str, root: str) -> str | None:
    if root == "/":
        return path.lstrip("/")
    root = root.rstrip("/")
    if path == root:
        return ""
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> tuple[CgroupMount, ...]:
    """The cgroup mounts in a ``/proc/<pid>/mountinfo`` text (see proc(5)).

    For v2 mounts ``controllers`` is left empty here; :func:`cgroup_mounts` reads it.
    """
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        fstype, super_options = fields[sep + 1], fields[sep + 3]
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup":
            controllers = tuple(
                opt
                for opt in super_options.split(",")
                if opt not in _V1_NON_CONTROLLER_OPTIONS
                and ("=" not in opt or opt.startswith("name="))  # release_agent=..., etc.
            )
            mounts.append(CgroupMount(mountpoint, 1, controllers, root))
        elif fstype == "cgroup2":
            mounts.append(CgroupMount(mountpoint, 2, (), root))
    return tuple(mounts)


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[CgroupMount, ...]:
    """Every cgroup hierarchy mounted (and visible) in this mount namespace; where a hierarchy
    is mounted in several places, the first visible mount wins."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        parsed = parse_mountinfo(f.read())
    # A later mount at the same place shadows an earlier one (a container runtime's cgroup
    # mount over the host's): only the last one at each mount point is visible.
    last = {m.mountpoint: i for i, m in enumerate(parsed)}
    parsed = tuple(m for i, m in enumerate(parsed) if last[m.mountpoint] == i)
    seen: set[tuple[int, tuple[str, ...]]] = set()
    result: list[CgroupMount] = []
    for parsed_mount in parsed:
        mount = parsed_mount
        if mount.version == 2:
            mount = attrs.evolve(mount, controllers=_read_controllers(mount.mountpoint))
        key = (mount.version, mount.controllers if mount.version == 1 else ())
        if key in seen:
            continue
        seen.add(key)
        result.append(mount)
    return tuple(result)


def _read_controllers(directory: str) -> tuple[str, ...]:
    try:
        with open(os.path.join(directory, "cgroup.controllers"), encoding="ascii") as f:
            return tuple(f.read().split())
    except OSError:
        return ()


def v2_mount(mounts: Iterable[CgroupMount]) -> CgroupMount | None:
    """The cgroup v2 mount, if there is one."""
    return next((m for m in mounts if m.version == 2), None)


def mount_for(controller: str, mounts: Sequence[CgroupMount]) -> CgroupMount | None:
    """The hierarchy that has ``controller``: v1 if a v1 hierarchy binds it (a controller is
    in one version only at a time), else v2 if its root offers it."""
    for mount in mounts:
        if mount.version == 1 and controller in mount.controllers:
            return mount
    v2 = v2_mount(mounts)
    if v2 is not None and controller in v2.controllers:
        return v2
    return None


def mount_containing(directory: str, mounts: Sequence[CgroupMount]) -> CgroupMount:
    """The mount a cgroup directory belongs to (the longest mount point that contains it)."""
    real = os.path.realpath(directory)
    best: CgroupMount | None = None
    for mount in mounts:
        mp = mount.mountpoint.rstrip("/") or "/"
        if (real == mp or real.startswith(mp + "/")) and (
            best is None or len(mp) > len(best.mountpoint)
        ):
            best = mount
    if best is None:
        raise ValueError(f"{directory} is not inside any mounted cgroup hierarchy")
    return best


def entry_matches(mount: CgroupMount, hierarchy_id: int, controllers: Sequence[str]) -> bool:
    """Whether a ``/proc/<pid>/cgroup`` line (``id:controllers:path``) is about ``mount``."""
    if mount.version == 2:
        return hierarchy_id == 0 and not controllers
    return hierarchy_id != 0 and set(controllers) == set(mount.controllers)

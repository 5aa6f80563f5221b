"""Cgroup mount discovery from mountinfo texts of real host layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from reapkit._kernel._cgroups import (
    CgroupMount,
    cgroup_mounts,
    entry_matches,
    mount_containing,
    mount_for,
    parse_mountinfo,
)

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
V2_ONLY = (
    "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4"
    " - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
)
CONTAINER = "1234 1200 0:26 /kubepods/pod1/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n"
ESCAPED = r"50 23 0:40 / /mnt/my\040cgroups rw - cgroup cgroup rw,pids" + "\n"


def test_hybrid_host() -> None:
    mounts = parse_mountinfo(HYBRID)
    assert [(m.mountpoint, m.version, m.controllers) for m in mounts] == [
        ("/sys/fs/cgroup/cpu,cpuacct", 1, ("cpu", "cpuacct")),
        ("/sys/fs/cgroup/memory", 1, ("memory",)),
        ("/sys/fs/cgroup/freezer", 1, ("freezer",)),
        ("/sys/fs/cgroup/systemd", 1, ("name=systemd",)),
        ("/sys/fs/cgroup/unified", 2, ()),
    ]
    assert mount_for("memory", mounts) == mounts[1]
    assert mount_for("cpuacct", mounts) == mounts[0]
    assert mount_for("io", mounts) is None
    assert entry_matches(mounts[0], 1, ("cpuacct", "cpu"))
    assert not entry_matches(mounts[0], 4, ("memory",))
    assert entry_matches(mounts[4], 0, ())


def test_v2_only_host_offers_controllers_of_its_root() -> None:
    (mount,) = parse_mountinfo(V2_ONLY)
    v2 = CgroupMount(mount.mountpoint, 2, ("cpu", "memory", "pids"))
    assert mount_for("memory", [v2]) == v2
    assert v2.directory("/system.slice/x.service") == "/sys/fs/cgroup/system.slice/x.service"
    assert v2.directory("/") == "/sys/fs/cgroup"


def test_container_mount_of_a_sub_tree() -> None:
    (mount,) = parse_mountinfo(CONTAINER)
    assert mount.root == "/kubepods/pod1/abc"
    assert mount.directory("/kubepods/pod1/abc/app") == "/sys/fs/cgroup/app"
    assert mount.directory("/kubepods/pod1/abc") == "/sys/fs/cgroup"
    assert mount.directory("/kubepods/pod2") is None
    assert mount.directory("/kubepods/pod1/abcdef") is None


def test_escaped_mountpoints() -> None:
    (mount,) = parse_mountinfo(ESCAPED)
    assert mount.mountpoint == "/mnt/my cgroups"


def test_malformed_lines_are_skipped() -> None:
    assert parse_mountinfo("garbage\n1 2 3\n\n") == ()


def test_mount_containing_picks_the_longest_mountpoint(tmp_path: object) -> None:
    mounts = parse_mountinfo(HYBRID)
    assert mount_containing("/sys/fs/cgroup/memory/a", mounts).controllers == ("memory",)
    with pytest.raises(ValueError, match="not inside"):
        mount_containing("/tmp", mounts)


def test_a_mount_over_another_shadows_it(tmp_path: Path) -> None:
    # A pod: the runtime's cgroup2 mount (root /../..) lies over the host's at the same place.
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "29 23 0:26 / /nonexistent/cgroup rw - cgroup2 cgroup2 rw\n"
        "40 29 0:26 /../.. /nonexistent/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    (mount,) = cgroup_mounts(str(mountinfo))
    assert mount.root == "/../.."

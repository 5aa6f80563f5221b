"""Users and groups in a policy: names resolved when it loads, and what a user may execute."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from ._errors import InvalidValue

__all__ = ["ID_MAX", "account_id", "groups_of", "may_execute"]

#: The largest uid or gid (``(uid_t) -1`` means "no id").
ID_MAX = 2**32 - 2


def account_id(kind: Literal["user", "group"], value: object, *, key: str = "") -> int:
    """A uid or gid as it is, or a user or group name resolved now (``pwd``/``grp``); errors
    name the option ``key`` (by default ``kind``)."""
    key = key or kind
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ID_MAX:
        return value
    if not isinstance(value, str):
        raise InvalidValue(f"{key}: expected a name or an id, not {value!r}")
    try:
        return int((pwd.getpwnam if kind == "user" else grp.getgrnam)(value)[2])
    except (KeyError, ValueError):
        raise InvalidValue(f"{key}: no {kind} named {value!r} on this host") from None


def groups_of(uid: int, gid: int | None) -> tuple[int, tuple[int, ...]]:
    """The gid and the supplementary groups a process switched to ``uid`` should have: the
    user's (``initgroups``), with ``gid`` instead of the user's primary group if given."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        if gid is None:
            raise InvalidValue(f"user: uid {uid} has no passwd entry: give a group too") from None
        return gid, (gid,)
    gid = entry.pw_gid if gid is None else gid
    return gid, tuple(os.getgrouplist(entry.pw_name, gid))


def _permits(st: os.stat_result, uid: int, gids: Collection[int]) -> bool:
    if uid == 0:  # root searches every directory and runs a file with any x bit
        return stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def may_execute(path: str, uid: int, gids: Collection[int]) -> bool:
    """Whether ``uid`` with groups ``gids`` may run ``path``, by the mode bits of the file and
    of every directory above it. ACLs, capabilities and ``noexec`` mounts are not counted."""
    real = Path(path).resolve()
    try:
        return real.is_file() and all(
            _permits(os.stat(p), uid, gids) for p in (real, *real.parents)
        )
    except OSError:
        return False

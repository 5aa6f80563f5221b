"""What several commands share."""

from __future__ import annotations

import argparse

from .._guard import CgroupScope, Scope
from ._status import UsageError


def scope_from(args: argparse.Namespace) -> Scope | None:
    """``--scope CGROUP_DIR`` as a scope, or None; a bad directory is a usage error."""
    if getattr(args, "scope", None) is None:
        return None
    try:
        return CgroupScope.from_directory(args.scope)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--scope {args.scope}: {exc}") from None

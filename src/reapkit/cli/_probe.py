"""``reapkit probe``: is the daemon's event loop alive? For a liveness probe."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .._heartbeat import heartbeat_age
from ._status import EXIT_FAILURE, EXIT_OK, UsageError


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "probe",
        help="check that a running daemon's heartbeat file is fresh (a liveness probe)",
        description="Exit 0 when HEARTBEAT, written by `reapkit run --heartbeat HEARTBEAT`, was"
        " refreshed within --max-age seconds; 1 when it is older, missing or unreadable: the"
        " daemon's event loop is stuck or the daemon is gone.",
    )
    p.add_argument("heartbeat", metavar="HEARTBEAT", help="the file given to run --heartbeat")
    p.add_argument(
        "--max-age", type=float, default=30.0, metavar="SECONDS",
        help="the oldest heartbeat that still counts as alive (default 30)",
    )  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.max_age) and args.max_age > 0):
        raise UsageError("--max-age must be a positive number of seconds")
    try:
        age = heartbeat_age(args.heartbeat)
    except (OSError, ValueError) as exc:
        print(f"no heartbeat in {args.heartbeat}: {exc}")
        return EXIT_FAILURE
    if age > args.max_age:
        print(f"stale: the last heartbeat is {age:.1f} s old (--max-age {args.max_age:g})")
        return EXIT_FAILURE
    print(f"alive: the last heartbeat is {age:.1f} s old")
    return EXIT_OK

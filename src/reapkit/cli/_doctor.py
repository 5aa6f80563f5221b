"""``reapkit doctor``: what a reaper can do on this machine."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._kernel._probe import Probe, probe
from ._status import EXIT_FAILURE, EXIT_OK


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "doctor",
        help="check what this kernel and these privileges support",
        description="Probe pidfds, process_mrelease, PSI triggers, the proc connector, cgroups"
        " and capabilities by trying each one harmlessly. Exit 0 when a reaper can work here,"
        " 1 naming what is missing.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def render(result: Probe) -> str:
    width = max(len(c.name) for c in result.checks)
    lines = [f"reapkit doctor — Linux {result.kernel}", ""]
    for check in result.checks:
        mark = "ok" if check.ok else ("MISSING" if check.required else "no")
        lines.append(f"  {check.name:<{width}}  {mark:<7}  {check.detail}")
    lines.append("")
    if result.can_reap:
        lines.append("A reaper can work here.")
    else:
        names = ", ".join(c.name for c in result.missing)
        lines.append(f"A reaper cannot work here: missing {names}.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = probe()
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(render(result))
    return EXIT_OK if result.can_reap else EXIT_FAILURE

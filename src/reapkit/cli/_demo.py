"""``reapkit demo``: the reaper's pipeline on a real leak, then the stuck-victim comparison,
in sandbox cgroups it creates and removes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import trio
from rich.console import Console

from .._kernel._probe import check_process_mrelease, check_psi_triggers
from ._scenarios import (
    PIPELINE_TIMEOUT,
    MiB,
    ScenarioResult,
    check_can_run,
    run_pipeline_scenario,
    run_stuck_victim_demo,
    skipped_results,
    stuck_victim_unsupported,
)
from ._status import EXIT_OK, EXIT_UNAVAILABLE, UsageError

DESCRIPTION = """\
Two shows, in sandbox cgroups the demo creates and removes afterwards (also on Ctrl-C,
SIGTERM and SIGHUP). Needs root.

(1) pipeline: a leak grows in a 512 MiB memory cgroup while page-cache thrashing in
    another makes real memory pressure. The reaper's real pipeline (a PSI trigger and a
    memory line, selectors, a kill through the guard, the reap stage) ends it and spares a
    protected 'sleep' beside it.
(2) stuck victim: a memory hog frozen in state D by the cgroup v1 freezer is SIGKILLed
    through its pidfd, and its memory is timed coming back with the kill alone, for up to
    --bound seconds (kill-only), and with process_mrelease (mrelease). Skipped, saying why,
    on a host without the v1 freezer."""


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "demo",
        help="two shows: the reaper ending a leak under real memory pressure, and a stuck"
        " victim's memory coming back with and without process_mrelease",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON array, one object per scenario"
    )
    p.add_argument(
        "--size-mib", type=int, default=512, help="the stuck victim's size (default 512)"
    )
    p.add_argument(
        "--bound",
        type=float,
        default=2.0,
        help="seconds the stuck victim's memory is awaited with the kill alone (default 2)",
    )
    p.add_argument(
        "--timeout", type=float, default=PIPELINE_TIMEOUT, metavar="SECONDS",
        help=f"how long the pipeline show may take (default {PIPELINE_TIMEOUT:g}; more on a"
        " slow machine such as an emulated guest)",
    )  # fmt: skip
    p.set_defaults(run=run)


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / MiB:.0f} MiB"


_STEPS = (
    ("victim_chosen", "victim chosen"),
    ("signal_sent", "SIGKILL sent"),
    ("reap_started", "reap started"),
    ("reap_finished", "reap finished"),
    ("memory_back", "memory back"),
    ("exit_seen", "exit seen"),
)


def render_timeline(record: dict[str, Any]) -> list[str]:
    """A KillRecord (as JSON) as a readable timeline: ms from the trigger for each step."""
    victim = record.get("victim") or {}
    lines = [
        f"  pipeline   rule {record['rule']!r}: {record['outcome']} {victim.get('comm')!r}"
        f" (pid {victim.get('pid')}, RSS {_mib(victim.get('rss'))})",
        f"             trigger seen        0 ms   {record['condition']}",
    ]
    steps = record["timeline_ms"]
    for key, label in _STEPS:
        value = steps.get(key)
        shown = "-" if value is None else f"+{value:.0f} ms"
        lines.append(f"             {label:<18} {shown:>6}")
    for step in record.get("selectors", []):
        lines.append(f"             chose by {step['selector']}: {step['reason']}")
    lines.append(f"             freed {_mib(record.get('bytes_freed'))}")
    return lines


def render(results: list[ScenarioResult]) -> str:
    lines = []
    for r in results:
        if r.records and not r.skipped:
            for record in r.records:
                lines += render_timeline(record)
            lines.append(
                "             the protected bystander ('sleep') in the same cgroup survived"
            )
        elif r.skipped:
            lines.append(f"  {r.scenario:<10} skipped: {r.skipped}")
        elif r.ms_to_memory_back is None:
            thaw = (
                f"; it came back {r.ms_after_thaw:.0f} ms after the victim was thawed"
                if r.ms_after_thaw is not None
                else ""
            )
            lines.append(
                f"  {r.scenario:<10} memory NOT back within {r.bound_ms:.0f} ms"
                f" (freed {_mib(r.freed_bytes)} of {_mib(r.victim_rss_bytes)}){thaw}"
            )
        else:
            lines.append(
                f"  {r.scenario:<10} memory back in {r.ms_to_memory_back:.0f} ms"
                f" (freed {_mib(r.freed_bytes)} of {_mib(r.victim_rss_bytes)};"
                f" the process_mrelease call took {r.mrelease_call_ms:.0f} ms)"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.size_mib < 16 or args.size_mib > 8192:
        raise UsageError("--size-mib must be within 16..8192")
    if not 0.1 <= args.bound <= 60:
        raise UsageError("--bound must be within 0.1..60 seconds")
    if not 10 <= args.timeout <= 3600:
        raise UsageError("--timeout must be within 10..3600 seconds")
    check_can_run()

    def say(message: str) -> None:
        if not args.json:  # progress goes to stderr; stdout carries only the results
            print(message, file=sys.stderr)

    say(
        "reapkit demo: (1) the reaper's pipeline on a leak under real memory pressure;"
        f" (2) a {args.size_mib} MiB victim stuck in state D (cgroup v1 freezer), killed with"
        " and without process_mrelease. All in sandbox cgroups, removed afterwards."
    )
    mrelease = check_process_mrelease().ok
    results = [_pipeline(args, say)]
    why_not = stuck_victim_unsupported()
    if why_not is None:
        results += run_stuck_victim_demo(
            size=args.size_mib * MiB,
            bound=args.bound,
            mrelease_available=mrelease,
            progress=lambda scenario: say(f"  running {scenario} ..."),
        )
    else:
        say(f"  skipping the stuck-victim comparison: {why_not}")
        results += skipped_results(why_not, args.bound)
    if args.json:
        print(json.dumps([r.as_json() for r in results], indent=2))
    else:
        print(render(results))
    if all(r.skipped for r in results):
        print(
            "reapkit demo: nothing could run here; 'reapkit doctor' shows what is missing",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _pipeline(args: argparse.Namespace, say: Callable[[str], None]) -> ScenarioResult:
    """The real pipeline on a growing leak under real pressure, with a spinner meanwhile."""
    with_pressure = check_psi_triggers()
    say(
        "  pipeline: a leak grows in a 512 MiB cgroup"
        + (" while page-cache thrashing makes memory pressure" if with_pressure else "")
        + "; the reaper must end it and spare a protected 'sleep'"
    )
    if not with_pressure:
        say("  (PSI triggers are not available here: the rule uses the memory condition alone)")
    console = Console(stderr=True, quiet=args.json)

    async def bounded() -> ScenarioResult | None:
        with trio.move_on_after(args.timeout):
            with console.status("waiting for pressure and the memory line...", spinner="dots"):
                return await run_pipeline_scenario(
                    with_pressure=with_pressure, start_timeout=args.timeout
                )
        return None

    result = trio.run(bounded)
    if result is None:
        return ScenarioResult(
            "pipeline", None, None, None, args.timeout * 1000,
            skipped=f"the conditions did not hold within {args.timeout:g} s",
        )  # fmt: skip
    return result

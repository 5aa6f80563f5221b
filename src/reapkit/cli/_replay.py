"""``reapkit replay POLICY [POLICY_B] TRACE [--json]``: what would a policy have done?"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .._replay import ReplayedDecision, ReplayResult, replay_trace
from .._trace import Trace, TraceError, read_trace
from ._common import printable
from ._status import EXIT_OK, UsageError

#: Two decisions are "the same" when they chose the same process within this many seconds.
SAME_WITHIN = 1.0


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "replay",
        help="run a policy over a recorded trace and show what it would have done",
        description="Run POLICY's real engine, selectors and guard over TRACE (from `reapkit"
        " record` or `reapkit run --trace`) on a virtual clock, in dry-run mode, and print each"
        " decision: when, which rule, which victim, why. With two policies, show where they"
        " differ. After the first kill the real machine did not make, the trace shows a world"
        " where that process lived: later decisions are marked counterfactual. Kills nothing."
        " Exit 2 for an invalid policy or an unreadable trace.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="POLICY [POLICY_B] TRACE")
    p.add_argument("--json", action="store_true", help="one JSON object per decision")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 2 <= len(args.files) <= 3:
        raise UsageError("give one or two policies, then the trace")
    *policies, trace_path = args.files
    try:
        trace = read_trace(trace_path)
    except TraceError as exc:
        raise UsageError(str(exc)) from None
    _warn_about(trace)
    try:
        results = [replay_trace(path, trace) for path in policies]
    except TraceError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        for result in results:
            for d in result.decisions:
                print(json.dumps({"policy": result.policy, **d.as_json()}, sort_keys=True))
        return EXIT_OK
    for result in results:
        print(render(result))
    if len(results) == 2:
        print(compare(*results))
    return EXIT_OK


def _warn_about(trace: Trace) -> None:
    last = trace.records[-1]["t"] if trace.records else 0.0
    if trace.truncated:
        print(
            f"reapkit replay: {trace.path} ends at {last} s without its end record (cut short,"
            " or still being written): replaying what it holds",
            file=sys.stderr,
        )
    if trace.lost:
        print(
            f"reapkit replay: {trace.path} lost {trace.lost} records while it was written"
            " (its disk was too slow): decisions near those moments may differ",
            file=sys.stderr,
        )


def _victim(d: ReplayedDecision) -> str:
    v = d.record.victim
    if v is None:
        return "no victim"
    return f"{v.comm!r} (pid {v.pid})"


_SEEN = {True: "; the trace shows it exit", False: "; it lived on in the trace", None: ""}


def render(result: ReplayResult) -> str:
    lines = [f"{result.policy}: {len(result.decisions)} decisions over {result.duration:g} s"]
    for d in result.decisions:
        mark = (
            " [counterfactual]"
            if d.counterfactual
            else " [the real machine did not make this kill: the worlds part here]"
            if d.happened is False
            else ""
        )
        seen = _SEEN[d.happened]
        lines.append(f"  {d.t:9.3f} s  {d.record.rule}: {d.record.outcome}, {_victim(d)}{mark}")
        lines.append(f"               when {printable(d.record.condition)}{seen}")
        lines.append(f"               {printable(d.record.reason)}")
    if result.diverged_at is not None:
        lines.append(
            f"  from {result.diverged_at:g} s on the real machine did not make this policy's"
            " kills: what follows is counterfactual"
        )
    return "\n".join(lines)


def _same(a: ReplayedDecision, b: ReplayedDecision) -> bool:
    va, vb = a.record.victim, b.record.victim
    same_victim = (va and (va.pid, va.start_time)) == (vb and (vb.pid, vb.start_time))
    return same_victim and abs(a.t - b.t) <= SAME_WITHIN


def compare(a: ReplayResult, b: ReplayResult) -> str:
    """Where two policies' decisions first differ, and how many they share."""
    shared = 0
    for da, db in zip(a.decisions, b.decisions, strict=False):
        if not _same(da, db):
            return _first_difference(a, b, [da], [db], shared)
        shared += 1
    rest_a, rest_b = a.decisions[shared:], b.decisions[shared:]
    if not rest_a and not rest_b:
        return f"the two policies made the same {shared} decisions"
    return _first_difference(a, b, rest_a[:1], rest_b[:1], shared)


def _first_difference(
    a: ReplayResult,
    b: ReplayResult,
    da: Sequence[ReplayedDecision],
    db: Sequence[ReplayedDecision],
    shared: int,
) -> str:
    def said(result: ReplayResult, ds: Sequence[ReplayedDecision]) -> str:
        if not ds:
            return f"{result.policy} made no further decision"
        d = ds[0]
        return f"{result.policy} at {d.t:g} s: {d.record.rule}, {d.record.outcome}, {_victim(d)}"

    return (
        f"the policies agree on {shared} decisions, then differ:\n  {said(a, da)}\n  {said(b, db)}"
    )

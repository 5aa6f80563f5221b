"""``reapkit record --out FILE [--duration D]``: write a trace of this machine's memory story."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from typing import Any

import trio

from .._errors import InvalidValue
from .._policy import load_policy
from .._recorder import Recorder, policy_cgroups, policy_lines
from .._trace import TraceWriter
from .._units import parse_duration
from ._status import EXIT_FAILURE, EXIT_OK, UsageError


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "record",
        help="record a trace of memory, pressure and processes, for `reapkit replay`",
        description="Write a trace (gzip-compressed JSON lines, mode 0600) of what a policy"
        " decides on: memory and swap, PSI, the cgroups named, process events and snapshots,"
        " at a rate that follows the headroom. Stops after --duration, or on SIGINT/SIGTERM"
        " (exit 0 either way). Kills nothing. Exit 1 when the trace could not be written to"
        " the end (a full disk), 2 when FILE cannot be created.",
    )
    p.add_argument("--out", required=True, metavar="PATH", help="the trace file to write")
    p.add_argument("--duration", metavar="DURATION", help="stop after this long, e.g. 10m")
    p.add_argument(
        "--no-cmdline", action="store_true",
        help="leave command lines out (they can hold secrets); selectors then see the name",
    )  # fmt: skip
    p.add_argument(
        "--cgroup", action="append", default=[], metavar="CGROUP_DIR",
        help="also record this memory cgroup's usage, limit, events and pressure (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--policy", action="append", default=[], metavar="POLICY",
        help="record for this policy (repeatable): its cgroups too, and as densely near its"
        " memory lines as its own sampler (its crossings are in the trace)",
    )  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        duration = None if args.duration is None else parse_duration(args.duration)
    except InvalidValue as exc:
        raise UsageError(f"--duration: {exc}") from None
    cgroups, lines = list(args.cgroup), []
    for path in args.policy:  # PolicyError: exit 2, naming the file and key
        policy = load_policy(path, dry_run=True)
        cgroups += [c for c in policy_cgroups(policy) if c not in cgroups]
        lines += policy_lines(policy)
    writer = TraceWriter(args.out)
    recorder = Recorder(writer, cmdline=not args.no_cmdline, cgroups=cgroups, lines=lines)

    async def main() -> None:
        # SIGINT and SIGTERM end the recording like --duration: the recorder is cancelled,
        # and writes its end record on the way out.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(recorder.run)
                with trio.move_on_after(duration if duration is not None else math.inf):
                    async for _signum in signals:
                        break
                nursery.cancel_scope.cancel()

    try:
        writer.open()  # here, not in a task: a path that cannot be created is exit status 2
    except OSError as exc:
        raise UsageError(f"cannot write the trace {args.out}: {exc.strerror or exc}") from None
    trio.run(main)
    stats = recorder.statistics()
    if stats.failed is not None:
        print(
            f"reapkit record: the trace {args.out} stopped early: {stats.failed}"
            f" ({stats.lines_written} lines written)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(
        f"{args.out}: {stats.samples} samples, {stats.snapshots} snapshots of up to"
        f" {stats.processes} processes, {stats.lines_written} lines"
        + (f", {stats.lines_dropped} lost (the disk was too slow)" if stats.lines_dropped else ""),
        file=sys.stderr,
    )
    return EXIT_OK

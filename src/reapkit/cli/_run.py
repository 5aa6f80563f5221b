"""``reapkit run [POLICY]``: the daemon.

It locks its memory (``mlockall``, on fault), protects itself with ``oom_score_adj -1000``
(its hooks run with 0), optionally raises its main thread's priority, logs readable text or
JSON lines to stderr (through a queue: a stalled stderr drops lines, never the reaper), writes
every KillRecord as a JSON line (``--records``; see ``_output``), reloads the policy and
reopens the records file on SIGHUP (a broken policy keeps the old one and says why), stops on
SIGTERM/SIGINT within ``--stop-timeout``, and speaks sd_notify (``READY=1``, ``STATUS=``,
``RELOADING=1``, ``STOPPING=1``, ``WATCHDOG=1``) when started by systemd.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Final

import trio

from .._errors import AccessDenied, InvalidValue
from .._heartbeat import HEARTBEAT_EVERY, beat, serve_heartbeat
from .._kernel._syscalls import mlockall, release_free_heap, set_oom_score_adj
from .._policy import Policy, PolicyError, load_policy
from .._procfs import OOM_SCORE_ADJ_MIN
from .._reaper import RECORD_BUFFER, OutputCounters, Reaper, serve_reaper
from .._recorder import TRACE_SEGMENT_MIN, Recorder, policy_cgroups, policy_lines
from .._records import KillRecord, RecordLine
from .._sd_notify import SdNotifier
from .._trace import TraceWriter
from .._units import parse_duration
from ._common import POLICY_HELP, PolicyChoice, choose_policy, scope_from
from ._journal import JournalFormatter, under_journald
from ._output import (
    RECORDS_FLAGS,
    OutputFileError,
    RecordsFile,
    RecordsWriter,
    open_output,
    start_logging,
)
from ._status import EXIT_OK, UsageError

log = logging.getLogger("reapkit")

#: Seconds the exit waits for log lines still queued for stderr.
LOG_STOP_TIMEOUT: Final = 2.0


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "run",
        help="run the reaper daemon",
        description="Run the reaper until SIGTERM or SIGINT. SIGHUP reloads POLICY (a broken"
        " one keeps the old policy). Speaks sd_notify under systemd (Type=notify).",
    )
    p.add_argument("policy", nargs="?", help=POLICY_HELP)
    p.add_argument(
        "--scope",
        metavar="CGROUP_DIR",
        help="confine every rule to this cgroup directory (try a policy on one cgroup)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="decide and record, but never signal anything"
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--records", metavar="PATH", help="append every KillRecord as a JSON line")
    p.add_argument("--nice", type=int, metavar="N", help="the main thread's nice value (-20..19)")
    p.add_argument(
        "--stop-timeout", type=float, default=5.0, metavar="SECONDS",
        help="how long a graceful stop may take (default 5)",
    )  # fmt: skip
    p.add_argument(
        "--heartbeat", metavar="PATH",
        help=f"the event loop writes the time here every {HEARTBEAT_EVERY:g} s, for"
        " `reapkit probe PATH` (a liveness probe)",
    )  # fmt: skip
    p.add_argument(
        "--trace", metavar="PATH",
        help="keep a rolling trace of memory, pressure and processes here (PATH, and the"
        " segment before as PATH.1), for `reapkit replay` after an incident",
    )  # fmt: skip
    p.add_argument(
        "--trace-window", default="10m", metavar="DURATION",
        help="how much the rolling trace keeps at least (default 10m)",
    )  # fmt: skip
    p.add_argument(
        "--trace-no-cmdline", action="store_true",
        help="leave command lines out of the trace (they can hold secrets)",
    )  # fmt: skip
    p.set_defaults(run=run)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and the structured fields
    of what the line is about: a refusal's, a kill record's (``record``, never as JSON text
    inside the message)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        refusal = getattr(record, "refusal", None)
        if refusal is not None:
            data["refusal"] = {"pid": refusal.pid, "reason": refusal.reason.value}
        kill: KillRecord | None = getattr(record, "kill_record", None)
        if kill is not None:
            data["record"] = kill.as_json()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def _message(record: logging.LogRecord) -> str:
    """The line's message, a record quoted whole (``RecordLine``) named instead: its fields
    are the line's ``record``."""
    args = record.args
    if isinstance(args, tuple) and any(isinstance(a, RecordLine) for a in args):
        named = (f"rule {a.record.rule}, {a.record.outcome}" if isinstance(a, RecordLine) else a
                 for a in args)  # fmt: skip
        return str(record.msg) % tuple(named)
    return record.getMessage()


def _formatter(fmt: str, *, journal: bool) -> logging.Formatter:
    """Text or JSON lines; under journald without our own time (the journal has it) and with
    each line's priority."""
    if fmt == "json":
        inner: logging.Formatter = JsonFormatter()
    elif journal:
        inner = logging.Formatter("%(name)s %(levelname)s: %(message)s")
    else:
        inner = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    return JournalFormatter(inner) if journal else inner


def _prepare_process(args: argparse.Namespace) -> None:
    """Lock memory, protect ourselves, set priority; say what could not be done, and go on."""
    release_free_heap()  # before the lock: what is free now is not locked for good
    try:
        on_fault = mlockall()
        log.info("memory locked (mlockall%s)", ", on fault" if on_fault else "")
    except AccessDenied as exc:
        log.warning("running without locked memory: %s", exc)
    try:
        set_oom_score_adj(OOM_SCORE_ADJ_MIN)
    except AccessDenied as exc:
        log.warning("the kernel's OOM killer may pick the reaper itself: %s", exc)
    if args.nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except PermissionError:
            log.warning("could not set nice %d: lowering it needs CAP_SYS_NICE", args.nice)


def run(args: argparse.Namespace) -> int:
    if args.stop_timeout <= 0:
        raise UsageError("--stop-timeout must be positive")
    if args.nice is not None and not -20 <= args.nice <= 19:
        raise UsageError("--nice must be within -20..19")
    choice, policy = _load(args)  # PolicyError: exit 2
    args.policy = choice.path  # what SIGHUP reloads; None (the default): look again then
    # OutputFileError (a symbolic link, a FIFO, another user's file, no such directory): exit 2
    records = RecordsFile.open(args.records) if args.records else None
    if args.heartbeat:
        _check_heartbeat(args.heartbeat)
    recorder = _recorder(args, policy)
    counters = OutputCounters()
    listener = start_logging(
        _formatter(args.log_format, journal=under_journald()),
        logging.DEBUG if args.verbose else logging.INFO,
        counters,
    )
    try:
        log.info("policy: %s", choice.describe())
        _prepare_process(args)
        trio.run(_serve, policy, args, RecordsWriter(records, counters), counters, recorder)
        log.info("stopped")
    finally:
        listener.stop_within(LOG_STOP_TIMEOUT)
    return EXIT_OK


def _load(args: argparse.Namespace) -> tuple[PolicyChoice, Policy]:
    """The policy named or found (``choose_policy``), loaded as the daemon runs it."""
    choice = choose_policy(args.policy)
    policy = load_policy(
        choice.path, dry_run=args.dry_run, scope=scope_from(args), require_trusted=True
    )
    return choice, policy


def _check_heartbeat(path: str) -> None:
    """Refuse at start what ``--records`` refuses, and a place where a beat cannot be written."""
    os.close(open_output(path, "--heartbeat", RECORDS_FLAGS & ~os.O_APPEND))
    try:
        beat(path)
    except OSError as exc:
        raise OutputFileError(f"--heartbeat {path}: cannot write: {exc.strerror or exc}") from None


def _recorder(args: argparse.Namespace, policy: Policy) -> Recorder | None:
    """The ``--trace`` recorder, its file created now (exit 2 if it cannot be)."""
    if not args.trace:
        return None
    try:
        window = parse_duration(args.trace_window)
    except InvalidValue as exc:
        raise UsageError(f"--trace-window: {exc}") from None
    if window < 2 * TRACE_SEGMENT_MIN:
        raise UsageError(f"--trace-window must be at least {2 * TRACE_SEGMENT_MIN:g} s")
    writer = TraceWriter(args.trace)
    try:
        writer.open()
    except OSError as exc:
        raise OutputFileError(f"--trace {args.trace}: {exc.strerror or exc}") from None
    return Recorder(
        writer, window=window, cgroups=policy_cgroups(policy), lines=policy_lines(policy),
        cmdline=not args.trace_no_cmdline,
    )  # fmt: skip


async def _serve_trace(
    recorder: Recorder,
    kills: trio.MemoryReceiveChannel[KillRecord],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The ``--trace`` recorder, and the reaper's kills written into it. Whatever goes wrong
    here ends the trace, never the reaper."""
    try:
        async with kills, trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            task_status.started()
            async for record in kills:
                recorder.record_kill(record)
    except Exception as exc:  # the trace is a convenience; guarding is not
        log.error("trace %s stopped: %s: %s", recorder.writer.path, type(exc).__name__, exc)  # noqa: TRY400


def _status(policy: Policy) -> str:
    mode = " (dry-run)" if policy.dry_run else ""
    names = ", ".join(r.name for r in policy.rules)
    return f"STATUS=watching {len(policy.rules)} rule(s) of {policy.source}{mode}: {names}"


async def _serve(
    policy: Policy,
    args: argparse.Namespace,
    writer: RecordsWriter,
    counters: OutputCounters,
    recorder: Recorder | None,
) -> None:
    sd_notify = SdNotifier.from_environment()
    # Subscribed before the first decision; the writer ends when the reaper has stopped and
    # closed the channel, after the records of the stop.
    send, receive = trio.open_memory_channel[KillRecord](RECORD_BUFFER)
    subscribers = [send]
    if recorder is not None:
        to_trace, kills = trio.open_memory_channel[KillRecord](RECORD_BUFFER)
        subscribers.append(to_trace)
    reloading = trio.Lock()  # one reload at a time, in the order of the SIGHUPs
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:
            outer.start_soon(writer.serve, receive)
            async with trio.open_nursery() as nursery:
                reaper: Reaper = await nursery.start(
                    functools.partial(
                        serve_reaper, policy, stop_timeout=args.stop_timeout,
                        records=subscribers, output=counters,
                    )
                )  # fmt: skip
                if sd_notify.watchdog_interval:
                    nursery.start_soon(_watchdog, sd_notify, sd_notify.watchdog_interval / 2)
                if args.heartbeat:
                    nursery.start_soon(serve_heartbeat, args.heartbeat)
                if recorder is not None:
                    await nursery.start(_serve_trace, recorder, kills)
                sd_notify.send("READY=1", _status(policy))
                log.info("running: %s", _status(policy).removeprefix("STATUS="))
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        writer.reopen()
                        # A task of its own: a load that hangs (a plugin's import) must not
                        # keep this loop from SIGTERM, which then abandons it.
                        nursery.start_soon(_reload, reaper, args, sd_notify, reloading)
                        continue
                    log.info("%s: stopping", signal.Signals(signum).name)
                    sd_notify.send("STOPPING=1", "STATUS=stopping")
                    break
                # Sources close their fds at once; the reap stage joins its threads within
                # --stop-timeout (a reap in progress cannot be interrupted: it is then named).
                nursery.cancel_scope.cancel()
    sd_notify.close()


async def _reload(
    reaper: Reaper, args: argparse.Namespace, sd_notify: SdNotifier, reloading: trio.Lock
) -> None:
    async with reloading:
        await _reload_now(reaper, args, sd_notify)


async def _reload_now(reaper: Reaper, args: argparse.Namespace, sd_notify: SdNotifier) -> None:
    sd_notify.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        # Off the loop: reading the file, and importing a plugin it names for the first
        # time, must not hold up the sources and a decision in progress.
        choice, policy = await trio.to_thread.run_sync(
            _load,
            args,
            abandon_on_cancel=True,  # the load has no effect until reaper.reload
        )
    except Exception as exc:  # a PolicyError, or a bug in loading: keep guarding either way
        reason = exc if isinstance(exc, PolicyError) else f"{type(exc).__name__}: {exc}"
        log.error("SIGHUP: keeping the current policy: %s", reason)  # noqa: TRY400 - a user error: no traceback
        sd_notify.send("READY=1", _status(reaper.policy))
        return
    await reaper.reload(policy)
    log.info("SIGHUP: reloaded %s", choice.describe() if args.policy is None else policy.source)
    sd_notify.send("READY=1", _status(policy))


async def _watchdog(sd_notify: SdNotifier, every: float) -> None:
    while True:
        sd_notify.send("WATCHDOG=1")
        await trio.sleep(every)

"""``reapkit top [POLICY] [--once] [--interval S] [--records PATH]``: a live, read-only view.

Memory pressure (PSI ``some``/``full`` avg10, with a short history), MemAvailable and
SwapFree, what each rule of the policy would choose right now (``Engine.preview``: candidates,
selectors and the guard's check, nothing signalled) and the recent kills of a records file as
``reapkit run --records`` writes it (one ``KillRecord.to_json_line()`` a line).

Collecting and rendering are apart: :class:`Collector` reads the system into a frozen
:class:`Snapshot`; :func:`render` turns a snapshot into a rich renderable and reads nothing,
so it is tested with hand-made snapshots.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import signal
import time
from collections.abc import Iterable
from typing import Any, Final, Literal

import attrs
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .._conditions import MemoryCondition, PressureCondition
from .._engine import Engine, Rule
from .._errors import InvalidValue, ReapkitError
from .._plugins import Ranked
from .._policy import Policy, load_policy
from .._procfs import MemInfo, ProcFS
from .._records import KillRecord
from .._sources.psi import PressureSnapshot, parse_pressure
from ._common import POLICY_HELP, choose_policy, preview_notes, printable
from ._status import EXIT_OK, UsageError

#: Pressure samples kept for the sparklines (one per refresh).
HISTORY: Final = 60
#: Candidates shown per rule.
CANDIDATES: Final = 5
#: Kills shown.
KILLS: Final = 5
#: How much of the end of the records file is read: enough for many records, cheap each second.
RECORDS_TAIL: Final = 256 * 1024
MIN_INTERVAL: Final = 0.1
MAX_INTERVAL: Final = 3600.0
#: The sparkline's scale never goes below this (percent): noise stays flat.
PSI_SCALE_FLOOR: Final = 1.0
SPARK: Final = "▁▂▃▄▅▆▇█"
#: Outcomes shown as kills; the others are counted.
KILL_OUTCOMES: Final = frozenset({"killed", "dry-run"})
MiB: Final = 1 << 20

#: Timeline steps, in pipeline order, and how they are shown.
_STEPS: Final = {
    "victim_chosen": "chosen",
    "signal_sent": "signal",
    "reap_started": "reap",
    "reap_finished": "reaped",
    "memory_back": "memory-back",
    "exit_seen": "exit",
}


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "top",
        help="a live, read-only view: pressure, memory, what each rule would choose, kills",
        description="Show memory pressure (PSI some/full avg10 with a short history),"
        " MemAvailable and SwapFree, the top candidates of each rule of POLICY with score and"
        " reason, and the recent kills of a records file"
        " with their timelines. Read-only: it never signals anything. Refreshes every"
        " --interval seconds until Ctrl-C (exit 130); when stdout is not a terminal it prints"
        " one frame after another. --once prints one frame and exits 0.",
    )
    p.add_argument("policy", nargs="?", help=POLICY_HELP)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help=f"seconds between refreshes, {MIN_INTERVAL:g}..{MAX_INTERVAL:g} (default 1)",
    )
    p.add_argument(
        "--records",
        metavar="PATH",
        help="the JSON-lines file 'reapkit run --records PATH' writes: show its recent kills",
    )
    p.set_defaults(run=run)


# -- the snapshot --------------------------------------------------------------------------------


@attrs.frozen
class ConditionView:
    """One condition of a rule's ``when``, as it stands now."""

    text: str
    #: ``"trigger"`` for PSI conditions: they fire on their own, they are not a level to read.
    state: Literal["holds", "does not hold", "trigger", "unknown"]
    detail: str = ""


@attrs.frozen
class RuleView:
    """What one rule would do right now."""

    name: str
    conditions: tuple[ConditionView, ...]
    #: The best-ranked candidates (at most :data:`CANDIDATES`).
    candidates: tuple[Ranked, ...] = ()
    #: The PID the rule would choose (the first the guard allows), or ``None``.
    chosen: int | None = None
    #: How many candidates survived the selectors, and how many were in scope.
    ranked: int = 0
    in_scope: int = 0
    #: Selector failures and guard refusals, one short sentence each.
    notes: tuple[str, ...] = ()
    #: Set when the preview itself failed.
    error: str | None = None


@attrs.frozen
class KillView:
    """One record of the records file, as much of it as the view shows."""

    rule: str
    outcome: str
    #: Seconds since the epoch when the trigger was seen, if recorded.
    time: float | None
    comm: str | None
    pid: int | None
    rss: int | None
    #: ``(step, ms after the trigger)``, in the order they happened.
    steps: tuple[tuple[str, float], ...]
    bytes_freed: int | None
    reason: str = ""


@attrs.frozen
class RecordsView:
    """The end of the records file."""

    path: str | None
    #: The last kills (outcome ``killed`` or ``dry-run``), oldest first.
    kills: tuple[KillView, ...] = ()
    #: Outcomes other than kills among the records read, with their counts.
    others: tuple[tuple[str, int], ...] = ()
    #: Records read (valid lines), and lines skipped because they were not records.
    read: int = 0
    malformed: int = 0
    missing: bool = False
    error: str | None = None


@attrs.frozen
class Snapshot:
    """Everything one frame shows; :func:`render` reads nothing else."""

    taken_at: float
    policy: str
    interval: float
    pressure: PressureSnapshot | None
    pressure_error: str | None
    #: avg10 values (percent), oldest first, the last one being ``pressure``'s.
    some_history: tuple[float, ...]
    full_history: tuple[float, ...]
    meminfo: MemInfo | None
    meminfo_error: str | None
    rules: tuple[RuleView, ...]
    records: RecordsView


# -- collecting ----------------------------------------------------------------------------------


def parse_record(line: str) -> KillView:
    """One line of a records file (:meth:`KillRecord.from_json`); raises ``ValueError`` for a
    line that is not a KillRecord."""
    record = KillRecord.from_json(line)
    order = list(_STEPS)
    steps = sorted(
        ((k, v) for k, v in record.timeline.ms_from_trigger().items() if v is not None),
        key=lambda kv: (kv[1], order.index(kv[0]) if kv[0] in order else len(order)),
    )
    victim = record.victim
    return KillView(
        rule=record.rule,
        outcome=record.outcome,
        time=record.timeline.trigger_seen + record.epoch_offset,
        comm=None if victim is None else victim.comm,
        pid=None if victim is None else victim.pid,
        rss=None if victim is None else victim.rss,
        steps=tuple(steps),
        bytes_freed=record.bytes_freed,
        reason=record.reason,
    )


def read_records(path: str, *, limit: int = KILLS, tail_bytes: int = RECORDS_TAIL) -> RecordsView:
    """The last ``limit`` kills among the records at the end of ``path`` (its last
    ``tail_bytes``). Lines that are not records are counted and skipped; a last line without
    its newline is one still being written and is skipped silently if it does not parse."""
    try:
        with open(path, "rb") as f:
            start = max(0, os.fstat(f.fileno()).st_size - tail_bytes)
            f.seek(start)
            data = f.read(tail_bytes)
    except FileNotFoundError:
        return RecordsView(path, missing=True)
    except OSError as exc:
        return RecordsView(path, error=f"cannot read {path}: {exc.strerror or exc}")
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first is the end of a line that began before the tail
    partial = lines.pop()  # after the last newline: empty, or a line still being written
    views: list[KillView] = []
    malformed = 0
    for raw in lines:
        if not raw.strip() or b'"type":"suppressed"' in raw:  # the rate limit's count
            continue
        try:
            views.append(parse_record(raw.decode("utf-8", errors="replace")))
        except ValueError:
            malformed += 1
    if partial.strip():
        with contextlib.suppress(ValueError):
            views.append(parse_record(partial.decode("utf-8", errors="replace")))
    kills = [v for v in views if v.outcome in KILL_OUTCOMES]
    others = collections.Counter(v.outcome for v in views if v.outcome not in KILL_OUTCOMES)
    return RecordsView(
        path,
        kills=tuple(kills[-limit:]) if limit > 0 else (),
        others=tuple(sorted(others.items())),
        read=len(views),
        malformed=malformed,
    )


def _conditions(rule: Rule, meminfo: MemInfo | None) -> tuple[ConditionView, ...]:
    views = []
    for cond in rule.when:
        if isinstance(cond, PressureCondition):
            views.append(ConditionView(str(cond.spec), "trigger"))
        elif isinstance(cond, MemoryCondition):
            if meminfo is None:
                views.append(ConditionView(str(cond), "unknown"))
                continue
            holds, numbers = cond.holds(meminfo)
            views.append(ConditionView(str(cond), "holds" if holds else "does not hold", numbers))
    return tuple(views)


async def _no_records(_record: KillRecord) -> None:
    return None


@attrs.define
class Collector:
    """Reads the system into :class:`Snapshot` objects, keeping the pressure history and one
    :class:`Engine` (stateful selectors see every refresh). Read-only: the engine only
    previews, and the policy is loaded with ``dry_run=True``."""

    policy: Policy
    records_path: str | None = None
    procfs: ProcFS = attrs.field(factory=ProcFS)
    interval: float = 1.0
    candidates: int = CANDIDATES
    kills: int = KILLS
    _engine: Engine = attrs.field(init=False)
    _some: collections.deque[float] = attrs.field(
        init=False, factory=lambda: collections.deque(maxlen=HISTORY)
    )
    _full: collections.deque[float] = attrs.field(
        init=False, factory=lambda: collections.deque(maxlen=HISTORY)
    )
    _records_key: tuple[int, ...] | None = attrs.field(init=False, default=None)
    _records_view: RecordsView | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._engine = Engine(self.policy.rules, emit=_no_records, procfs=self.procfs)

    @property
    def pressure_path(self) -> str:
        return f"{self.procfs.root}/pressure/memory"

    def _pressure(self) -> tuple[PressureSnapshot | None, str | None]:
        path = self.pressure_path
        try:
            with open(path, "rb") as f:
                snapshot = parse_pressure(f.read())
        except FileNotFoundError:
            return None, f"PSI is not available here ({path} does not exist)"
        except OSError as exc:  # EOPNOTSUPP: a kernel booted with psi=0
            return None, f"PSI is not available here ({path}: {exc.strerror or exc})"
        except InvalidValue as exc:
            return None, str(exc)
        self._some.append(snapshot.some.avg10)
        if snapshot.full is not None:
            self._full.append(snapshot.full.avg10)
        return snapshot, None

    def _meminfo(self) -> tuple[MemInfo | None, str | None]:
        try:
            return self.procfs.meminfo(), None
        except (ReapkitError, OSError) as exc:
            return None, str(exc)

    def _records(self) -> RecordsView:
        path = self.records_path
        if path is None:
            return RecordsView(None)
        try:
            st = os.stat(path)
            key: tuple[int, ...] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if key is None or key != self._records_key or self._records_view is None:
            self._records_view = read_records(path, limit=self.kills)
            self._records_key = key
        return self._records_view

    async def _rule(self, rule: Rule, meminfo: MemInfo | None) -> RuleView:
        conditions = _conditions(rule, meminfo)
        try:
            chosen, ranked, steps = await self._engine.preview(rule)
        except (ReapkitError, OSError) as exc:
            return RuleView(rule.name, conditions, error=f"{type(exc).__name__}: {exc}")
        first = next((s for s in steps if s.error is None), None)
        return RuleView(
            rule.name,
            conditions,
            candidates=tuple(ranked[: self.candidates]),
            chosen=None if chosen is None else chosen.candidate.pid,
            ranked=len(ranked),
            in_scope=first.candidates_in if first is not None else len(ranked),
            notes=preview_notes(steps),
        )

    async def collect(self) -> Snapshot:
        """One snapshot (reads /proc, previews every rule, reads the records file's end)."""
        pressure, pressure_error = self._pressure()
        meminfo, meminfo_error = self._meminfo()
        rules = [await self._rule(rule, meminfo) for rule in self.policy.rules]
        return Snapshot(
            taken_at=time.time(),
            policy=self.policy.source,
            interval=self.interval,
            pressure=pressure,
            pressure_error=pressure_error,
            some_history=tuple(self._some),
            full_history=tuple(self._full),
            meminfo=meminfo,
            meminfo_error=meminfo_error,
            rules=tuple(rules),
            records=self._records(),
        )


# -- rendering (pure) ----------------------------------------------------------------------------


def sparkline(values: Iterable[float], scale: float) -> str:
    """``▁▂▃▄▅▆▇█`` for ``values`` from 0 to ``scale``."""
    out = []
    for v in values:
        level = 0.0 if not math.isfinite(v) or scale <= 0 else min(max(v / scale, 0.0), 1.0)
        out.append(SPARK[round(level * (len(SPARK) - 1))])
    return "".join(out)


def _size(n: int) -> str:
    if abs(n) >= 10 << 30:
        return f"{n / (1 << 30):.0f} GiB"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / MiB:.0f} MiB" if abs(n) >= 10 * MiB else f"{n / MiB:.1f} MiB"


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if abs(n) >= 10 * MiB else f"{n / MiB:.1f} MiB"


def _ms(ms: float) -> str:
    return f"+{ms:.1f} ms" if abs(ms) < 10 else f"+{ms:.0f} ms"


def _score(score: float) -> str:
    score = float(score)  # a plugin may well give an int
    return str(int(score)) if score.is_integer() else f"{score:.2f}"


def _clock(when: float, now: float) -> str:
    local, today = time.localtime(when), time.localtime(now)
    same_day = local[:3] == today[:3]
    return time.strftime("%H:%M:%S" if same_day else "%m-%d %H:%M", local)


def _pressure_style(avg10: float) -> str:
    return "red" if avg10 >= 40 else "yellow" if avg10 >= 10 else "green"


def _memory(s: Snapshot) -> Panel:
    lines: list[Text] = []
    if s.pressure is None:
        lines.append(Text(f"memory pressure: {s.pressure_error or 'unknown'}", style="dim"))
    else:
        scale = max((*s.some_history, *s.full_history, PSI_SCALE_FLOOR))
        shown = [("some", s.pressure.some.avg10, s.some_history)]
        if s.pressure.full is not None:
            shown.append(("full", s.pressure.full.avg10, s.full_history))
        for kind, avg10, history in shown:
            lines.append(
                Text.assemble(
                    f"pressure {kind} avg10 ",
                    (f"{avg10:6.2f}%", _pressure_style(avg10)),
                    "  ",
                    (sparkline(history, scale), "cyan"),
                )
            )
        lines.append(
            Text(
                f"  (history: the last {len(s.some_history)} of up to {HISTORY} samples, every"
                f" {s.interval:g} s; full bar = {scale:.2f}%)",
                style="dim",
            )
        )
    m = s.meminfo
    if m is None:
        lines.append(Text(f"MemAvailable: {s.meminfo_error or 'unknown'}", style="dim"))
    else:
        share = m.available / m.total * 100 if m.total else 0.0
        style = "red" if share < 5 else "yellow" if share < 10 else "green"
        lines.append(
            Text.assemble(
                "MemAvailable ",
                (f"{_size(m.available)} of {_size(m.total)} ({share:.0f}%)", style),
                f"   SwapFree {_size(m.swap_free)} of {_size(m.swap_total)}"
                if m.swap_total
                else "   no swap",
            )
        )
    return Panel(Group(*lines), title="memory", title_align="left")


def _rule(view: RuleView) -> RenderableType:
    when = Text("when: ", style="dim")
    for i, cond in enumerate(view.conditions):
        if i:
            when.append(" AND ", style="dim")
        when.append(cond.text)
        style = {"holds": "red", "does not hold": "green"}.get(cond.state, "dim")
        label = "a PSI trigger" if cond.state == "trigger" else cond.state
        detail = f" ({cond.detail})" if cond.detail else ""
        when.append(f": {label}{detail}", style=style)
    if not view.conditions:
        when.append("only when triggered by hand")
    if view.error is not None:
        heading = Text.assemble(("rule ", "bold"), (view.name, "bold"), ": ")
        heading.append(f"preview failed: {view.error}", style="red")
        return Group(heading, when, Text())
    chosen = next((r for r in view.candidates if r.candidate.pid == view.chosen), None)
    heading = Text.assemble(("rule ", "bold"), (view.name, "bold"), ": ")
    if view.chosen is None:
        heading.append(f"no candidate ({view.ranked} ranked of {view.in_scope} in scope)")
    else:
        name = printable(chosen.candidate.comm) if chosen else "?"
        heading.append(f"would choose {name} (pid {view.chosen})", style="bold yellow")
        heading.append(f" of {view.ranked} ranked, {view.in_scope} in scope")
    parts: list[RenderableType] = [heading, when]
    if view.candidates:
        table = Table(box=None, pad_edge=False, show_edge=False, expand=False)
        table.add_column("", no_wrap=True)
        table.add_column("pid", justify="right", no_wrap=True)
        table.add_column("comm", no_wrap=True, max_width=16, overflow="ellipsis")
        table.add_column("rss", justify="right", no_wrap=True)
        table.add_column("oom_score", justify="right", no_wrap=True)
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("reason")
        for r in view.candidates:
            c = r.candidate
            mine = c.pid == view.chosen
            table.add_row(
                Text("▶" if mine else " ", style="bold yellow"),
                Text(str(c.pid)),
                Text(printable(c.comm), style="bold" if mine else ""),
                Text(_size(c.rss)),
                Text(str(c.oom_score)),
                Text(_score(r.score)),
                Text(printable(r.reason), style="dim"),
            )
        parts.append(table)
    parts.extend(Text(printable(note), style="dim italic") for note in view.notes)
    parts.append(Text())
    return Group(*parts)


def _kill(k: KillView) -> Text:
    """A kill in two lines: who and how much came back; then the timeline."""
    line = Text()
    line.append(k.rule)
    line.append("  ")
    line.append(k.outcome, style="bold red" if k.outcome == "killed" else "bold yellow")
    if k.comm is not None:
        line.append(f"  {printable(k.comm)}", style="bold")
        rss = f", rss {_size(k.rss)}" if k.rss is not None else ""
        line.append(f" (pid {k.pid}{rss})")
    if k.bytes_freed is not None:
        line.append(f"  freed {_mib(k.bytes_freed)}", style="green")
    elif k.outcome == "dry-run":
        line.append("  (nothing signalled)", style="dim")
    steps = " → ".join(f"{_STEPS.get(name, name)} {_ms(ms)}" for name, ms in k.steps)
    line.append("\n")
    line.append(steps or "no timeline", style="" if k.steps else "dim")
    return line


def _kills(s: Snapshot) -> Panel:
    r = s.records
    title = "recent kills" + (f" ({r.path})" if r.path else "")
    body: list[RenderableType] = []
    if r.path is None:
        body.append(
            Text(
                "no records file: --records PATH shows the kills 'reapkit run --records PATH'"
                " writes",
                style="dim",
            )
        )
    elif r.error is not None:
        body.append(Text(r.error, style="red"))
    elif not r.kills:
        body.append(Text("no kills yet" + (" (no such file yet)" if r.missing else "")))
    if r.kills:
        kills = Table.grid(padding=(0, 2))
        kills.add_column(no_wrap=True, style="dim")
        kills.add_column()
        for k in r.kills:
            kills.add_row(_clock(k.time, s.taken_at) if k.time is not None else "?", _kill(k))
        body.append(kills)
    notes = []
    if r.others:
        notes.append(
            "also: "
            + ", ".join(f"{n} {outcome}" for outcome, n in r.others)
            + f" (of the last {r.read} records)"
        )
    if r.malformed:
        notes.append(f"{r.malformed} malformed line{'s' if r.malformed != 1 else ''} skipped")
    if notes:
        body.append(Text("; ".join(notes), style="dim"))
    return Panel(Group(*body), title=title, title_align="left")


def render(snapshot: Snapshot) -> RenderableType:
    """The frame for ``snapshot``: a pure function of it (no reads, no clock)."""
    s = snapshot
    header = Text.assemble(
        ("reapkit top", "bold"),
        f" — {s.policy} — {_clock(s.taken_at, s.taken_at)}, every {s.interval:g} s — ",
        ("read-only", "dim"),
    )
    rules = [_rule(view) for view in s.rules]
    # Kills before rules: on a short terminal the candidates are what gets cut off.
    return Group(header, _memory(s), _kills(s), Text(), *rules)


# -- running -------------------------------------------------------------------------------------


async def _wait(signals: Any, interval: float) -> None:
    """Sleep ``interval``; SIGTERM or SIGHUP meanwhile end the view as Ctrl-C does."""
    with trio.move_on_after(interval):
        async for signum in signals:
            raise KeyboardInterrupt(signal.Signals(signum).name)


async def _watch(collector: Collector, console: Console) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        if not console.is_terminal:  # piped: one frame after another, as `top -b` does
            while True:
                console.print(render(await collector.collect()))
                console.rule()
                await _wait(signals, collector.interval)
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                live.update(render(await collector.collect()), refresh=True)
                await _wait(signals, collector.interval)


def run(args: argparse.Namespace) -> int:
    interval = args.interval
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:  # also NaN
        raise UsageError(
            f"--interval must be within {MIN_INTERVAL:g}..{MAX_INTERVAL:g} seconds,"
            f" got {interval:g}"
        )
    policy = load_policy(choose_policy(args.policy).path, dry_run=True)
    collector = Collector(policy, records_path=args.records, interval=interval)
    console = Console()
    if args.once:
        console.print(render(trio.run(collector.collect)))
        return EXIT_OK
    trio.run(_watch, collector, console)  # until Ctrl-C, SIGTERM or SIGHUP: KeyboardInterrupt
    return EXIT_OK

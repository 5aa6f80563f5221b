"""KillRecord: one frozen record per kill — and per abandoned or refused one — with its timeline.

Records are the product's proof that it works: logs, metrics, the CLI and embedders all read
them. Times are on the trio clock (``trio.current_time()``, monotonic); ``epoch_offset`` turns
them into wall-clock seconds for humans and other programs.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs

Outcome = Literal["killed", "dry-run", "abandoned", "refused", "no-candidate", "failed"]


@attrs.frozen
class Timeline:
    """When each step happened (trio clock, seconds); ``None`` when it did not happen."""

    trigger_seen: float
    victim_chosen: float | None = None
    signal_sent: float | None = None
    reap_started: float | None = None
    reap_finished: float | None = None
    memory_back: float | None = None
    exit_seen: float | None = None

    def ms_from_trigger(self) -> dict[str, float | None]:
        """Each step in milliseconds after the trigger was seen."""
        return {
            name: None if value is None else round((value - self.trigger_seen) * 1000, 3)
            for name, value in attrs.asdict(self).items()
            if name != "trigger_seen"
        }


@attrs.frozen
class Victim:
    """The process chosen, as it was when chosen."""

    pid: int
    start_time: int
    comm: str
    cmdline: str
    cgroup: str
    uid: int | None
    rss: int
    swap: int | None
    oom_score: int
    oom_score_adj: int | None


@attrs.frozen
class SelectorStep:
    """What one selector of the chain did."""

    selector: str
    candidates_in: int
    candidates_out: int
    #: The candidate ranked first after this step; ``None`` for a pure filter (``protect``,
    #: ``scope``: ``Selector.ranks`` is false), which ranks no one.
    top_pid: int | None
    #: Why the first candidate is first (for a filter: why it was kept).
    reason: str
    #: Set when the selector failed (raised or overran its deadline) and was skipped.
    error: str | None = None


@attrs.frozen
class ActionStep:
    """What one action of the chain did."""

    action: str
    outcome: str
    detail: str
    at: float


@attrs.frozen
class KillRecord:
    """One decision's record: what held, whom the rule chose and why, what each action did,
    when each step happened, and how much memory came back. ``to_json_line()`` for logs."""

    rule: str
    outcome: Outcome
    #: One sentence: why this outcome.
    reason: str
    #: The condition(s) that held, e.g. ``"memory some 150ms/2s fired; mem_available below 5%"``.
    condition: str
    timeline: Timeline
    victim: Victim | None = None
    selectors: tuple[SelectorStep, ...] = ()
    actions: tuple[ActionStep, ...] = ()
    #: Bytes the victim's memory cgroup or the system got back, where it was measured.
    bytes_freed: int | None = None
    dry_run: bool = False
    #: The guard's refusal (reason value and detail) when outcome is ``"refused"``.
    refusal: str | None = None
    #: Add to timeline values to get seconds since the epoch.
    epoch_offset: float = 0.0

    def as_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=True)
        data["timeline_ms"] = self.timeline.ms_from_trigger()
        data["time"] = self.timeline.trigger_seen + self.epoch_offset
        return data

    def to_json_line(self) -> str:
        """The record as one line of JSON (no newline inside)."""
        return json.dumps(self.as_json(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> KillRecord:
        """The record that :meth:`to_json_line` (or :meth:`as_json`) wrote: a line of JSON, or
        it parsed. Every field is checked against its type; keys it does not know (a newer
        writer's, and the derived ``timeline_ms`` and ``time``) are ignored, and a missing
        one takes its default where it has one. Raises ``ValueError`` naming the key path
        for anything else."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)  # json.JSONDecodeError is a ValueError
            except RecursionError:
                raise ValueError("record: nested too deeply") from None
        record: KillRecord = _structure(cls, data, "record")
        return record


class RecordLine:
    """A record as its JSON line, for a log call's ``%s``: written only if the log line is
    (a record logged at DEBUG costs nothing at INFO). A JSON formatter reads ``record``."""

    __slots__ = ("record",)

    def __init__(self, record: KillRecord) -> None:
        self.record = record

    def __str__(self) -> str:
        return self.record.to_json_line()


@attrs.frozen
class KillWarning:
    """A rule is about to act on ``victim`` (sent by the ``warn`` action to observers)."""

    timestamp: float
    rule: str
    victim: Victim
    message: str
    #: A dry run: nobody will actually be ended (observers may say so, or stay quiet).
    dry_run: bool = False


# -- reading records back: the attrs classes are the schema -------------------------------------


#: The type hints of each record class, resolved once.
_HINTS: dict[type[Any], dict[str, Any]] = {}


def _structure(cls: type[Any], data: object, path: str) -> Any:
    """``cls`` (an attrs class of this module) from ``data`` as ``attrs.asdict`` made it."""
    if not isinstance(data, Mapping):
        # One error for any malformed record, whatever is wrong with it:
        raise ValueError(f"{path}: expected an object, not {type(data).__name__}")  # noqa: TRY004
    hints = _HINTS.get(cls) or _HINTS.setdefault(cls, typing.get_type_hints(cls))
    values = {}
    for field in attrs.fields(cls):
        if field.name in data:
            where = f"{path}.{field.name}"
            values[field.name] = _value(hints[field.name], data[field.name], where)
        elif field.default is attrs.NOTHING:
            raise ValueError(f"{path}.{field.name}: missing")
    return cls(**values)


def _value(hint: Any, value: object, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (hint,) = (a for a in args if a is not type(None))
        return _value(hint, value, path)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ValueError(f"{path}: {value!r:.80} is not one of {', '.join(args)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):  # tuple: as_json()'s, not yet JSON
            raise ValueError(f"{path}: expected a list, not {type(value).__name__}")
        return tuple(_value(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if attrs.has(hint):
        return _structure(hint, value, path)
    # bool is an int to Python, not to JSON: a number is never read as a flag, nor back.
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise ValueError(f"{path}: expected {hint.__name__}, not {value!r:.80}")

"""KillRecord.from_json reads what to_json_line writes: one schema (the attrs classes), read
back field for field, with every field checked against its type (hostile lines are normal)."""

from __future__ import annotations

import json
import re
import typing
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reapkit import ActionStep, KillRecord, SelectorStep, Timeline, Victim

MiB = 1 << 20

#: Names a process may choose: spaces, parentheses, newlines, quotes, escapes, invalid UTF-8
#: (as ``_procfs`` decodes it: surrogate escapes), and JSON's own syntax.
HOSTILE = [
    "a) Z (",
    "foo) Z ",
    "line\nbreak",
    'quote" ,"outcome":"killed',
    "back\\slash",
    "\udcff\udcfe",
    "nul\x00",
    "}{][",
    "\u202etxt.exe",
    "",
]

texts = st.text(max_size=40)
floats = st.floats(allow_nan=False, allow_infinity=False)
maybe_float = st.none() | floats
ints = st.integers(min_value=-(2**63), max_value=2**64)
victims = st.builds(
    Victim,
    pid=ints,
    start_time=ints,
    comm=texts | st.sampled_from(HOSTILE),
    cmdline=texts,
    cgroup=texts,
    uid=st.none() | ints,
    rss=ints,
    swap=st.none() | ints,
    oom_score=ints,
    oom_score_adj=st.none() | ints,
)
records = st.builds(
    KillRecord,
    rule=texts,
    outcome=st.sampled_from(typing.get_args(typing.get_type_hints(KillRecord)["outcome"])),
    reason=texts,
    condition=texts,
    timeline=st.builds(
        Timeline,
        trigger_seen=floats,
        victim_chosen=maybe_float,
        signal_sent=maybe_float,
        reap_started=maybe_float,
        reap_finished=maybe_float,
        memory_back=maybe_float,
        exit_seen=maybe_float,
    ),
    victim=st.none() | victims,
    selectors=st.lists(
        st.builds(
            SelectorStep,
            selector=texts,
            candidates_in=ints,
            candidates_out=ints,
            top_pid=st.none() | ints,
            reason=texts,
            error=st.none() | texts,
        ),
        max_size=3,
    ).map(tuple),
    actions=st.lists(
        st.builds(ActionStep, action=texts, outcome=texts, detail=texts, at=floats), max_size=3
    ).map(tuple),
    bytes_freed=st.none() | ints,
    dry_run=st.booleans(),
    refusal=st.none() | texts,
    epoch_offset=floats,
)


@given(records)
def test_from_json_reads_what_to_json_line_writes(record: KillRecord) -> None:
    line = record.to_json_line()
    assert "\n" not in line
    assert KillRecord.from_json(line) == record
    assert KillRecord.from_json(line.encode()) == record
    assert KillRecord.from_json(record.as_json()) == record


def _record(comm: str = "hog") -> KillRecord:
    victim = Victim(4242, 99, comm, f"{comm} --eat", "/sandbox", 1000, 512 * MiB, 0, 900, 0)
    return KillRecord(
        rule="low-memory",
        outcome="killed",
        reason="chosen",
        condition="mem_available below 5%",
        timeline=Timeline(100.0, 100.002, 100.003, exit_seen=100.04),
        victim=victim,
        selectors=(SelectorStep("oom-score", 3, 3, 4242, f"oom_score 900 ({comm!r})"),),
        actions=(ActionStep("kill", "ok", "SIGKILL", 100.003),),
        bytes_freed=498 * MiB,
        epoch_offset=1_700_000_000.0,
    )


@pytest.mark.parametrize("comm", HOSTILE)
def test_hostile_names_come_back_as_they_were(comm: str) -> None:
    record = _record(comm)
    back = KillRecord.from_json(record.to_json_line())
    assert back == record
    assert back.victim is not None
    assert back.victim.comm == comm


def test_unknown_keys_are_ignored_and_defaults_fill_in() -> None:
    data = json.loads(_record().to_json_line())
    data["from_a_newer_writer"] = {"x": 1}
    data["timeline_ms"] = "not what the timeline says"  # derived: not read
    for key in ("victim", "selectors", "actions", "bytes_freed", "dry_run", "refusal"):
        del data[key]
    back = KillRecord.from_json(data)
    assert (back.victim, back.selectors, back.bytes_freed, back.dry_run) == (None, (), None, False)


def _with(path: str, value: Any) -> str:
    data = json.loads(_record().to_json_line())
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("{", "Expecting"),
        ("[]", "record: expected an object, not list"),
        ('"killed"', "record: expected an object, not str"),
        ("[" * 100_000 + "]" * 100_000, "record: nested too deeply"),
        ('{"rule": "r"}', "record.outcome: missing"),
        (_with("outcome", "murdered"), "record.outcome: 'murdered' is not one of killed, "),
        (_with("outcome", 1), "record.outcome: 1 is not one of"),
        (_with("rule", None), "record.rule: expected str, not None"),
        (_with("timeline", KeyError), "record.timeline: missing"),
        (_with("timeline.trigger_seen", "now"), "record.timeline.trigger_seen: expected float"),
        (_with("timeline.trigger_seen", True), "record.timeline.trigger_seen: expected float"),
        (_with("victim.pid", 4242.5), "record.victim.pid: expected int, not 4242.5"),
        (_with("victim.pid", False), "record.victim.pid: expected int, not False"),
        (_with("victim", [1]), "record.victim: expected an object, not list"),
        (_with("victim.comm", KeyError), "record.victim.comm: missing"),
        (_with("dry_run", 0), "record.dry_run: expected bool, not 0"),
        (_with("selectors", {}), "record.selectors: expected a list, not dict"),
        (_with("selectors", [{"selector": 1}]), "record.selectors[0].selector: expected str"),
        (_with("bytes_freed", "x" * 1000), "record.bytes_freed: expected int, not 'xxx"),
    ],
)
def test_what_is_not_a_record_is_a_value_error_naming_the_key(line: str, error: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(error)) as info:
        KillRecord.from_json(line)
    assert len(str(info.value)) < 200  # a hostile value is not repeated whole

"""The daemon's log lines for systemd and scripts: under journald (``$JOURNAL_STREAM`` is
stderr's device and inode) each line carries its syslog priority and no time of our own;
with ``--log-format json`` a decision's record is structured fields, never JSON text in a
message; the full record is at DEBUG, a one-line summary per decision at INFO or WARNING."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reapkit._records import KillRecord, RecordLine, Timeline, Victim
from reapkit.cli._journal import JournalFormatter, under_journald
from reapkit.cli._output import log_record
from reapkit.cli._run import JsonFormatter, _formatter
from reapkit.testing import SandboxCgroup

from .conftest import Spawn

_VICTIM = Victim(42, 1, "hog", "hog --big", "/x", 0, 1 << 30, 0, 900, 0)


def _record(outcome: str = "killed") -> KillRecord:
    return KillRecord(
        "r", outcome, "victim 'hog' (42) killed", "always", Timeline(1.0, 1.1, 1.2),  # type: ignore[arg-type]
        victim=_VICTIM, bytes_freed=1 << 30, epoch_offset=1000.0,
    )  # fmt: skip


def _line(level: int, msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("reapkit", level, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


# -- journald ------------------------------------------------------------------------------------


def test_under_journald_only_when_the_stream_is_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as f, open(tmp_path / "other", "w") as g:
        st = os.fstat(f.fileno())
        mine = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald(mine, f.fileno())
        # Inherited by a process whose stderr went elsewhere: not the journal.
        assert not under_journald(mine, g.fileno())
    for value in ("", "8:", ":9", "x:y", "1:2:3"):
        assert not under_journald({"JOURNAL_STREAM": value}, 2)
    assert not under_journald({}, 2)


@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6),
     (logging.DEBUG, 7)],
)  # fmt: skip
def test_journal_lines_carry_their_priority_and_no_time(level: int, priority: int) -> None:
    text = _formatter("text", journal=True).format(_line(level, "it %s", "happened"))
    assert text == f"<{priority}>reapkit {logging.getLevelName(level)}: it happened"
    plain = _formatter("text", journal=False).format(_line(level, "it happened"))
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} reapkit ", plain)


def test_every_line_of_a_traceback_has_the_priority() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        line = _line(logging.ERROR, "handling failed")
        line.exc_info = sys.exc_info()
    text = _formatter("text", journal=True).format(line)
    assert len(text.splitlines()) > 2
    assert all(row.startswith("<3>") for row in text.splitlines())


def test_json_under_journald_is_still_json_behind_the_priority() -> None:
    formatter = _formatter("json", journal=True)
    assert isinstance(formatter, JournalFormatter)
    text = formatter.format(_line(logging.WARNING, "low memory"))
    assert text.startswith("<4>{")
    assert json.loads(text.removeprefix("<4>"))["message"] == "low memory"


# -- the kill record in the log ------------------------------------------------------------------


def test_a_decision_in_json_is_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "reapkit"):
        log_record(_record())
    (line,) = caplog.records
    data = json.loads(JsonFormatter().format(line))
    assert (
        data["message"] == "rule r: killed 'hog' (pid 42): victim 'hog' (42) killed, 1024 MiB back"
    )
    assert data["record"] == json.loads(_record().to_json_line())
    assert data["record"]["victim"]["pid"] == 42 and data["level"] == "warning"


def test_the_full_record_line_names_the_record_instead_of_quoting_it() -> None:
    record = _record("dry-run")
    line = _line(logging.DEBUG, "kill record: %s", RecordLine(record), kill_record=record)
    assert line.getMessage() == f"kill record: {record.to_json_line()}"  # the text format
    data = json.loads(JsonFormatter().format(line))
    assert data["message"] == "kill record: rule r, dry-run"
    assert data["record"]["outcome"] == "dry-run"


@pytest.mark.parametrize(
    ("outcome", "level"),
    [("killed", logging.WARNING), ("refused", logging.WARNING), ("failed", logging.WARNING),
     ("no-candidate", logging.WARNING), ("dry-run", logging.INFO), ("abandoned", logging.INFO)],
)  # fmt: skip
def test_a_decision_is_a_warning_when_it_did_something_or_could_not(
    caplog: pytest.LogCaptureFixture, outcome: str, level: int
) -> None:
    with caplog.at_level(logging.DEBUG, "reapkit"):
        log_record(_record(outcome))
    assert [r.levelno for r in caplog.records] == [level]


# -- the daemon, as systemd runs it --------------------------------------------------------------


def _deciding_policy(path: Path, cgroup: SandboxCgroup) -> Path:
    path.write_text(
        f'[[rule]]\nname = "sandbox"\ncgroup = "{cgroup.directory}"\n'
        f'when = ["cgroup_usage > 0%"]\nscope = {{ cgroup = "{cgroup.directory}" }}\n'
        'select = ["largest-rss"]\nactions = ["kill"]\ncooldown = "1h"\n'
    )
    return path


def _run_until(
    commands: list[subprocess.Popen[str]], argv: list[str], needle: str, env: dict[str, str]
) -> list[str]:
    """Start ``reapkit ARGV`` with stderr on a pipe whose device and inode ``env`` may name;
    the lines up to the first containing ``needle``."""
    read, write = os.pipe()
    st = os.fstat(write)
    stream = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"} if env.pop("journal", "") else {}
    p = subprocess.Popen(
        [sys.executable, "-m", "reapkit.cli", *argv], stdout=subprocess.DEVNULL, stderr=write,
        env={**os.environ, **env, **stream}, text=True,
    )  # fmt: skip
    commands.append(p)
    os.close(write)
    lines: list[str] = []
    with os.fdopen(read) as stderr:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(needle in line for line in lines):
            line = stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
        p.terminate()
        assert p.wait(10) == 0
    assert any(needle in line for line in lines), lines
    return lines


def test_the_daemon_under_journald(
    commands: list[subprocess.Popen[str]], spawn: Spawn, memory_cgroup: SandboxCgroup,
    tmp_path: Path,
) -> None:  # fmt: skip
    spawn(cgroups=[memory_cgroup])
    policy = _deciding_policy(tmp_path / "p.toml", memory_cgroup)
    argv = ["run", str(policy), "--dry-run"]
    lines = _run_until(commands, argv, "rule sandbox: dry-run", {"journal": "1"})
    assert lines[0].startswith("<6>reapkit INFO: policy: ")
    assert all(re.match(r"<[2-7]>reapkit", line) for line in lines), lines
    assert "<6>reapkit INFO: rule sandbox: dry-run 'sleep'" in lines[-1]
    assert not any("kill record" in line for line in lines)  # the full record is DEBUG
    plain = _run_until(commands, argv, "rule sandbox: dry-run", {})
    assert re.match(r"\d{4}-\d\d-\d\d .* reapkit INFO: policy: ", plain[0])


def test_the_daemon_in_json(
    commands: list[subprocess.Popen[str]], spawn: Spawn, memory_cgroup: SandboxCgroup,
    tmp_path: Path,
) -> None:  # fmt: skip
    victim = spawn(cgroups=[memory_cgroup])
    policy = _deciding_policy(tmp_path / "p.toml", memory_cgroup)
    argv = ["-v", "run", str(policy), "--dry-run", "--log-format", "json"]
    lines = [json.loads(line) for line in _run_until(commands, argv, "rule sandbox: dry-run", {})]
    assert not any("{" in line["message"] for line in lines)  # no JSON inside a message
    full, summary = [line for line in lines if "record" in line]
    assert (full["level"], full["message"]) == ("debug", "kill record: rule sandbox, dry-run")
    assert summary["level"] == "info"
    assert summary["message"].startswith(f"rule sandbox: dry-run 'sleep' (pid {victim.pid})")
    assert summary["record"] == full["record"]
    assert summary["record"]["victim"]["pid"] == victim.pid
    assert summary["record"]["outcome"] == "dry-run"

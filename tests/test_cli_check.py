"""``reapkit check``: what the guard refused, counts that agree, the file's own dry_run,
``--json``; and which policy ``run``, ``check`` and ``top`` read when none is named (a
temporary root stands for ``/``: nothing here touches the real ``/etc``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reapkit import PolicyError
from reapkit.cli import _common, _main
from reapkit.testing import SandboxCgroup

from .conftest import Spawn
from .test_docs import _table
from .test_run import _start, _wait_for_line

RULE = '[[rule]]\nname = "r"\nscope = "system"\nactions = ["kill"]\n'


def _check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reapkit.cli", "check", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _sandbox_policy(path: Path, cgroup: SandboxCgroup) -> Path:
    path.write_text(
        f'[[rule]]\nname = "sandbox"\nscope = {{ cgroup = "{cgroup.directory}" }}\n'
        'select = ["largest-rss"]\nactions = ["kill"]\n'
    )
    return path


def test_check_now_names_what_the_guard_refused(
    spawn: Spawn, memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    # `reapkit check` runs inside the rule's own scope, where it is the largest process: the
    # guard refuses it (reaper-itself) and the rule takes the next one, and check says so.
    victim = spawn(["sleep", "600"], cgroups=[memory_cgroup])
    policy = str(_sandbox_policy(tmp_path / "policy.toml", memory_cgroup))
    argv = [sys.executable, "-m", "reapkit.cli", "check", policy, "--now"]
    outputs = []
    for extra in ([], ["--json"]):
        check = spawn(
            [*argv, *extra], cgroups=[memory_cgroup], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = check.communicate(timeout=120)
        assert check.returncode == 0, err
        outputs.append((check.pid, out))
    assert victim.poll() is None
    (checker, text), (json_checker, dumped) = outputs
    line = next(line for line in text.splitlines() if "sandbox: would choose" in line)
    assert f"'sleep' (pid {victim.pid}," in line
    assert "ranked 2 of 2 (2 in scope): RSS" in line and "(#2 of 2)" in line  # counts agree
    assert f"    guard refused 1: {checker}: reaper-itself" in text.splitlines()
    (now,) = json.loads(dumped)["now"]
    assert now["chosen"]["pid"] == victim.pid and now["chosen"]["comm"] == "sleep"
    assert (now["place"], now["ranked"], now["in_scope"], now["refused"]) == (2, 2, 2, 1)
    assert now["notes"] == [f"guard refused 1: {json_checker}: reaper-itself"]


@pytest.mark.parametrize("in_file", [True, False])
def test_check_says_what_the_file_says_about_dry_run(tmp_path: Path, in_file: bool) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(("[reaper]\ndry_run = true\n" if in_file else "") + RULE)
    done = _check(str(path))
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    if in_file:
        assert first.startswith(f"{path}: valid (dry_run = true")
    else:
        assert first == f"{path}: valid"  # check loads it in dry-run; the file does not say so
    assert json.loads(_check(str(path), "--json").stdout)["dry_run"] is in_file


def test_check_json_has_the_documented_keys(tmp_path: Path) -> None:
    rows = {row["key"]: row["what"] for row in _table("operations.md", "check-json")}
    path = tmp_path / "policy.toml"
    path.write_text(RULE)
    done = _check(str(path), "--json", "--now")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == set(rows)
    assert (data["version"], data["policy"], data["valid"]) == (1, str(path), True)
    assert (data["error"], data["found"]) == (None, "named on the command line")
    (rule,) = data["rules"]
    assert set(rule) == set(re.findall(r"`(\w+)`", rows["rules"])) - {"options"}
    assert rule["select"] == [{"name": "oom-score", "options": {}}]
    (now,) = data["now"]
    assert set(now) | set(now["chosen"]) == set(re.findall(r"`(\w+)`", rows["now"])) - {"null"}
    assert json.loads(_check(str(path), "--json").stdout)["now"] is None


def test_check_json_of_an_invalid_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(RULE + 'cooldown = "soon"\n')
    done = _check(str(path), "--json")
    assert done.returncode == 2
    data = json.loads(done.stdout)
    assert set(data) == {"version", "policy", "found", "valid", "error"}
    assert data["valid"] is False and "rule[0].cooldown" in data["error"]
    assert done.stderr.startswith("reapkit check: invalid policy: ")


# -- which policy --------------------------------------------------------------------------------


def test_choose_policy_in_order(tmp_path: Path) -> None:
    system = tmp_path / "etc" / "reapkit" / "policy.toml"
    root = str(tmp_path)

    def choose(named: str | None = None, **env: str) -> str | None:
        return _common.choose_policy(named, root=root, environ=env).path

    assert choose() is None  # nothing anywhere: the embedded default
    system.parent.mkdir(parents=True)
    system.symlink_to(tmp_path / "missing.toml")  # a dangling link is not skipped: it errs
    assert choose() == str(system)
    system.unlink()
    system.write_text(RULE)
    assert choose() == str(system)
    assert choose(REAPKIT_POLICY="") == str(system)  # empty: unset
    assert choose(REAPKIT_POLICY="/srv/p.toml") == "/srv/p.toml"
    assert choose("/x.toml", REAPKIT_POLICY="/srv/p.toml") == "/x.toml"
    why = _common.choose_policy(None, root=root, environ={}).why
    assert why == f"no policy named, $REAPKIT_POLICY unset; {system} exists"


def test_check_without_a_policy_reads_the_system_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_common, "ROOT", str(tmp_path))
    monkeypatch.delenv("REAPKIT_POLICY", raising=False)

    def check() -> int:  # the command without main(): it would install signal handlers here
        args = _main._build_parser("check").parse_args(["check"])
        status: int = args.run(args)
        return status

    assert check() == 0
    out = capsys.readouterr().out
    assert out.startswith("<default policy>: valid\n")
    assert f"no {tmp_path}/etc/reapkit/policy.toml" in out.splitlines()[1]
    system = tmp_path / "etc" / "reapkit" / "policy.toml"
    system.parent.mkdir(parents=True)
    system.write_text(RULE.replace('"r"', '"from-etc"'))
    assert check() == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{system}: valid\n") and "rule 'from-etc'" in out
    monkeypatch.setenv("REAPKIT_POLICY", str(tmp_path / "nothing.toml"))
    with pytest.raises(PolicyError, match=r"nothing\.toml: cannot .*No such file"):
        check()  # main() makes it one line and exit status 2


def test_run_says_which_policy_in_its_first_line(
    commands: list[subprocess.Popen[str]], memory_cgroup: SandboxCgroup, tmp_path: Path
) -> None:
    policy = _sandbox_policy(tmp_path / "policy.toml", memory_cgroup)
    p = _start(commands, "--dry-run", env={"REAPKIT_POLICY": str(policy)})
    lines = _wait_for_line(p, "running:")
    assert lines[0].rstrip().endswith(f"policy: {policy} (from $REAPKIT_POLICY)"), lines
    assert f"of {policy} (dry-run): sandbox" in lines[-1]

"""What the user sees when a feature is missing (no real kernel needed)."""

from __future__ import annotations

import argparse

import pytest

from reapkit import Unsupported
from reapkit.cli import _doctor
from reapkit.lowlevel import CgroupMount, Check, Probe
from reapkit.testing import SandboxCgroup


def _probe(*checks: Check) -> Probe:
    return Probe(
        kernel="5.10.0",
        pidfd=False,
        process_mrelease=False,
        psi_files=(),
        psi_triggers=False,
        psi_unprivileged_only=False,
        proc_connector=False,
        cgroup_v1_controllers=(),
        cgroup_v2_controllers=("memory",),
        cgroup_v2_mountpoint="/sys/fs/cgroup",
        capabilities={"CAP_KILL": True},
        checks=checks,
    )


def test_doctor_names_what_is_missing_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _probe(
        Check(
            "pidfd", False, "pidfd_open failed: Function not implemented (needs Linux 5.3)", True
        ),
        Check("process_mrelease", False, "missing (needs Linux 5.15)"),
    )
    monkeypatch.setattr(_doctor, "probe", lambda: result)
    assert _doctor.run(argparse.Namespace(json=False)) == 1
    out = capsys.readouterr().out
    assert "pidfd             MISSING" in out
    assert "cannot work here: missing pidfd." in out
    assert result.as_json()["missing"] == ["pidfd"]


def test_optional_features_missing_still_exit_0(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _probe(Check("pidfd", True, "ok", True), Check("psi_triggers", False, "no PSI"))
    monkeypatch.setattr(_doctor, "probe", lambda: result)
    assert _doctor.run(argparse.Namespace(json=True)) == 0


def test_no_v1_freezer_names_it() -> None:
    v2_only = [CgroupMount("/sys/fs/cgroup", 2, ("memory", "pids"))]
    with pytest.raises(Unsupported, match="cgroup v1 freezer") as info:
        SandboxCgroup.create("freezer", mounts=v2_only)
    assert "state D" in str(info.value)


def test_missing_controller_names_it() -> None:
    with pytest.raises(Unsupported, match="cgroup memory controller"):
        SandboxCgroup.create("memory", mounts=[CgroupMount("/sys/fs/cgroup/cpu", 1, ("cpu",))])


def test_a_single_wrapped_cause_is_reported_as_itself(capsys: pytest.CaptureFixture[str]) -> None:
    from reapkit.cli._main import _report, _single_cause

    wrapped = ExceptionGroup("nursery", [ExceptionGroup("inner", [Unsupported("PSI", "gone")])])
    assert _report(_single_cause(wrapped), "reapkit run", verbose=False) == 3
    assert capsys.readouterr().err == "reapkit run: PSI is not available: gone\n"
    two = ExceptionGroup("nursery", [ValueError("a"), ValueError("b")])
    assert _report(_single_cause(two), "reapkit run", verbose=False) == 1

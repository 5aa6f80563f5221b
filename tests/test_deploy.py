"""The deployment files under ``examples/deploy/``: the systemd unit and the Kubernetes DaemonSet.

The unit is checked by ``systemd-analyze verify`` where systemd is installed (Debian's
``systemd`` package), and always by a parser for the directives the issue requires. The
manifest is read as YAML; its policy must load, and the command lines of both must parse with
the real ``reapkit`` argument parser.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from reapkit._heartbeat import HEARTBEAT_EVERY
from reapkit._policy import load_policy
from reapkit.builtin.selectors import Protect
from reapkit.cli._main import _build_parser
from reapkit.cli._status import UsageError

DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy"
UNIT = DEPLOY / "reapkit.service"
MANIFEST = DEPLOY / "kubernetes" / "daemonset.yaml"

#: The capabilities each deployment grants, and nothing else (README.md says why).
UNIT_CAPABILITIES = {"CAP_KILL", "CAP_IPC_LOCK", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN"}
POD_CAPABILITIES = {"KILL", "IPC_LOCK", "SYS_RESOURCE"}


# -- the systemd unit ----------------------------------------------------------------------------


class _MultiDict(dict[str, Any]):
    """configparser's option store that keeps every assignment of a repeated key (systemd
    allows ``ExecReload=`` or ``SystemCallFilter=`` several times; configparser keeps one)."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [value, ...]}}`` in file order. An empty assignment resets the list,
    as in systemd (``ExecStart=`` before a new ``ExecStart=``)."""
    parser = configparser.RawConfigParser(
        strict=False,
        dict_type=_MultiDict,
        empty_lines_in_values=False,
        interpolation=None,
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=None,
        delimiters=("=",),
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    result: dict[str, dict[str, list[str]]] = {}
    for section in parser.sections():
        entries: dict[str, list[str]] = {}
        for key, joined in parser.items(section):
            values: list[str] = []
            for value in joined.split("\n"):
                if value.strip():
                    values.append(value.strip())
                else:
                    values.clear()
            entries[key] = values
        result[section] = entries
    return result


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def service(unit: dict[str, dict[str, list[str]]], key: str) -> list[str]:
    return unit["Service"].get(key, [])


def one(unit: dict[str, dict[str, list[str]]], key: str) -> str:
    values = service(unit, key)
    assert len(values) == 1, f"{key}= should be set once, not {values}"
    return values[0]


def test_the_parser_keeps_repeated_keys_and_resets() -> None:
    parsed = parse_unit("[Service]\nExecStart=/a\nExecStart=\nExecStart=/b\nX=1\nX=2\n")
    assert parsed["Service"] == {"ExecStart": ["/b"], "X": ["1", "2"]}


def test_unit_lifecycle(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert re.fullmatch(r"[1-9]\d*(s|min)?", one(unit, "WatchdogSec"))
    assert one(unit, "Restart") == "on-failure"
    assert "2" in one(unit, "RestartPreventExitStatus").split()
    reload_lines = [shlex.split(line) for line in service(unit, "ExecReload")]
    assert ["/bin/kill", "-HUP", "$MAINPID"] in reload_lines
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_protects_the_reaper_from_memory_pressure(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    assert one(unit, "OOMScoreAdjust") == "-1000"
    assert re.fullmatch(r"\d+[KMG]", one(unit, "MemoryMax"))
    assert re.fullmatch(r"\d+[KMG]", one(unit, "MemoryLow"))
    # A hook killed by the OOM killer must not stop the reaper (the default OOMPolicy=stop).
    assert one(unit, "OOMPolicy") == "continue"


def test_unit_grants_only_the_needed_capabilities(unit: dict[str, dict[str, list[str]]]) -> None:
    caps = set(one(unit, "CapabilityBoundingSet").split())
    assert caps == UNIT_CAPABILITIES
    assert "CAP_SYS_ADMIN" not in caps
    assert not service(unit, "AmbientCapabilities")  # root: the bounding set is enough
    assert one(unit, "NoNewPrivileges") == "yes"


def test_unit_sandbox(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "ProtectHome") == "yes"
    assert one(unit, "PrivateTmp") == "yes"
    assert one(unit, "ProtectKernelTunables") == "yes"
    assert one(unit, "ProtectKernelModules") == "yes"
    # It writes cgroup.kill and cgroup pressure triggers: /sys/fs/cgroup must stay writable.
    assert one(unit, "ProtectControlGroups") == "no"
    writable = one(unit, "ReadWritePaths").split()
    assert "/sys/fs/cgroup" in writable and "-/proc/pressure" in writable
    # It must see every process, /proc/meminfo and /proc/pressure.
    assert one(unit, "ProtectProc") == "default"
    assert one(unit, "ProcSubset") == "all"
    # The proc connector lives in the initial network namespace: no PrivateNetwork=.
    assert service(unit, "PrivateNetwork") in ([], ["no"])
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_NETLINK"}
    assert one(unit, "LockPersonality") == "yes"
    assert one(unit, "MemoryDenyWriteExecute") == "yes"
    assert one(unit, "RestrictRealtime") == "yes"


def test_unit_syscall_filter_allows_process_mrelease(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    filters = service(unit, "SystemCallFilter")
    allowed = [f.split() for f in filters if not f.startswith("~")]
    denied = [f.lstrip("~").split() for f in filters if f.startswith("~")]
    assert allowed, "an allow-list, not only a deny-list"
    assert {"@system-service", "process_mrelease", "pidfd_open", "pidfd_send_signal"} <= {
        name for line in allowed for name in line
    }
    assert not any("process_mrelease" in line for line in denied)
    assert one(unit, "SystemCallArchitectures") == "native"
    assert one(unit, "SystemCallErrorNumber") == "EPERM"


def _fake_install(tmp_path: Path) -> Path:
    """A copy of the unit whose ``reapkit`` is an executable that exists (verify looks a bare
    name up in systemd's own search path, where this checkout's is not)."""
    binary = tmp_path / "bin" / "reapkit"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n", encoding="ascii")
    binary.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    text, found = re.subn(r"^(Exec\w+=)reapkit ", rf"\g<1>{binary} ", text, flags=re.MULTILINE)
    assert found == 2, "ExecStart= and ExecReload= name reapkit"
    copy = tmp_path / "units" / UNIT.name
    copy.parent.mkdir()
    copy.write_text(text, encoding="utf-8")
    return copy


def _verify(unit_file: Path) -> tuple[int, list[str]]:
    """``systemd-analyze verify``: its exit status and every output line about this unit."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0"}
    done = subprocess.run(
        [tool, "verify", "--man=no", str(unit_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    # Complaints name the unit ("reapkit.service: ...") or the file ("/tmp/.../x:12: ...").
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in lines if unit_file.stem in line]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    returncode, complaints = _verify(_fake_install(tmp_path))
    assert complaints == []
    assert returncode == 0


def test_systemd_analyze_verify_would_catch_mistakes(tmp_path: Path) -> None:
    # The check above is only as good as verify's reporting on this systemd: prove it speaks up.
    copy = _fake_install(tmp_path)
    text = copy.read_text(encoding="utf-8")
    broken = text.replace("[Service]\n", "[Service]\nWatchdogSecs=30s\nMemoryMax=lots\n", 1)
    allow = "SystemCallFilter=@system-service process_mrelease"
    assert allow in broken
    broken = broken.replace(allow, allow.replace("mrelease", "mreleese"))
    copy.write_text(broken, encoding="utf-8")
    _, complaints = _verify(copy)
    report = "\n".join(complaints)
    assert "WatchdogSecs" in report
    assert "lots" in report
    assert "process_mreleese" in report


# -- the Kubernetes manifest ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]
    assert all(isinstance(d, dict) and "kind" in d and "apiVersion" in d for d in docs)
    return docs


def find(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [o for o in objects if o["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


@pytest.fixture(scope="module")
def daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "DaemonSet")


@pytest.fixture(scope="module")
def pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


@pytest.fixture(scope="module")
def policy_text(objects: list[dict[str, Any]]) -> str:
    text: str = find(objects, "ConfigMap")["data"]["policy.toml"]
    return text


def test_manifest_objects_live_in_the_reapkit_namespace(objects: list[dict[str, Any]]) -> None:
    namespace = find(objects, "Namespace")
    assert namespace["metadata"]["name"] == "reapkit"
    # hostPID, hostPath and IPC_LOCK/SYS_RESOURCE are all outside Pod Security "baseline".
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "reapkit", obj["kind"]


def test_daemonset_basics(daemonset: dict[str, Any], pod: dict[str, Any]) -> None:
    assert daemonset["apiVersion"] == "apps/v1"
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["hostPID"] is True
    # Documented choice: the pod's own network namespace (no proc connector, no NET_ADMIN).
    assert pod.get("hostNetwork", False) is False
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["automountServiceAccountToken"] is False
    # Every node, whatever its taints: a toleration with no key and operator Exists.
    assert {"operator": "Exists"} in pod["tolerations"]


def test_daemonset_security_context(container: dict[str, Any]) -> None:
    sc = container["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == POD_CAPABILITIES
    assert len(sc["capabilities"]["add"]) == len(POD_CAPABILITIES)
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_daemonset_is_guaranteed_qos(container: dict[str, Any]) -> None:
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    assert set(resources["limits"]) == {"cpu", "memory"}


def _mounts(
    pod: dict[str, Any], container: dict[str, Any]
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        yield mount, volumes[mount["name"]]


def test_daemonset_mounts(pod: dict[str, Any], container: dict[str, Any]) -> None:
    by_path = {m["mountPath"]: (m, v) for m, v in _mounts(pod, container)}
    mount, volume = by_path["/sys/fs/cgroup"]
    assert volume["hostPath"]["path"] == "/sys/fs/cgroup"
    assert not mount.get("readOnly", False)  # cgroup.kill, pressure triggers
    # /proc is the container's procfs of the host PID namespace: no hostPath for it.
    assert "/proc" not in by_path
    mount, volume = by_path["/etc/reapkit"]
    assert mount["readOnly"] is True
    assert "subPath" not in mount  # ConfigMap edits must reach the file
    assert volume["configMap"]["name"] == "reapkit-policy"
    command = container["command"]
    records = command[command.index("--records") + 1]
    assert os.path.dirname(records) in by_path
    assert "/etc/reapkit/policy.toml" in command


def test_daemonset_scrape_annotations_and_probe(
    daemonset: dict[str, Any], container: dict[str, Any]
) -> None:
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    port = annotations["prometheus.io/port"]
    assert port in {str(p["containerPort"]) for p in container["ports"]}
    # The API server rejects non-string annotation and env values.
    assert all(isinstance(v, str) for v in annotations.values())
    assert all(isinstance(e["value"], str) for e in container.get("env", []))
    probe = container["livenessProbe"]
    assert probe["exec"]["command"][:2] == ["reapkit", "probe"]
    assert probe["timeoutSeconds"] < probe["periodSeconds"]


# -- the policy and the command lines ------------------------------------------------------------


def test_the_configmap_policy_loads(policy_text: str) -> None:
    policy = load_policy(text=policy_text, dry_run=True)
    assert policy.rules
    assert all(rule.guard.scope.describe() == "the whole system" for rule in policy.rules)


def test_the_configmap_policy_passes_reapkit_check(policy_text: str, tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(policy_text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "reapkit.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout


@pytest.mark.parametrize(
    ("path", "protected"),
    [
        ("/kubepods.slice/kubepods-pod1a2b.slice/cri-containerd-9f.scope", True),
        # Seen from the reaper's own cgroup namespace, as every pod path is:
        ("/../../kubepods.slice/kubepods-pod1a2b.slice/cri-containerd-9f.scope", True),
        ("/kubepods/pod1a2b/9f", True),
        ("/system.slice/kubelet.service", True),
        ("/../../../system.slice/containerd.service", True),
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a.slice/c.scope", False),
        ("/../../kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice", False),
        ("/kubepods/burstable/pod1a2b/9f", False),
        ("/user.slice/user-1000.slice/session-3.scope", False),
    ],
)
def test_the_configmap_policy_protects_guaranteed_pods_and_host_services(
    policy_text: str, path: str, protected: bool
) -> None:
    rule = load_policy(text=policy_text, dry_run=True).rules[0]
    [protect] = [s for s in rule.selectors if isinstance(s, Protect)]
    matched = any(re.search(pattern, path) for pattern in protect.options.cgroup)
    assert matched is protected


def _parse_cli(argv: list[str]) -> Any:
    assert Path(argv[0]).name == "reapkit", argv
    try:
        return _build_parser().parse_args(argv[1:])
    except UsageError as exc:
        pytest.fail(f"{shlex.join(argv)}: {exc}")


def test_the_unit_finds_reapkit_where_pip_puts_it(unit: dict[str, dict[str, list[str]]]) -> None:
    # /usr/bin/reapkit failed with 203/EXEC after `pip install` (which writes /usr/local/bin):
    # a bare name is looked up in systemd's search path, /usr/local/bin and /usr/bin among it.
    commands = [shlex.split(line)[0] for line in service(unit, "ExecStart")]
    commands += [shlex.split(line)[0] for line in service(unit, "ExecReload")]
    assert [c for c in commands if c.endswith("reapkit")] == ["reapkit", "reapkit"]
    assert "/opt/reapkit/bin/reapkit" in UNIT.read_text(encoding="utf-8")  # the venv's way


def test_the_command_lines_parse(
    unit: dict[str, dict[str, list[str]]], container: dict[str, Any]
) -> None:
    start = _parse_cli(shlex.split(one(unit, "ExecStart")))
    assert (start.command, start.policy) == ("run", "/etc/reapkit/policy.toml")
    assert start.records and start.records.startswith("/var/log/reapkit/")
    assert "LogsDirectory" in unit["Service"]
    reload_lines = [shlex.split(line) for line in service(unit, "ExecReload")]
    check = _parse_cli(next(argv for argv in reload_lines if argv[0].endswith("reapkit")))
    assert (check.command, check.policy) == ("check", "/etc/reapkit/policy.toml")
    pod_run = _parse_cli(container["command"])
    assert (pod_run.command, pod_run.log_format) == ("run", "json")
    # The probe reads the heartbeat the daemon writes, on a writable mount, and allows more
    # than a few beats (every HEARTBEAT_EVERY s) to be late: a stuck loop, not a slow one.
    probe = _parse_cli(container["livenessProbe"]["exec"]["command"])
    assert (probe.command, probe.heartbeat) == ("probe", pod_run.heartbeat)
    assert probe.max_age >= 3 * HEARTBEAT_EVERY
    mounts = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert str(Path(pod_run.heartbeat).parent) in mounts

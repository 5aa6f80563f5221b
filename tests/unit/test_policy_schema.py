"""The policy's tables are the attrs classes they fill, and parsing is apart from the host: a
policy parses off-host (:func:`reapkit._policy.parse_policy`) with nothing looked up, and
``load_policy`` (what ``run`` and ``check`` both call) adds the host's lookups and checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from reapkit._engine import Rule
from reapkit._guard import KillGuard
from reapkit._policy import _RULE, DEFAULT_POLICY, PolicyError, load_policy, parse_policy
from reapkit._reap_stage import ReapSettings

POLICIES = Path(__file__).resolve().parents[2] / "examples" / "policies"

RULE = """
[[rule]]
name = "test"
when = ["memory some 500ms/1s"]
scope = "system"
actions = ["kill"]
"""

# Parses every example and the embedded default with each way of looking at the host shut:
# /proc and /sys (open, listdir, scandir, stat, readlink, access), the open-file limit and
# the CPU affinity. Then shows that the shutters work: load_policy, on the host, trips them.
_OFF_HOST = """
import json, os, resource, sys
from pathlib import Path
from reapkit._policy import DEFAULT_POLICY, load_policy, parse_policy

texts = {"<default policy>": DEFAULT_POLICY}
texts |= {p.name: p.read_text() for p in sorted(Path(sys.argv[1]).glob("*.toml"))}
parse_policy(DEFAULT_POLICY)  # plugins imported and registered before the shutters close

class Touched(BaseException):  # not an Exception: no handler on the way may take it
    pass

def shut(path):
    path = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else ""
    if path.startswith(("/proc", "/sys")):
        raise Touched(path)

def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
        shut(args[0])

def guarded(call):
    def wrapper(path, *args, **kwargs):
        shut(path)
        return call(path, *args, **kwargs)
    return wrapper

def refused(name):
    def wrapper(*args, **kwargs):
        raise Touched(name)
    return wrapper

sys.addaudithook(hook)
for name in ("stat", "lstat", "readlink", "access"):
    setattr(os, name, guarded(getattr(os, name)))
resource.getrlimit = refused("getrlimit")
os.sched_getaffinity = refused("sched_getaffinity")

parsed = {}
for name, text in texts.items():
    policy = parse_policy(text, source=name)
    parsed[name] = [rule.name for rule in policy.rules]
try:
    load_policy(text=DEFAULT_POLICY)
except Touched as exc:
    tripped = str(exc)
else:
    tripped = None
print(json.dumps({"parsed": parsed, "tripped": tripped}))
"""


def test_every_example_and_the_default_parse_without_touching_the_host() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _OFF_HOST, str(POLICIES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    examples = sorted(p.name for p in POLICIES.glob("*.toml"))
    assert len(examples) >= 6
    assert sorted(result["parsed"]) == sorted(["<default policy>", *examples])
    for name, rules in result["parsed"].items():
        text = DEFAULT_POLICY if name == "<default policy>" else (POLICIES / name).read_text()
        assert rules == [r.name for r in parse_policy(text).rules], name
        assert rules, name
    # Not a vacuous pass: loading on the host looks at /proc (or a limit) at once.
    assert result["tripped"], result


@pytest.mark.parametrize(
    ("head", "scope", "key", "message"),
    [
        ("[reaper]\nkeep_score_files = 1_048_576\n", '"system"', "reaper.keep_score_files", "RLIMIT_NOFILE"),  # noqa: E501
        ("[reaper.reap]\ncpus = [4096]\n", '"system"', "reaper.reap.cpus", "CPU 4096 not available"),  # noqa: E501
        ("", '{ cgroup = "/nonexistent/cgroup" }', "rule[0].scope.cgroup", "no such directory"),
        ("", "{ subtree = 2147483647 }", "rule[0].scope.subtree", "does not exist"),
    ],
)  # fmt: skip
def test_what_only_the_host_can_refuse_parses_off_host(
    head: str, scope: str, key: str, message: str
) -> None:
    text = head + RULE.replace('"system"', scope).replace("500ms/1s", "500ms/2s")
    policy = parse_policy(text)
    assert policy.rules[0].name == "test"
    with pytest.raises(PolicyError) as info:
        load_policy(text=text)
    assert info.value.key == key and message in str(info.value)


@pytest.mark.parametrize(
    ("when", "extra", "message"),
    [
        ("memory some 500ms/2s", 'pressure_cgroup = "/nonexistent/cg"', "/nonexistent/cg/memory.pressure does not exist (pressure files are cgroup v2 only)"),  # noqa: E501
        ("cgroup_usage > 90%", 'cgroup = "/nonexistent/cg"', "cgroup_usage: the cgroup /nonexistent/cg does not exist"),  # noqa: E501
    ],
)  # fmt: skip
def test_the_cgroups_a_condition_reads_are_looked_for_on_the_host(
    when: str, extra: str, message: str
) -> None:
    text = RULE.replace("memory some 500ms/1s", when) + extra + "\n"
    assert parse_policy(text).rules[0].when
    with pytest.raises(PolicyError) as info:
        load_policy(text=text)
    assert info.value.key == "rule[0].when[0]" and message in str(info.value)


def test_a_psi_window_is_checked_against_the_hosts_capabilities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        "reapkit._policy.effective_capabilities", lambda: {"CAP_SYS_RESOURCE": False}
    )
    assert parse_policy(RULE).rules[0].when
    with pytest.raises(PolicyError, match="multiple of 2s") as info:
        load_policy(text=RULE)
    assert info.value.key == "rule[0].when[0]"
    with pytest.raises(PolicyError, match="multiple of 2s") as info:
        load_policy(text=RULE.replace("1s", "2s"), when=["memory some 500ms/1s"])
    assert info.value.key == "when (override)"


def test_scopes_parsed_off_host_hold_no_process() -> None:
    text = RULE.replace('"system"', '{ cgroup = "/sys/fs/cgroup/memory/x" }')
    guard = parse_policy(text).rules[0].guard
    assert guard.scope.describe() == "cgroup /sys/fs/cgroup/memory/x (not looked up)"
    assert guard.scope.excludes(1, guard.procfs) is not None
    assert not guard.signals_enabled


def test_the_rule_table_is_the_rule_and_its_guard() -> None:
    rule_keys = {f.name for f in attrs.fields(Rule)} - {"guard", "selectors"} | {"select"}
    guard_keys = {f.name for f in attrs.fields(KillGuard) if f.init} - {"dry_run", "procfs"}
    assert _RULE.keys == rule_keys | guard_keys | {"pressure_cgroup"}
    rule = parse_policy(RULE).rules[0]
    for field in attrs.fields(Rule):
        if field.default is not attrs.NOTHING:  # left out of the file: the class's default
            assert getattr(rule, field.name) == field.default, field.name
    assert [s.name for s in rule.selectors] == ["oom-score"]  # the file's own default
    assert parse_policy(RULE).reap == ReapSettings()


@pytest.mark.parametrize(
    ("head", "key", "message"),
    [
        # A validator that finds a default at fault names the defaulted key.
        ('[reaper.reap]\npolicy = "fifo"\n', "reaper.reap.priority", "within 1..99"),
        ("[reaper.reap]\nthreads = true\n", "reaper.reap.threads", "within 1..64"),
        ("[reaper]\ndry_run = 1\n", "reaper.dry_run", "expected bool, not 1"),
        ("[reaper]\nreap = 3\n", "reaper.reap", "expected a table"),
    ],
)
def test_converters_and_validators_speak_at_their_key(head: str, key: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(head + RULE)
    assert info.value.key == key and message in str(info.value)


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        (('name = "test"\n', ""), "rule[0].name", "missing: every [[rule]] needs one"),
        (('name = "test"', "name = 5"), "rule[0].name", "expected str, not 5"),
        (('actions = ["kill"]', "actions = []"), "rule[0].actions", "at least one action"),
        (('actions = ["kill"]', 'max_kills = true\nactions = ["kill"]'), "rule[0].max_kills", "an integer, at least 1"),  # noqa: E501
        (('scope = "system"', 'scope = { subtree = 0 }'), "rule[0].scope.subtree", "expected a process id"),  # noqa: E501
        (('scope = "system"', 'scope = "system"\ncgroup = 1'), "rule[0].cgroup", "expected str"),
    ],
)  # fmt: skip
def test_rule_values_speak_at_their_key(change: tuple[str, str], key: str, message: str) -> None:
    assert change[0] in RULE
    with pytest.raises(PolicyError) as info:
        parse_policy(RULE.replace(change[0], change[1]))
    assert info.value.key == key and message in str(info.value)

"""What ``check`` accepts, ``run`` runs: every value is validated when the policy loads, and any
input at all — bytes, TOML — gives a :class:`PolicyError` naming the file (and key), never
another exception (issue 11)."""

from __future__ import annotations

import math
import os
import pwd
import re
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reapkit._accounts import may_execute
from reapkit._plugins import Candidate, Ranked, Situation
from reapkit._policy import DEFAULT_POLICY, PolicyError, load_policy
from reapkit._procfs import ProcFS
from reapkit.builtin.selectors import Protect
from reapkit.testing import FakeProc

RULE = """
[[rule]]
name = "test"
when = ["mem_available < 5%"]
scope = "system"
select = [{ name = "protect", comm = ["^sshd$"] }, "oom-score"]
actions = [ACTIONS]
EXTRA
"""


def _load(tmp_path: Path, *, actions: str = '"kill"', extra: str = "", head: str = "") -> Any:
    path = tmp_path / "policy.toml"
    path.write_text(head + RULE.replace("ACTIONS", actions).replace("EXTRA", extra))
    return load_policy(path)


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ("plugin_deadline = nan", "rule[0].plugin_deadline", "finite"),
        ("victim_timeout = nan", "rule[0].victim_timeout", "finite"),
        ("action_deadline = nan", "rule[0].action_deadline", "finite"),
        ("cooldown = -5", "rule[0].cooldown", "not negative"),
        ("cooldown = inf", "rule[0].cooldown", "finite"),
        ("kill_window = -inf", "rule[0].kill_window", "finite"),
        ("victim_timeout = 1e400", "rule[0].victim_timeout", "finite"),
        (f'victim_timeout = "{"9" * 400}s"', "rule[0].victim_timeout", "finite"),
        ("plugin_deadline = 0", "rule[0].plugin_deadline", "seconds above 0, not 0.0"),
        (f"cooldown = {'9' * 18}", "rule[0].cooldown", ""),
    ],
)
def test_durations_are_finite_and_positive(
    tmp_path: Path, extra: str, key: str, message: str
) -> None:
    if extra.startswith("cooldown = 9"):  # huge but finite: fine
        assert _load(tmp_path, extra=extra).rules[0].cooldown == 1e18
        return
    with pytest.raises(PolicyError) as info:
        _load(tmp_path, extra=extra)
    assert info.value.key == key and message in str(info.value)


@pytest.mark.parametrize(
    ("actions", "extra", "key", "message"),
    [
        (
            '{ name = "terminate", grace = "60s" }',
            'action_deadline = "3s"',
            "rule[0].actions[0].grace",
            "terminate's grace of 60s does not fit in the rule's action_deadline of 3s"
            " (over by 57s",
        ),
        (
            '{ name = "terminate", grace = "45s" }',  # the default deadline is 30 s
            "",
            "rule[0].actions[0].grace",
            "over by 15s",
        ),
        (
            '{ name = "prekill-hook", command = ["/bin/true"], timeout = "10s" }, "kill"',
            'action_deadline = "10s"',
            "rule[0].actions[0].timeout",
            "prekill-hook's timeout of 10s does not fit",
        ),
        (
            '{ name = "prekill-hook", command = ["/bin/true"], user = "nosuchuser" }, "kill"',
            "",
            "rule[0].actions[0].user",
            "no user named 'nosuchuser'",
        ),
        (
            '{ name = "prekill-hook", command = ["/bin/true"], group = "nosuchgroup" }, "kill"',
            "",
            "rule[0].actions[0].group",
            "no group named 'nosuchgroup'",
        ),
        (
            '{ name = "prekill-hook", command = ["/no/such/program"] }, "kill"',
            "",
            "rule[0].actions[0].command",
            "not found",
        ),
        (
            '{ name = "warn", message = "{nosuch}" }, "kill"',
            "",
            "rule[0].actions[0].message",
            "unknown field {nosuch}",
        ),
        (
            '{ name = "warn", message = "{} {0}" }, "kill"',
            "",
            "rule[0].actions[0].message",
            "unknown field {}",
        ),
        (
            '{ name = "warn", message = "{name.__class__}" }, "kill"',
            "",
            "rule[0].actions[0].message",
            "unknown field",
        ),
        (
            '{ name = "warn", message = "{pid:q}" }, "kill"',
            "",
            "rule[0].actions[0].message",
            "cannot be formatted",
        ),
        (
            '{ name = "warn", message = "{name:>999999999}" }, "kill"',
            "",
            "rule[0].actions[0].message",
            "widths up to 256",
        ),
        (
            '{ name = "warn", message = "{name" }, "kill"',
            "",
            "rule[0].actions[0].message",
            "braces",
        ),
    ],
)
def test_actions_are_checked_against_the_rule_and_the_host(
    tmp_path: Path, actions: str, extra: str, key: str, message: str
) -> None:
    with pytest.raises(PolicyError) as info:
        _load(tmp_path, actions=actions, extra=extra)
    assert info.value.key == key, info.value
    assert message in str(info.value)


def test_a_hook_program_must_be_executable_by_the_hooks_user(tmp_path: Path) -> None:
    # Found on PATH and executable by root, but not by nobody: found out when the policy loads.
    program = tmp_path / "hook"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o700)
    hook = f'{{ name = "prekill-hook", command = ["{program}"], user = "nobody" }}, "kill"'
    with pytest.raises(PolicyError, match="not executable by uid 65534") as info:
        _load(tmp_path, actions=hook)
    assert info.value.key == "rule[0].actions[0].command", info.value
    _load(tmp_path, actions=hook.replace(', user = "nobody"', ""))


def test_may_execute_reads_the_mode_bits_for_another_user(tmp_path: Path) -> None:
    gid = pwd.getpwnam("nobody").pw_gid
    top = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        top.chmod(0o755)
        program = top / "p"
        program.write_text("#!/bin/sh\n")
        for mode, gids, expected in ((0o755, (), True), (0o750, (), False), (0o750, (0,), True)):
            program.chmod(mode)
            assert may_execute(str(program), 65534, gids) is expected, oct(mode)
        assert may_execute(str(program), 0, ()) and may_execute("/bin/true", 65534, (gid,))
        top.chmod(0o700)  # a directory above it the user cannot search
        assert not may_execute(str(program), 65534, (0,))
    finally:
        shutil.rmtree(top)


def test_a_hook_run_as_a_user_gets_that_users_groups(tmp_path: Path) -> None:
    hook = '{ name = "prekill-hook", command = ["true"], user = "nobody" }, "kill"'
    options = _load(tmp_path, actions=hook).rules[0].actions[0].options
    nobody = pwd.getpwnam("nobody")
    # Not the daemon's gid 0 and root's groups, which Popen(user=...) alone would keep.
    assert options.credentials() == {
        "user": nobody.pw_uid,
        "group": nobody.pw_gid,
        "extra_groups": os.getgrouplist("nobody", nobody.pw_gid),
    }


def test_good_actions_load_with_names_resolved(tmp_path: Path) -> None:
    actions = (
        '{ name = "warn", message = "ending {name!r:.20} ({pid:>6}, {rss_mib:,} MiB) for {rule}'
        ' {{sic}}" }, { name = "prekill-hook", command = ["true"], user = "nobody",'
        ' group = "root", timeout = "2s" }, { name = "terminate", grace = "2999ms" }'
    )
    policy = _load(tmp_path, actions=actions, extra='action_deadline = "3s"')
    warn, hook, _terminate = policy.rules[0].actions
    assert hook.options.user == 65534 and hook.options.group == 0
    assert "{sic}" in warn.options.message.format(name="x", pid=1, rss_mib=1, rule="r")


@pytest.mark.parametrize(
    ("reap", "key", "message"),
    [
        ("threads = 100000", "reaper.reap.threads", "within 1..64"),
        ("threads = 0", "reaper.reap.threads", "within 1..64"),
        ("cpus = 5", "reaper.reap.cpus", "expected a list of CPU numbers"),
        ("cpus = [[0]]", "reaper.reap.cpus", "expected a list of CPU numbers"),
        ('policy = ["fifo"]', "reaper.reap.policy", "policy must be one of"),
        ("nice = 1e3", "reaper.reap.nice", "nice must be an integer"),
    ],
)
def test_reap_settings_are_bounded_and_typed(
    tmp_path: Path, reap: str, key: str, message: str
) -> None:
    with pytest.raises(PolicyError) as info:
        _load(tmp_path, head=f"[reaper.reap]\n{reap}\n")
    assert info.value.key == key and message in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [(r"(a)\1", "invalid escape"), ("(?=a)", "invalid perl operator"), ("a(?<!b)", "perl")],
)
def test_patterns_re2_cannot_take_are_refused_at_load(
    tmp_path: Path, pattern: str, why: str
) -> None:
    extra = ""
    text = RULE.replace("^sshd$", pattern.replace("\\", "\\\\")).replace("ACTIONS", '"kill"')
    path = tmp_path / "policy.toml"
    path.write_text(text.replace("EXTRA", extra))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.key == "rule[0].select[0].comm"
    assert why in str(info.value) and "linear time" in str(info.value)


def test_regular_expressions_match_in_linear_time(tmp_path: Path) -> None:
    # Python's re takes minutes on 35 'a's and a '!' against ^(a+)+$ (issue 11).
    fake = FakeProc(tmp_path / "proc")
    fake.add_process(10, comm="victim", cmdline=["a" * 4000 + "!"])
    fake.add_process(11, comm="aaaa", cmdline=["a" * 40])
    procfs = ProcFS(fake.root)
    protect = _protect(tmp_path, 'cmdline = ["^(a+)+$"], comm = ["^(a|aa)+$"]')
    candidates = [Ranked(Candidate.from_info(procfs.process_info(p))) for p in (10, 11)]
    started = time.perf_counter()
    kept = protect.select(_situation(procfs), candidates)
    assert [r.candidate.pid for r in kept] == [10]
    assert time.perf_counter() - started < 10  # generous: the old code takes minutes


def _protect(tmp_path: Path, options: str) -> Protect:
    text = RULE.replace('comm = ["^sshd$"]', options).replace("ACTIONS", '"kill"')
    selector = load_policy(text=text.replace("EXTRA", "")).rules[0].selectors[0]
    assert isinstance(selector, Protect)
    return selector


def _situation(procfs: ProcFS) -> Situation:
    return Situation(rule="t", trigger=None, meminfo=procfs.meminfo(), procfs=procfs, now=1.0)


def test_protect_requires_identity_when_asked(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path / "proc")
    fake.add_process(20, comm="sshd", uid=0)  # the real one: root, /usr/sbin/sshd
    fake.add_process(21, comm="sshd", uid=65534)  # a user's hog, renamed
    fake.add_process(22, comm="sshd", uid=0)  # root, but another executable
    fake.add_process(23, comm="worker", uid=0)
    fake.add_process(24, comm="sshd", uid=1000)
    for pid, exe in ((20, "usr/sbin/sshd"), (21, "tmp/hog"), (22, "opt/x/sshd")):
        (tmp_path / exe).parent.mkdir(parents=True)  # exe is matched only if the file exists
        (tmp_path / exe).touch()
        os.symlink(tmp_path / exe, os.path.join(fake.root, str(pid), "exe"))
    procfs = ProcFS(fake.root)
    candidates = [Ranked(Candidate.from_info(procfs.process_info(p))) for p in range(20, 25)]
    sbin = re.escape(f"{tmp_path}/usr/sbin/")
    protect = _protect(
        tmp_path, f"comm = ['^sshd$'], require = {{ uid = [0, '100-999'], exe = ['^{sbin}'] }}"
    )
    kept = protect.select(_situation(procfs), candidates)
    assert [r.candidate.pid for r in kept] == [21, 22, 23, 24]
    assert "uid 0" in kept[0].reason and f"exe '{tmp_path}/usr/sbin/sshd'"[:65] in kept[0].reason
    by_uid = _protect(tmp_path, 'uid = ["nobody", "1000-1000"]')
    assert [r.candidate.pid for r in by_uid.select(_situation(procfs), candidates)] == [20, 22, 23]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('uid = ["nosuchuser"]', "uid: no user named 'nosuchuser'"),
        ('uid = ["9-1"]', "uid: expected uids"),
        ("uid = [-1]", "uid: expected uids"),
        ('comm = ["x"], require = { pid = 1 }', "require: unknown key 'pid'"),
        ('comm = ["x"], require = {}', "require: name at least one"),
        ('comm = ["x"], require = { uid = ["nosuchuser"] }', "require.uid: no user named"),
        ('comm = ["x"], require = { exe = ["(?!a)"] }', "require.exe:"),
        ("require = { uid = [0] }", "require narrows"),
    ],
)
def test_protect_identity_options_are_checked(tmp_path: Path, options: str, message: str) -> None:
    with pytest.raises(PolicyError, match=r"rule\[0\]\.select\[0\]") as info:
        _protect(tmp_path, options)
    assert message in str(info.value)


# -- any input: a PolicyError or a Policy, nothing else --------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'[[rule]]\nname = "\xff\xfe"\n', "not UTF-8 text: byte 17"),
        ('[[rule]]\nname = "µ"\n'.encode()[:-3], "not UTF-8 text"),  # cut inside the µ
        (b"a = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"a = " + b"{b = " * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b"x" * (2 << 20), "larger than 1 MiB"),
    ],
)
def test_bytes_that_are_no_policy_are_a_policy_error(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(data)
    with pytest.raises(PolicyError, match=message) as info:
        load_policy(path)
    assert str(path) in str(info.value)


def _load_anything(path: Path) -> None:
    try:
        load_policy(path, dry_run=True)
    except PolicyError as exc:
        message = str(exc)
    else:
        return
    assert str(path) in message
    # The catch-all's message: a gap in validation the tests must show, not hide.
    assert "cannot be validated" not in message, message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400) | st.text(max_size=200).map(lambda t: t.encode()))
def test_any_bytes_load_or_are_a_policy_error(tmp_path_factory: Any, data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "policy.toml"
    path.write_bytes(data)
    _load_anything(path)


# A TOML document from the policy's own vocabulary, mixed with junk: real keys with wrong
# values, real plugin names with wrong options, wrong types everywhere.
_PLUGINS = [
    "protect", "scope", "oom-score", "largest-rss", "memory-growth", "prefer-avoid",
    "oom-score-adj-tiers", "cgroup-victims", "newest", "oldest", "log", "warn", "prekill-hook",
    "terminate", "kill", "cgroup-kill", "reap", "nosuch",
]  # fmt: skip
_OPTIONS = [
    "comm", "cmdline", "exe", "cgroup", "uid", "require", "subtree", "cgroup_regex", "prefer",
    "avoid", "field", "weight", "min_adj", "by", "cgroup_root", "xattrs_root_only",
    "size_threshold", "include_swap", "message", "command", "timeout", "user", "group",
    "run_in_dry_run", "grace", "pid",
]  # fmt: skip
_RULE_KEYS = [
    "name", "when", "scope", "cgroup", "select", "actions", "cooldown", "victim_timeout",
    "max_kills", "kill_window", "plugin_deadline", "action_deadline",
    "allow_oom_score_adj_min", "pressure_cgroup", "junk",
]  # fmt: skip
_REAP_KEYS = ["threads", "cpus", "nice", "policy", "priority", "junk"]
_STRINGS = [
    "system", "2s", "150ms", "-1s", "nan", "inf", "5%", "150%", "512MiB", "mem_available < 5%",
    "memory some 200ms/2s", "memory some 2s/1s", "cgroup_usage > 90%", "swap_free < 1%",
    "^sshd$", "(?!x)", "(unclosed", "{name}", "{nosuch}", "{", "0-999", "root", "nosuchuser",
    "/bin/true", "/", "/nonexistent", "fifo", "other", "usage", "pressure", "both", "",
    "\x00", "µ", "a" * 300,
]  # fmt: skip

_scalars = st.one_of(
    st.sampled_from(_STRINGS),
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 64, 65, 100_000, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from([*_OPTIONS, "name"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_plugin = st.one_of(
    st.sampled_from(_PLUGINS),
    st.builds(
        lambda name, options: {"name": name, **options},
        st.sampled_from(_PLUGINS),
        st.dictionaries(st.sampled_from(_OPTIONS), _values, max_size=3),
    ),
    _values,
)
_rule = st.dictionaries(
    st.sampled_from(_RULE_KEYS),
    st.one_of(_values, st.lists(_plugin, max_size=3), st.just("system")),
    max_size=8,
)
_document = st.fixed_dictionaries(
    {},
    optional={
        "reaper": st.fixed_dictionaries(
            {},
            optional={
                "dry_run": _values,
                "keep_score_files": _values,
                "prepare_ranking": _values,
                "reap": st.dictionaries(st.sampled_from(_REAP_KEYS), _values, max_size=4),
            },
        ),
        "rule": st.lists(_rule, max_size=2) | _values,
        "observer": st.lists(_plugin, max_size=2),
        "trigger": st.lists(_plugin, max_size=2),
        "junk": _values,
    },
)


def _toml_key(key: str) -> str:
    return (
        key
        if key and all(c in string.ascii_letters + string.digits + "_-" for c in key)
        else (_toml_value(key))
    )


def _toml_value(value: Any) -> str:
    """A tiny TOML writer: inline values only (enough for every policy)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        escaped = "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
                          for c in value)  # fmt: skip
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml(document: dict[str, Any]) -> str:
    lines = []
    for key, value in document.items():
        if key == "rule" and isinstance(value, list) and all(isinstance(r, dict) for r in value):
            for rule in value:
                lines.append("[[rule]]")
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in rule.items()]
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _surrogate_free(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_document)
def test_any_toml_document_loads_or_is_a_policy_error(
    tmp_path_factory: Any, document: dict[str, Any]
) -> None:
    text = _toml(document)
    path = tmp_path_factory.mktemp("toml") / "policy.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_anything(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=len(DEFAULT_POLICY) - 1),
    junk=st.sampled_from(["nan", "inf", "-5", '"x"', "[", "{", "0", "true", '"(?=a)"', "µ"]),
)
def test_the_default_policy_with_junk_spliced_in(
    tmp_path_factory: Any, index: int, junk: str
) -> None:
    path = tmp_path_factory.mktemp("spliced") / "policy.toml"
    path.write_text(DEFAULT_POLICY[:index] + junk + DEFAULT_POLICY[index:])
    _load_anything(path)


def test_the_toml_writer_round_trips() -> None:
    import tomllib

    document = {"reaper": {"reap": {"threads": 2}}, "rule": [{"name": "a\x00µ", "x": [1.5, {}]}]}
    assert tomllib.loads(_toml(document)) == document
    assert _surrogate_free(_toml(document))


def test_the_default_policy_protects_system_services_by_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake tree's executables do not exist here: take its exe links as verified
    # (verification: test_selectors.py and tests/kernel/test_policy_protection.py).
    def exe(situation: Situation, c: Candidate) -> str:
        link = f"{situation.procfs.root}/{c.pid}/exe"
        return os.readlink(link) if os.path.islink(link) else ""

    monkeypatch.setattr(Situation, "exe", exe)
    fake = FakeProc(tmp_path / "proc")
    fake.add_process(30, comm="sshd", uid=0)  # the real sshd: root
    fake.add_process(31, comm="sshd", uid=65534)  # anyone's process, renamed
    fake.add_process(32, comm="Xwayland", uid=1000)  # the session's, by its executable
    fake.add_process(33, comm="Xwayland", uid=1000)  # a user's program, renamed
    fake.add_process(34, comm="dbus-daemon", uid=101)  # a system account
    os.symlink("/usr/bin/Xwayland", os.path.join(fake.root, "32", "exe"))
    os.symlink("/home/u/hog", os.path.join(fake.root, "33", "exe"))
    procfs = ProcFS(fake.root)
    candidates = [Ranked(Candidate.from_info(procfs.process_info(p))) for p in range(30, 35)]
    kept = candidates
    for rule in load_policy().rules[:1]:
        for selector in rule.selectors:
            if isinstance(selector, Protect):
                kept = selector.select(_situation(procfs), kept)
    assert [r.candidate.pid for r in kept] == [31, 33]

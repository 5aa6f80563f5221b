"""Policy files and the plugin registry: errors name the file, the key path and the plugin."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any, ClassVar

import pytest

from reapkit._conditions import MemoryCondition
from reapkit._guard import SystemScope
from reapkit._plugins import (
    PluginError,
    PluginRegistry,
    Selector,
    make_options,
    selector,
    validate_plugin,
)
from reapkit._policy import DEFAULT_POLICY, PolicyError, load_policy
from reapkit._procfs import MemInfo
from reapkit.builtin import register_builtins

from ..conftest import FakeEntryPoint

MiB, GiB = 1 << 20, 1 << 30

GOOD = """
[[rule]]
name = "test"
when = ["memory some 100ms/2s", "mem_available < 5%"]
scope = "system"
select = [{ name = "protect", comm = ["^sshd$"] }, "oom-score"]
actions = [{ name = "terminate", grace = "1500ms" }, "reap"]
cooldown = "3s"
"""


def test_the_default_policy_loads_and_combines_pressure_with_memory() -> None:
    policy = load_policy()
    assert policy.source == "<default policy>"
    first = policy.rules[0]
    assert [type(c).__name__ for c in first.when] == ["PressureCondition", "MemoryCondition"]
    assert [a.name for a in first.actions] == ["terminate", "reap"]
    assert isinstance(first.guard.scope, SystemScope)
    assert policy.needs_reap_stage
    assert "memory some" in DEFAULT_POLICY


@pytest.mark.parametrize(
    ("swap_total", "swap_free", "acts"),
    [
        (0, 0, True),  # no swap: the memory line alone decides
        (4 * GiB, 3 * GiB, False),  # swap can still take cold pages: no emergency yet
        (4 * GiB, 200 * MiB, True),  # swap nearly full too
    ],
)
def test_the_default_emergency_rule_waits_for_swap(
    swap_total: int, swap_free: int, acts: bool
) -> None:
    """``almost-no-memory`` (SIGKILL, no pressure window) needs swap nearly full as well: with
    zram, a low MemAvailable alone is no emergency (tests/vmlab's zram scenario shows it)."""
    rule = next(r for r in load_policy().rules if r.name == "almost-no-memory")
    meminfo = MemInfo(
        total=16 * GiB, free=100 * MiB, available=200 * MiB, buffers=0, cached=0,
        swap_total=swap_total, swap_free=swap_free,
    )  # fmt: skip
    held = [c.holds(meminfo)[0] for c in rule.when if isinstance(c, MemoryCondition)]
    assert len(held) == 2
    assert all(held) is acts


def test_the_default_lines_keep_a_floor_on_small_machines() -> None:
    """2 % of a 2 GiB machine is 41 MiB: six allocators ran the guest's memory to 0 past it
    before a victim died (tests/vmlab's workers scenario). Each default line has a floor."""
    small, large = 2 * GiB, 64 * GiB
    lines = {
        r.name: next(c.threshold.line for c in r.when if isinstance(c, MemoryCondition))
        for r in load_policy().rules
    }
    assert lines["low-memory"].resolve(small) == 200 * MiB
    assert lines["almost-no-memory"].resolve(small) == 100 * MiB
    assert lines["almost-no-memory"].resolve(large) == int(large * 0.02)


def test_a_good_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    policy = load_policy(path)
    rule = policy.rules[0]
    assert policy.source == str(path)
    assert rule.cooldown == 3.0
    assert rule.actions[0].options.grace == 1.5
    assert [s.name for s in rule.selectors] == ["protect", "oom-score"]
    assert not policy.dry_run and rule.guard.signals_enabled
    assert not load_policy(path, dry_run=True).rules[0].guard.signals_enabled


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        (('cooldown = "3s"', 'cooldown = "3 parsecs"'), "rule[0].cooldown", "not a duration"),
        (('grace = "1500ms"', 'grace = "soon"'), "rule[0].actions[0].grace", "not a duration"),
        (('comm = ["^sshd$"]', 'comm = ["(unclosed"]'), "rule[0].select[0].comm", "regular expression"),  # noqa: E501
        (('[[rule]]', '[reaper]\ndry-run = true\n\n[[rule]]'), "reaper.dry-run", "unknown key"),
        (('cooldown = "3s"', 'max_kills = 0'), "rule[0].max_kills", "at least 1"),
        (("[[rule]]", "[reaper.reap]\ncpus = [4096]\n\n[[rule]]"), "reaper.reap.cpus", "not available"),  # noqa: E501
        (('"oom-score"', '"telepathy"'), "rule[0].select[1]", "no selector of this name"),
        (('"reap"', '"explode"'), "rule[0].actions[1]", "no action of this name"),
        (('scope = "system"', 'scope = "everything"'), "rule[0].scope", "expected \"system\""),
        (('scope = "system"', ""), "rule[0].scope", "every rule needs a scope"),
        (('"mem_available < 5%"', '"mem_available > 5%"'), "rule[0].when[1]", "mem_available <"),
        (('"memory some 100ms/2s"', '"memory some 150ms/1s"'), "rule[0].when[0]", "2s"),
        (("cooldown", "colldown"), "rule[0].colldown", "unknown key"),
        (("comm = [", "cmd = ["), "rule[0].select[0].cmd", "unknown option 'cmd'"),
        (("[[rule]]", "[reaper]\nkeep_score_files = -1\n\n[[rule]]"), "reaper.keep_score_files", "0 (off) or more"),  # noqa: E501
        (("[[rule]]", "[reaper]\nkeep_score_files = true\n\n[[rule]]"), "reaper.keep_score_files", "expected int"),  # noqa: E501
        # The most it may be: past the hard limit (which nr_open, 1048576 unless raised, caps)
        (("[[rule]]", "[reaper]\nkeep_score_files = 1_048_576\n\n[[rule]]"), "reaper.keep_score_files", "RLIMIT_NOFILE hard limit"),  # noqa: E501
        (("[[rule]]", "[reaper]\nkeep_score_files = 1_048_577\n\n[[rule]]"), "reaper.keep_score_files", "at most 1048576"),  # noqa: E501
        (("[[rule]]", '[reaper]\nprepare_ranking = "soon"\n\n[[rule]]'), "reaper.prepare_ranking", "not a duration"),  # noqa: E501
        (("[[rule]]", '[reaper]\nprepare_ranking = -1\n\n[[rule]]'), "reaper.prepare_ranking", "not negative"),  # noqa: E501
        (("[[rule]]", "[reaper]\nprepare_ranking = true\n\n[[rule]]"), "reaper.prepare_ranking", "not a duration"),  # noqa: E501
        (("[[rule]]", '[reaper]\nprepare_ranking = "1m"\n\n[[rule]]'), "reaper.prepare_ranking", "at most 10s"),  # noqa: E501
    ],
)  # fmt: skip
def test_errors_name_the_file_and_key_path(
    tmp_path: Path, change: tuple[str, str], key: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "150ms/1s" in change[1]:
        monkeypatch.setattr(
            "reapkit._policy.effective_capabilities", lambda: {"CAP_SYS_RESOURCE": False}
        )
    path = tmp_path / "broken.toml"
    assert change[0] in GOOD
    path.write_text(GOOD.replace(change[0], change[1]))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(path) in str(info.value)
    assert info.value.key == key
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("line", "seconds"),
    [("", 1.0), ('prepare_ranking = "0s"', 0.0), ('prepare_ranking = "250ms"', 0.25)],
)
def test_prepare_ranking_is_a_duration_a_second_by_default(line: str, seconds: float) -> None:
    policy = load_policy(text=GOOD.replace("[[rule]]", f"[reaper]\n{line}\n\n[[rule]]", 1))
    assert policy.prepare_ranking == seconds


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read it"):
        load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]\nname=")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="at least one"):
        load_policy(text="[reaper]\n")


def test_registration_validates_and_names_the_plugin() -> None:
    registry = PluginRegistry()

    class NoName(Selector):
        def select(self, situation: Any, candidates: Any) -> Any:
            return candidates

    with pytest.raises(PluginError, match="needs a name"):
        registry.register(NoName)

    class NoSelect(Selector):
        name: ClassVar[str] = "lazy"

    with pytest.raises(PluginError, match="'lazy': a selector must implement select"):
        registry.register(NoSelect)  # type: ignore[type-abstract]

    with pytest.raises(PluginError, match="not a subclass"):
        validate_plugin(object)


def test_function_selectors_and_options(tmp_path: Path) -> None:
    registry = PluginRegistry()
    register_builtins(registry)

    @selector("first-two", registry=registry)
    def first_two(situation: Any, candidates: Any) -> Any:
        """Keep the first two."""
        return candidates[:2]

    cls = registry.get("selector", "first-two")
    assert cls.__doc__ == "Keep the first two."
    policy = load_policy(text=GOOD.replace('"oom-score"', '"first-two"'), registry=registry)
    assert policy.rules[0].selectors[1].name == "first-two"
    protect = registry.get("selector", "protect")
    with pytest.raises(PluginError, match="unknown option 'nope'"):
        make_options(protect, {"nope": 1})


class FromEntryPoint(Selector):
    name: ClassVar[str] = "from-entry-point"

    def select(self, situation: Any, candidates: Any) -> Any:
        return candidates


def test_entry_points_load_and_a_broken_one_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        FakeEntryPoint("good", FromEntryPoint, "reapkit-good"),
        FakeEntryPoint("broken", ImportError("no module named kaboom"), "reapkit-broken"),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps)
    registry = PluginRegistry()
    failures = registry.load_entry_points()
    assert [f.name for f in failures] == ["broken"]
    assert registry.get("selector", "from-entry-point") is FromEntryPoint
    infos = {i.name: i for i in registry.plugins()}
    assert infos["from-entry-point"].source == "reapkit-good"
    assert infos["broken"].error == "ImportError: no module named kaboom"


class AlsoFromEntryPoint(FromEntryPoint):
    name: ClassVar[str] = "also-from-entry-point"


def test_a_policy_imports_only_the_entry_point_plugins_it_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded: list[str] = []

    class Recording(FakeEntryPoint):
        def load(self) -> object:
            loaded.append(self.name)
            return super().load()

    eps = [
        Recording("from-entry-point", FromEntryPoint, "reapkit-good"),
        Recording("a-bundle", [AlsoFromEntryPoint], "reapkit-bundle"),
        Recording("broken", ImportError("no module named kaboom"), "reapkit-broken"),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps)
    registry = PluginRegistry()
    registry.discover_entry_points()
    assert loaded == []
    assert registry.get("selector", "from-entry-point") is FromEntryPoint
    assert loaded == ["from-entry-point"]  # by its name, nothing else
    # A name no entry point carries: all the rest load (an entry point may list several).
    assert registry.get("selector", "also-from-entry-point") is AlsoFromEntryPoint
    assert sorted(loaded) == ["a-bundle", "broken", "from-entry-point"]
    assert {i.name for i in registry.plugins() if i.error} == {"broken"}
    with pytest.raises(PluginError, match=r"installed by reapkit-broken but failed to load: Imp"):
        registry.get("selector", "broken")


def test_scope_and_when_overrides(tmp_path: Path) -> None:
    from reapkit import SubtreeScope

    scope = SubtreeScope(123, 456)
    policy = load_policy(text=GOOD, scope=scope, when=[])
    rule = policy.rules[0]
    assert rule.guard.scope is scope and rule.when == ()
    assert [s.name for s in rule.selectors] == ["protect", "oom-score"]  # the rest is as written
    with pytest.raises(PolicyError, match="when \\(override\\)"):
        load_policy(text=GOOD, when=["nonsense"])


def test_a_hook_command_must_be_a_list() -> None:
    text = GOOD.replace('"reap"', '{ name = "prekill-hook", command = "/bin/true" }')
    with pytest.raises(PolicyError, match=r"command must be a list.*write \['/bin/true'\]") as info:
        load_policy(text=text)
    assert info.value.key == "rule[0].actions[1].command"


def test_only_a_reaping_action_asks_for_a_reap_stage() -> None:
    assert not load_policy(text=GOOD.replace(', "reap"]', "]")).needs_reap_stage
    assert load_policy(text=GOOD).needs_reap_stage

"""The plugin contracts: hooks are checked by their parameters' names when a plugin registers
(pluggy's ``_verify_hook``) and called with their arguments by name; what actions, observers
and triggers are handed is typed in the plugin layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio

from reapkit import ActionContext, KillRecord, ManualTrigger
from reapkit._engine import EngineStatistics, Rule
from reapkit._guard import KillGuard, SystemScope
from reapkit._plugins import (
    Action,
    AttachingObserver,
    Observer,
    PluginCalls,
    PluginError,
    PluginRegistry,
    Ranked,
    Selector,
    ServingObserver,
    Situation,
    TimelineBuilder,
    Trigger,
    hook_parameters,
)
from reapkit._procfs import ProcFS
from reapkit.builtin.selectors import Protect


def _register(cls: type[Any]) -> type[Any]:
    return PluginRegistry().register(cls)


def test_a_hook_asking_for_an_argument_reapkit_does_not_pass_is_rejected() -> None:
    class Misnamed(Selector):
        name: ClassVar[str] = "misnamed"

        def select(self, situation: Situation, cands: Sequence[Ranked]) -> list[Ranked]:
            return list(cands)

    with pytest.raises(PluginError, match=r"'misnamed': select\(\) asks for 'cands'") as info:
        _register(Misnamed)
    assert info.value.plugin == "misnamed"
    assert "situation, candidates" in str(info.value)


def test_a_positional_only_hook_is_rejected() -> None:
    class PositionalOnly(Action):
        name: ClassVar[str] = "positional-only"

        async def act(self, context: ActionContext, /) -> str:
            return "never"

    with pytest.raises(PluginError, match=r"act\(\): 'context' is positional-only"):
        _register(PositionalOnly)


def test_a_trigger_that_cannot_be_started_is_rejected() -> None:
    class NoStatus(Trigger):
        name: ClassVar[str] = "no-status"

        async def run(self, send: Any) -> None:  # type: ignore[override]
            await trio.sleep_forever()

    with pytest.raises(PluginError, match=r"'no-status': run\(\) must take task_status"):
        _register(NoStatus)


def test_an_optional_observer_hook_is_checked_too() -> None:
    class BadAttach(Observer):
        name: ClassVar[str] = "bad-attach"

        def on_record(self, record: KillRecord) -> None:
            pass

        def attach(self, running: object) -> None:
            pass

    with pytest.raises(PluginError, match=r"'bad-attach': attach\(\) asks for 'running'"):
        _register(BadAttach)


class Reordered(Selector):
    """Takes its arguments in another order, and one more with a default."""

    name: ClassVar[str] = "reordered"
    inline: ClassVar[bool] = True

    def select(
        self, candidates: Sequence[Ranked], situation: Situation, limit: int = 1
    ) -> list[Ranked]:
        assert isinstance(situation, str) and situation == "the situation"
        return list(candidates)[:limit]


class OnlyCandidates(Selector):
    name: ClassVar[str] = "only-candidates"
    inline: ClassVar[bool] = True

    def select(self, candidates: Sequence[Ranked]) -> list[Ranked]:  # type: ignore[override]
        return list(reversed(candidates))


class Anything(Selector):
    name: ClassVar[str] = "anything"
    inline: ClassVar[bool] = True

    def select(self, **arguments: Any) -> list[Ranked]:  # type: ignore[override]
        assert set(arguments) == {"situation", "candidates"}
        return list(arguments["candidates"])


@pytest.mark.parametrize(
    ("cls", "takes", "result"),
    [
        (Reordered, ("candidates", "situation"), [1]),
        (OnlyCandidates, ("candidates",), [3, 2, 1]),
        (Anything, None, [1, 2, 3]),
    ],
)
async def test_hooks_get_their_arguments_by_name(
    cls: type[Selector], takes: tuple[str, ...] | None, result: list[int]
) -> None:
    assert _register(cls) is cls
    assert hook_parameters(cls, "select") == takes
    arguments = {"situation": "the situation", "candidates": (1, 2, 3)}
    got = await PluginCalls().call(cls(), "select", arguments, deadline=5)
    assert got == result


def test_an_action_taking_context_keeps_working() -> None:
    class Untyped(Action):  # as third-party actions were written before the contracts
        name: ClassVar[str] = "untyped"

        async def act(self, context: Any) -> str:
            return str(context.rule.name)

    assert _register(Untyped) is Untyped
    assert hook_parameters(Untyped, "act") == ("context",)


def test_the_observer_hooks_are_protocols() -> None:
    class Plain(Observer):
        name: ClassVar[str] = "plain"

        def on_record(self, record: KillRecord) -> None:
            pass

    class Serving(Plain):
        name: ClassVar[str] = "serving"

        async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()

        def attach(self, reaper: object) -> None:
            pass

    assert not isinstance(Plain(), ServingObserver | AttachingObserver)
    assert isinstance(Serving(), ServingObserver) and isinstance(Serving(), AttachingObserver)
    assert _register(Serving) is Serving


def test_a_timeline_builder_keeps_the_first_mark() -> None:
    timeline = TimelineBuilder(1.0)
    timeline.mark("signal_sent", 2.0)
    timeline.mark("signal_sent", 3.0)  # the first mark holds
    timeline.set("reap_started", 2.5)
    timeline.set("reap_started", 2.6)  # a time measured elsewhere replaces
    assert timeline.get("signal_sent") == 2.0
    assert timeline.missing("exit_seen", "signal_sent") == ["exit_seen"]
    built = timeline.build()
    assert (built.trigger_seen, built.signal_sent, built.reap_started) == (1.0, 2.0, 2.6)
    assert built.exit_seen is None


def test_an_action_sees_a_narrow_view_of_its_rule(tmp_path: Path) -> None:
    guard = KillGuard(SystemScope(), procfs=ProcFS(str(tmp_path)), dry_run=True)
    rule = Rule("narrow", (), guard, (Protect(),), (), cooldown=2.0)
    view = rule.view()
    assert (view.name, view.guard, view.cooldown, view.protects, view.dry_run) == (
        "narrow", guard, 2.0, True, True,
    )  # fmt: skip
    assert not hasattr(view, "selectors") and not hasattr(view, "actions")


def test_the_engines_public_counters_are_unchanged() -> None:
    assert [f.name for f in attrs.fields(EngineStatistics)] == [
        "events", "decisions", "kills", "dry_runs", "abandoned", "refused", "no_candidate",
        "plugin_failures", "skipped_busy", "skipped_cooldown", "skipped_cap", "plugins_disabled",
        "fail_safe", "prepared", "prepared_used", "prepared_unused",
    ]  # fmt: skip


def test_a_trigger_event_is_public() -> None:
    assert ManualTrigger(1.0, "why").reason == "why"

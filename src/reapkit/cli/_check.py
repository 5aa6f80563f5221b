"""``reapkit check [POLICY] [--now] [--json]``: validate a policy and show it as understood."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Final

import attrs
import trio

from .._engine import Engine, Rule
from .._plugins import NoOptions, Plugin, Ranked
from .._policy import Policy, PolicyError, check_policy_trust, load_policy
from .._records import SelectorStep
from ._common import POLICY_HELP, PolicyChoice, choose_policy, preview_notes, scope_from
from ._status import EXIT_OK

#: The version of ``check --json``'s shape (docs/operations.md#check-json).
JSON_VERSION: Final = 1


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "check",
        help="validate a policy and print it as understood",
        description="Validate POLICY, print its rules as understood and, with --now, which"
        " process each rule would choose right now (and which the kill guard refused). Kills"
        " nothing. Exit 0 when valid, 2 when invalid (the message names the file and key).",
    )
    p.add_argument("policy", nargs="?", help=POLICY_HELP)
    p.add_argument(
        "--scope",
        metavar="CGROUP_DIR",
        help="confine every rule to this cgroup directory (try a policy on one cgroup)",
    )
    p.add_argument("--now", action="store_true", help="show what each rule would choose now")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, for scripts")
    p.set_defaults(run=run)


def _plugin(plugin: Plugin) -> str:
    if isinstance(plugin.options, NoOptions):
        return plugin.name
    options = ", ".join(f"{k}={v!r}" for k, v in attrs.asdict(plugin.options).items())
    return f"{plugin.name}({options})"


def _mode(policy: Policy) -> str:
    return " (dry_run = true: it decides and records, and never signals)" * policy.dry_run_in_file


def render(policy: Policy, choice: PolicyChoice | None = None) -> str:
    lines = [f"{policy.source}: valid{_mode(policy)}"]
    if choice is not None and choice.why != "named on the command line":
        lines.append(f"  ({choice.why})")
    for rule in policy.rules:
        lines += [
            "",
            f"rule {rule.name!r}",
            f"  when     {' AND '.join(map(str, rule.when)) or 'only when triggered by hand'}",
            f"  scope    {rule.guard.scope.describe()}",
            f"  select   {' -> '.join(_plugin(s) for s in rule.selectors)}",
            f"  actions  {' -> '.join(_plugin(a) for a in rule.actions)}",
            f"  limits   cooldown {rule.cooldown:g} s, at most {rule.max_kills} kills per"
            f" {rule.kill_window:g} s, victim timeout {rule.victim_timeout:g} s",
        ]
    return "\n".join(lines)


@attrs.frozen
class Preview:
    """What one rule would do right now (``check --now``)."""

    rule: str
    chosen: Ranked | None
    #: The chosen one's place in the ranking (1 = first), and the ranking's length.
    place: int | None
    ranked: int
    #: Candidates in the rule's scope, before any selector.
    in_scope: int
    #: Candidates ranked before the chosen one that the kill guard refused.
    refused: int
    #: Selector failures and the guard's refusals, one sentence each.
    notes: tuple[str, ...]

    @classmethod
    def of(
        cls, rule: Rule, chosen: Ranked | None, ranked: list[Ranked], steps: list[SelectorStep]
    ) -> Preview:
        guard = next((s for s in steps if s.selector == "guard"), None)
        refused = guard.candidates_in - guard.candidates_out if guard is not None else 0
        place = next((i for i, r in enumerate(ranked, 1) if r is chosen), None)
        in_scope = steps[0].candidates_in if steps else len(ranked)
        return cls(rule.name, chosen, place, len(ranked), in_scope, refused, preview_notes(steps))

    def describe(self) -> list[str]:
        if self.chosen is None:
            lines = [
                f"  {self.rule}: no candidate ({self.ranked} ranked of {self.in_scope} in scope)"
            ]
        else:
            c = self.chosen.candidate
            lines = [
                f"  {self.rule}: would choose {c.comm!r} (pid {c.pid}, rss {c.rss >> 20} MiB,"
                f" oom_score {c.oom_score}), ranked {self.place} of {self.ranked}"
                f" ({self.in_scope} in scope): {self.chosen.reason or 'first candidate'}"
            ]
        return lines + [f"    {note}" for note in self.notes]

    def as_json(self) -> dict[str, Any]:
        chosen = None
        if self.chosen is not None:
            c = self.chosen.candidate
            chosen = {"pid": c.pid, "comm": c.comm, "rss": c.rss, "oom_score": c.oom_score}
            score = self.chosen.score  # a plugin's: JSON has no nan or inf
            chosen |= {"score": score if math.isfinite(score) else None}
            chosen |= {"reason": self.chosen.reason}
        return {
            "rule": self.rule, "chosen": chosen, "place": self.place, "ranked": self.ranked,
            "in_scope": self.in_scope, "refused": self.refused, "notes": list(self.notes),
        }  # fmt: skip


async def _preview(policy: Policy) -> list[Preview]:
    async def no_records(_record: Any) -> None:
        return None

    engine = Engine(policy.rules, emit=no_records)
    return [Preview.of(rule, *await engine.preview(rule)) for rule in policy.rules]


def _plugin_json(plugin: Plugin) -> dict[str, Any]:
    options = {} if isinstance(plugin.options, NoOptions) else attrs.asdict(plugin.options)
    return {"name": plugin.name, "options": options}


def as_json(
    policy: Policy, choice: PolicyChoice, previews: list[Preview] | None, trust: str | None
) -> dict[str, Any]:
    """``check --json``: the keys docs/operations.md#check-json lists."""
    rules = [
        {
            "name": rule.name,
            "when": [str(c) for c in rule.when],
            "scope": rule.guard.scope.describe(),
            "select": [_plugin_json(s) for s in rule.selectors],
            "actions": [_plugin_json(a) for a in rule.actions],
            "cooldown": rule.cooldown,
            "max_kills": rule.max_kills,
            "kill_window": rule.kill_window,
            "victim_timeout": rule.victim_timeout,
        }
        for rule in policy.rules
    ]
    return {
        "version": JSON_VERSION, "policy": policy.source, "found": choice.why, "valid": True,
        "error": None, "dry_run": policy.dry_run_in_file, "trust_warning": trust,
        "rules": rules, "now": None if previews is None else [p.as_json() for p in previews],
    }  # fmt: skip


def _dump(data: dict[str, Any]) -> None:
    # Options may hold values JSON has no type for (a Size, a compiled value): as text.
    print(json.dumps(data, default=str, sort_keys=False))


def run(args: argparse.Namespace) -> int:
    choice = choose_policy(args.policy)
    try:
        # As root, refused as `reapkit run` refuses it (exit 2); otherwise a warning.
        policy = load_policy(
            choice.path, dry_run=True, scope=scope_from(args), require_trusted=True
        )
    except PolicyError as exc:
        if args.json:
            _dump({
                "version": JSON_VERSION, "policy": choice.path or "<default policy>",
                "found": choice.why, "valid": False, "error": str(exc),
            })  # fmt: skip
        raise  # one line on stderr and exit status 2, as for every command
    trust = None
    if choice.path is not None and os.geteuid() != 0:
        try:
            check_policy_trust(choice.path)
        except PolicyError as exc:
            trust = f"run as root, reapkit run would refuse it: {exc}"
            print(f"reapkit check: warning: {trust}", file=sys.stderr)
    previews = trio.run(_preview, policy) if args.now else None
    if args.json:
        _dump(as_json(policy, choice, previews, trust))
        return EXIT_OK
    print(render(policy, choice))
    if previews is not None:
        print("\nright now (nothing is killed):")
        for preview in previews:
            print("\n".join(preview.describe()))
    return EXIT_OK

"""``reapkit check [POLICY] [--now]``: validate a policy and show it as understood."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import attrs
import trio

from .._engine import Engine, Rule
from .._plugins import NoOptions, Plugin
from .._policy import Policy, PolicyError, check_policy_trust, load_policy
from ._common import scope_from
from ._status import EXIT_OK


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "check",
        help="validate a policy (the embedded default when none) and print it as understood",
        description="Validate POLICY (or the embedded default), print its rules as understood"
        " and, with --now, which process each rule would choose right now. Kills nothing."
        " Exit 0 when valid, 2 when invalid (the message names the file and key).",
    )
    p.add_argument("policy", nargs="?", help="a policy file (TOML)")
    p.add_argument(
        "--scope",
        metavar="CGROUP_DIR",
        help="confine every rule to this cgroup directory (try a policy on one cgroup)",
    )
    p.add_argument("--now", action="store_true", help="show what each rule would choose now")
    p.set_defaults(run=run)


def _plugin(plugin: Plugin) -> str:
    if isinstance(plugin.options, NoOptions):
        return plugin.name
    options = ", ".join(f"{k}={v!r}" for k, v in attrs.asdict(plugin.options).items())
    return f"{plugin.name}({options})"


def render(policy: Policy) -> str:
    lines = [f"{policy.source}: valid" + (" (dry-run)" if policy.dry_run else "")]
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


async def _preview(policy: Policy) -> list[str]:
    async def no_records(_record: Any) -> None:
        return None

    engine = Engine(policy.rules, emit=no_records)
    lines = ["", "right now (nothing is killed):"]
    for rule in policy.rules:
        lines.append(_describe(rule, *await engine.preview(rule)))
    return lines


def _describe(rule: Rule, chosen: Any, ranked: list[Any], steps: list[Any]) -> str:
    if chosen is None:
        return f"  {rule.name}: no candidate ({len(ranked)} ranked)"
    c = chosen.candidate
    return (
        f"  {rule.name}: would choose {c.comm!r} (pid {c.pid}, rss {c.rss >> 20} MiB,"
        f" oom_score {c.oom_score}) of {steps[0].candidates_in if steps else len(ranked)}:"
        f" {chosen.reason or 'first candidate'}"
    )


def run(args: argparse.Namespace) -> int:
    # As root, refused as `reapkit run` refuses it (exit 2); otherwise a warning.
    policy = load_policy(args.policy, dry_run=True, scope=scope_from(args), require_trusted=True)
    if args.policy is not None and os.geteuid() != 0:
        try:
            check_policy_trust(args.policy)
        except PolicyError as exc:
            print(f"reapkit check: warning: run as root, reapkit run would refuse it: {exc}",
                  file=sys.stderr)  # fmt: skip
    print(render(policy))
    if args.now:
        print("\n".join(trio.run(_preview, policy)))
    return EXIT_OK

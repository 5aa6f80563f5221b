"""What several commands share."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from .._guard import CgroupScope, Scope
from .._records import SelectorStep
from ._status import UsageError

#: The environment variable that names a policy when the command line names none.
POLICY_ENV: Final = "REAPKIT_POLICY"
#: The system's policy, read when neither the command line nor ``$REAPKIT_POLICY`` names one.
SYSTEM_POLICY: Final = "/etc/reapkit/policy.toml"
#: The help of a command's POLICY argument.
POLICY_HELP: Final = (
    f"a policy file (TOML); without one, ${POLICY_ENV} names it, else {SYSTEM_POLICY} if it"
    " exists, else the embedded default"
)
#: What ``SYSTEM_POLICY`` is under: ``/``, or a test's temporary directory.
ROOT = "/"


@attrs.frozen
class PolicyChoice:
    """Which policy a command reads, and why: ``path`` is ``None`` for the embedded default."""

    path: str | None
    why: str

    def describe(self) -> str:
        return f"{self.path or 'the embedded default policy'} ({self.why})"


def choose_policy(
    named: str | None, *, root: str | None = None, environ: Mapping[str, str] | None = None
) -> PolicyChoice:
    """The policy file named on the command line; else ``$REAPKIT_POLICY``; else
    ``/etc/reapkit/policy.toml`` if there is anything at that path (a broken link or a
    directory is then an error when it is read, never silently skipped); else the default."""
    if named is not None:
        return PolicyChoice(named, "named on the command line")
    env = (os.environ if environ is None else environ).get(POLICY_ENV, "")
    if env:
        return PolicyChoice(env, f"from ${POLICY_ENV}")
    system = os.path.join(root or ROOT, SYSTEM_POLICY.lstrip("/"))
    if os.path.lexists(system):
        return PolicyChoice(system, f"no policy named, ${POLICY_ENV} unset; {system} exists")
    return PolicyChoice(None, f"no policy named, ${POLICY_ENV} unset, no {system}")


def scope_from(args: argparse.Namespace) -> Scope | None:
    """``--scope CGROUP_DIR`` as a scope, or None; a bad directory is a usage error."""
    if getattr(args, "scope", None) is None:
        return None
    try:
        return CgroupScope.from_directory(args.scope)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--scope {args.scope}: {exc}") from None


def preview_notes(steps: Sequence[SelectorStep]) -> tuple[str, ...]:
    """A preview's selector failures and guard refusals, one short sentence each."""
    notes = []
    for step in steps:
        if step.error is not None:
            notes.append(f"selector {step.selector} failed and was skipped: {step.error}")
        elif step.selector == "guard" and step.reason:
            refused = step.candidates_in - step.candidates_out
            notes.append(f"guard refused {refused}: {step.reason}")
    return tuple(notes)


def printable(text: str) -> str:
    """A process name (and what quotes one) may hold anything: keep it on one line, without
    a terminal's control characters."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)

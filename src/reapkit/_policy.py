"""Policy files: TOML into frozen objects, with every plugin built (and so validated) at load.

Every error names the file, the key path and what was expected::

    /etc/reapkit/policy.toml: rule[0].select[1].grace: '2 parsecs' is not a duration ...

A policy with no file is the embedded default (:data:`DEFAULT_POLICY`).
"""

from __future__ import annotations

import os
import resource
import stat
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import attrs

from ._conditions import PressureCondition, parse_condition
from ._engine import Rule
from ._errors import InvalidValue, NoSuchProcess
from ._errors import PolicyError as PolicyError  # in _errors: `reapkit probe` skips this module
from ._guard import CgroupScope, KillGuard, Scope, SubtreeScope, SystemScope
from ._kernel._probe import effective_capabilities
from ._plugins import (
    Action,
    Observer,
    PluginError,
    PluginRegistry,
    Selector,
    Trigger,
    default_registry,
    make_options,
)
from ._procfs import FILES_SPARE, ProcFS
from ._reap_stage import ReapSettings, SchedPolicy
from ._units import parse_duration
from .builtin import ensure_registered

DEFAULT_POLICY: Final = """\
# reapkit's embedded default policy: sane for a server or a desktop.
# Act only when memory is really short: PSI shows tasks stalling on memory AND little memory
# is left (PSI alone kills with plenty free: nohang #25). Choose by the kernel's oom_score,
# protecting what keeps the machine reachable; SIGTERM with a grace period, then SIGKILL,
# then reap the victim's memory with process_mrelease.
# A process chooses its own comm: a name protects only a process that also runs as a system
# account (uid 0-999, SYS_UID_MAX in /etc/login.defs), which no user can take. The graphical
# session is protected by executable path, verified against the file system (reading another
# user's /proc/<pid>/exe needs CAP_SYS_PTRACE: without it those processes are not protected;
# after an upgrade replaced the binary, neither is the old session until it restarts).

[reaper.reap]
threads = 2

[[rule]]
name = "low-memory"
when = ["memory some 200ms/2s", "mem_available < 5%"]
scope = "system"
select = [
  { name = "protect", comm = [
      "^(systemd|systemd-.*|init|sshd|dbus-daemon|dbus-broker|journald|udevd)$",
      "^(apt|apt-get|dpkg|dnf|yum|rpm|pacman|zypper)$",
  ], require = { uid = ["0-999"] } },
  { name = "protect", exe = [
      "^/usr/(bin|lib/xorg)/(Xorg|Xwayland|gnome-shell|kwin_wayland|kwin_x11|sway)$",
      "^/usr/bin/(pipewire|wireplumber|pulseaudio)$",
  ] },
  "oom-score",
]
actions = [{ name = "terminate", grace = "2s" }, "reap"]
cooldown = "5s"

[[rule]]
name = "almost-no-memory"
# Memory nearly gone: no time to wait for a pressure window or a grace period. With swap (zram
# on most desktops) a low MemAvailable alone is no emergency: the kernel can still move cold
# pages out, so this rule also waits until swap is nearly full (or there is none), as earlyoom
# does. Swapping that makes tasks stall is the rule above's job: it asks PSI, not the swap.
when = ["mem_available < 2%", "swap_free < 10%"]
scope = "system"
select = [
  { name = "protect", comm = [
      "^(systemd|systemd-.*|init|sshd|dbus-daemon|dbus-broker|journald|udevd)$",
  ], require = { uid = ["0-999"] } },
  "oom-score",
]
actions = ["kill", "reap"]
cooldown = "2s"
"""


@attrs.frozen
class ReapOptions:
    """``[reaper.reap]``: the reap stage's threads (see :class:`reapkit.lowlevel.ReapSettings`)."""

    threads: int = 2
    cpus: tuple[int, ...] | None = None
    nice: int | None = None
    policy: SchedPolicy = "other"
    priority: int = 0

    def settings(self) -> ReapSettings:
        return ReapSettings(
            threads=self.threads,
            cpus=frozenset(self.cpus) if self.cpus is not None else None,
            nice=self.nice,
            policy=self.policy,
            priority=self.priority,
        )


#: ``[reaper] prepare_ranking`` by default, in seconds.
PREPARE_RANKING: Final = 1.0
#: The largest ``prepare_ranking``: a ranking older than this is no view of a crisis.
PREPARE_RANKING_MAX: Final = 10.0


@attrs.frozen
class Policy:
    """A loaded, validated policy: its rules (plugins built, guards made), the reap stage's
    settings and its observers. Get one from :func:`load_policy`."""

    #: Where it came from: a path, or ``"<default policy>"``.
    source: str
    rules: tuple[Rule, ...]
    reap: ReapOptions
    dry_run: bool = False
    observers: tuple[Observer, ...] = ()
    #: Trigger plugins: extra sources of reasons to act (they send ManualTrigger events).
    triggers: tuple[Trigger, ...] = ()
    #: ``[reaper] keep_score_files``: ``oom_score`` files kept open between decisions.
    keep_score_files: int = 0
    #: ``[reaper] dry_run`` as the policy itself says it; ``dry_run`` is what holds, which
    #: ``load_policy(dry_run=True)`` (``--dry-run``, ``reapkit check``) forces on.
    dry_run_in_file: bool = False
    #: ``[reaper] prepare_ranking``: rankings prepared before a memory line is crossed, used
    #: until this many seconds after they were finished (0: off).
    prepare_ranking: float = PREPARE_RANKING

    @property
    def needs_reap_stage(self) -> bool:
        """Whether an action of a rule reaps (``Action.needs_reap_stage``): the reaper then
        starts its reap stage."""
        return any(a.needs_reap_stage for r in self.rules for a in r.actions)

    #: The old name of :attr:`needs_reap_stage`.
    needs_reaper = needs_reap_stage


#: The largest policy file read: a policy is a few KiB.
MAX_POLICY_BYTES: Final = 1 << 20
#: The most ``oom_score`` files ``keep_score_files`` may keep open (the kernel's nr_open).
MAX_KEPT_FILES: Final = 1 << 20


def _action_time(action: Action, option: str) -> float | None:
    """How long a built-in action may wait inside its call: terminate's ``grace`` (SIGKILL must
    follow within the deadline) and a hook's ``timeout``."""
    if action.name in ("terminate", "prekill-hook"):
        value = getattr(action.options, option, None)
        return value if isinstance(value, float) else None
    return None


_RULE_KEYS: Final = frozenset(
    {
        "name", "when", "scope", "cgroup", "select", "actions", "cooldown", "victim_timeout",
        "max_kills", "kill_window", "plugin_deadline", "action_deadline",
        "allow_oom_score_adj_min", "pressure_cgroup",
    }
)  # fmt: skip


def load_policy(
    path: str | os.PathLike[str] | None = None,
    *,
    text: str | None = None,
    dry_run: bool | None = None,
    registry: PluginRegistry | None = None,
    procfs: ProcFS | None = None,
    scope: Scope | None = None,
    when: Sequence[str] | None = None,
    require_trusted: bool = False,
) -> Policy:
    """Load a policy file (or ``text``; the embedded default when neither is given).

    ``dry_run=True`` forces dry-run whatever the file says. ``scope`` confines every rule to
    that scope (``reapkit run --scope``: trying a system-wide policy on one cgroup); ``when``
    replaces every rule's conditions (tests use ``[]``: act only when triggered by hand).
    ``require_trusted=True`` (the daemon): when running as root, refuse a file that another
    user could change (:func:`check_policy_trust`).
    Raises :class:`PolicyError`, and nothing else, whatever the input.
    """
    registry = registry or default_registry
    ensure_registered(registry)
    if path is not None:
        source = os.fspath(path)
        if require_trusted and os.geteuid() == 0:
            check_policy_trust(source)
        try:
            with open(source, "rb") as f:
                raw = f.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise PolicyError(source, "", f"cannot read it: {exc.strerror}") from None
        if len(raw) > MAX_POLICY_BYTES:
            raise PolicyError(source, "", f"larger than {MAX_POLICY_BYTES >> 20} MiB")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(
                source, "", f"not UTF-8 text: byte {exc.start} ({raw[exc.start : exc.end]!r})"
            ) from None
    else:
        source = "<policy text>" if text is not None else "<default policy>"
    try:
        data = tomllib.loads(text if text is not None else DEFAULT_POLICY)
        policy = _build(data, source, dry_run, registry, procfs or ProcFS())
    except PolicyError:
        raise
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, "", f"not valid TOML: {exc}") from None
    except RecursionError:
        raise PolicyError(source, "", "nested too deeply") from None
    except Exception as exc:  # a gap in validation: still the documented error, never a crash
        raise PolicyError(source, "", f"cannot be validated: {type(exc).__name__}: {exc}") from exc
    if scope is None and when is None:
        return policy
    rules = []
    for rule in policy.rules:
        guard = rule.guard
        if scope is not None:
            guard = KillGuard(
                scope,
                dry_run=guard.dry_run,
                allow_oom_score_adj_min=guard.allow_oom_score_adj_min,
                procfs=guard.procfs,
            )
        conditions = rule.when
        if when is not None:
            try:
                conditions = tuple(parse_condition(w, cgroup=rule.cgroup) for w in when)
            except InvalidValue as exc:
                raise PolicyError(source, "when (override)", str(exc)) from None
        rules.append(attrs.evolve(rule, guard=guard, when=conditions))
    return attrs.evolve(policy, rules=tuple(rules))


def check_policy_trust(path: str | os.PathLike[str]) -> None:
    """Raise :class:`PolicyError` unless no user but root can change the policy at ``path``.

    Like sshd's ``StrictModes``: the file and every directory above it (as written, and after
    symlinks are resolved) must be owned by root and not writable by group or others. A
    directory writable by others is accepted only with the sticky bit (``/tmp``): there, only
    the owner of an entry (root, as every entry on the path must be) can rename or remove it.
    """
    source = os.fspath(path)
    absolute = os.path.abspath(source)
    for chain in (absolute, os.path.realpath(absolute)):
        entry = chain
        while True:
            try:
                st = os.stat(entry)
            except OSError as exc:
                raise PolicyError(source, "", f"cannot check {entry}: {exc.strerror}") from None
            problem = _untrusted(st, is_file=entry == chain)
            if problem:
                raise PolicyError(
                    source,
                    "",
                    f"not trusted: {entry} {problem}. Running as root, reapkit loads only a"
                    " policy that no other user can change: chown root and chmod go-w the file"
                    " and the directories above it",
                )
            parent = os.path.dirname(entry)
            if parent == entry:
                break
            entry = parent


def _untrusted(st: os.stat_result, *, is_file: bool) -> str:
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid}, not root"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and (is_file or not st.st_mode & stat.S_ISVTX):
        who = (
            "group and others"
            if writable == stat.S_IWGRP | stat.S_IWOTH
            else ("its group" if writable == stat.S_IWGRP else "others")
        )
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def _build(
    data: Mapping[str, Any],
    source: str,
    force_dry_run: bool | None,
    registry: PluginRegistry,
    procfs: ProcFS,
) -> Policy:
    def fail(key: str, message: str) -> PolicyError:
        return PolicyError(source, key, message)

    unknown = set(data) - {"reaper", "rule", "observer", "trigger"}
    if unknown:
        raise fail(
            sorted(unknown)[0],
            "unknown section (expected [reaper], [[rule]], [[observer]], [[trigger]])",
        )
    reaper = _table(data.get("reaper", {}), "reaper", fail)
    for key in reaper:
        if key not in ("dry_run", "keep_score_files", "prepare_ranking", "reap"):
            # A typo here must not pass silently: 'dry-run = true' would otherwise kill.
            raise fail(
                f"reaper.{key}",
                "unknown key (keys: dry_run, keep_score_files, prepare_ranking, reap)",
            )
    dry_run = _typed(reaper.get("dry_run", False), bool, "reaper.dry_run", fail)
    keep = _keep_score_files(reaper.get("keep_score_files", 0), fail)
    in_file = dry_run
    prepare = _prepare_ranking(reaper.get("prepare_ranking", PREPARE_RANKING), fail)
    if force_dry_run:
        dry_run = True
    reap_table = _table(reaper.get("reap", {}), "reaper.reap", fail)
    keys = ("threads", "cpus", "nice", "policy", "priority")
    for key in reap_table:
        if key not in keys:
            raise fail(f"reaper.reap.{key}", f"unknown key (keys: {', '.join(keys)})")
    cpus = reap_table.get("cpus")
    if cpus is not None and not (
        isinstance(cpus, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in cpus)
    ):
        raise fail("reaper.reap.cpus", f"expected a list of CPU numbers such as [1], not {cpus!r}")
    reap = ReapOptions(**reap_table)
    try:  # validate now, with the key path, not first when the reaper starts
        settings = reap.settings()
    except (InvalidValue, TypeError, ValueError) as exc:
        message = str(exc)
        key = next((k for k in keys if message.startswith(k)), "")
        raise fail(f"reaper.reap.{key}" if key else "reaper.reap", message) from None
    if settings.cpus is not None:
        available = os.sched_getaffinity(0)
        missing = sorted(settings.cpus - available)
        if missing:
            raise fail(
                "reaper.reap.cpus",
                f"CPU {', '.join(map(str, missing))} not available here"
                f" (available: {', '.join(map(str, sorted(available)))})",
            )
    rules_data = data.get("rule")
    if not isinstance(rules_data, list) or not rules_data:
        raise fail("rule", "expected at least one [[rule]]")
    rules = []
    names: set[str] = set()
    for i, raw in enumerate(rules_data):
        rule = _rule(
            raw, f"rule[{i}]", dry_run=dry_run, registry=registry, procfs=procfs, fail=fail
        )
        if rule.name in names:
            raise fail(f"rule[{i}].name", f"{rule.name!r} is used by another rule")
        names.add(rule.name)
        rules.append(rule)
    observers = tuple(
        _plugin(o, f"observer[{i}]", "observer", registry, fail)
        for i, o in enumerate(_list(data.get("observer", []), "observer", fail))
    )
    triggers = tuple(
        _plugin(t, f"trigger[{i}]", "trigger", registry, fail)
        for i, t in enumerate(_list(data.get("trigger", []), "trigger", fail))
    )
    return Policy(source, tuple(rules), reap, dry_run, observers, triggers, keep, in_file, prepare)


def _keep_score_files(value: Any, fail: Any) -> int:
    """``[reaper] keep_score_files``: a count the open-file limit can hold."""
    keep: int = _typed(value, int, "reaper.keep_score_files", fail)
    if keep < 0:
        raise fail("reaper.keep_score_files", f"must be 0 (off) or more, not {keep}")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and keep + FILES_SPARE > hard:
        raise fail(
            "reaper.keep_score_files",
            f"{keep} files (+{FILES_SPARE} spare) exceed the open-file limit (RLIMIT_NOFILE"
            f" hard limit {hard}; systemd: LimitNOFILE=)",
        )
    if keep > MAX_KEPT_FILES:
        raise fail("reaper.keep_score_files", f"at most {MAX_KEPT_FILES}, not {keep}")
    return keep


def _prepare_ranking(value: Any, fail: Any) -> float:
    """``[reaper] prepare_ranking``, in seconds."""
    try:
        seconds = parse_duration(value)
    except InvalidValue as exc:
        raise fail("reaper.prepare_ranking", str(exc)) from None
    if seconds > PREPARE_RANKING_MAX:
        raise fail("reaper.prepare_ranking", f"at most {PREPARE_RANKING_MAX:g}s, not {seconds:g}s")
    return seconds


def _rule(
    raw: Any, where: str, *, dry_run: bool, registry: PluginRegistry, procfs: ProcFS, fail: Any
) -> Rule:
    unprivileged_psi = not effective_capabilities()["CAP_SYS_RESOURCE"]
    table = _table(raw, where, fail)
    for key in table:
        if key not in _RULE_KEYS:
            raise fail(f"{where}.{key}", f"unknown key (keys: {', '.join(sorted(_RULE_KEYS))})")
    name = _typed(table.get("name"), str, f"{where}.name", fail)
    cgroup = table.get("cgroup")
    if cgroup is not None:
        cgroup = _typed(cgroup, str, f"{where}.cgroup", fail)
    pressure_cgroup = table.get("pressure_cgroup")
    if pressure_cgroup is not None:
        pressure_cgroup = _typed(pressure_cgroup, str, f"{where}.pressure_cgroup", fail)
    when_raw = table.get("when", [])
    if not isinstance(when_raw, list) or not all(isinstance(w, str) for w in when_raw):
        raise fail(f"{where}.when", "expected a list of conditions like 'mem_available < 5%'")
    when = []
    for j, text in enumerate(when_raw):
        try:
            cond = parse_condition(text, cgroup=cgroup, pressure_cgroup=pressure_cgroup)
            if isinstance(cond, PressureCondition):
                # Validate against this host now, not first when the trigger is armed.
                cond.spec.check_window(unprivileged_only=unprivileged_psi)
        except InvalidValue as exc:
            raise fail(f"{where}.when[{j}]", str(exc)) from None
        when.append(cond)
    scope = _scope(table.get("scope"), f"{where}.scope", procfs, fail)
    allow = _typed(
        table.get("allow_oom_score_adj_min", False), bool, f"{where}.allow_oom_score_adj_min", fail
    )
    guard = KillGuard(scope, dry_run=dry_run, allow_oom_score_adj_min=allow, procfs=procfs)
    selectors = tuple(
        _plugin(s, f"{where}.select[{j}]", "selector", registry, fail)
        for j, s in enumerate(_list(table.get("select", ["oom-score"]), f"{where}.select", fail))
    )
    actions = tuple(
        _plugin(a, f"{where}.actions[{j}]", "action", registry, fail)
        for j, a in enumerate(_list(table.get("actions", []), f"{where}.actions", fail))
    )
    if not actions:
        raise fail(f"{where}.actions", 'expected at least one action, e.g. ["kill"]')
    timing: dict[str, Any] = {}
    for key in ("cooldown", "victim_timeout", "kill_window", "plugin_deadline", "action_deadline"):
        if key in table:
            try:
                timing[key] = parse_duration(table[key])
            except InvalidValue as exc:
                raise fail(f"{where}.{key}", str(exc)) from None
    for key in ("victim_timeout", "kill_window", "plugin_deadline", "action_deadline"):
        if key in timing and timing[key] <= 0:
            raise fail(f"{where}.{key}", "must be longer than 0s")
    deadline = cast(
        float, timing.get("action_deadline", attrs.fields(Rule).action_deadline.default)
    )
    for j, action in enumerate(actions):
        for option in ("grace", "timeout"):
            needed = _action_time(action, option)
            if needed is not None and needed >= deadline:
                raise fail(
                    f"{where}.actions[{j}].{option}",
                    f"{action.name}'s {option} of {needed:g}s does not fit in the rule's"
                    f" action_deadline of {deadline:g}s (over by {needed - deadline:g}s at least):"
                    f" raise action_deadline above {needed:g}s or shorten {option}",
                )
    if "max_kills" in table:
        timing["max_kills"] = _typed(table["max_kills"], int, f"{where}.max_kills", fail)
        if timing["max_kills"] < 1:
            raise fail(f"{where}.max_kills", "must be at least 1")
    return Rule(
        name=name,
        when=tuple(when),
        guard=guard,
        selectors=selectors,
        actions=actions,
        cgroup=cgroup,
        **timing,
    )


def _scope(raw: Any, where: str, procfs: ProcFS, fail: Any) -> Scope:
    if raw is None:
        raise fail(
            where, 'every rule needs a scope: "system", { cgroup = "<dir>" } or { subtree = <pid> }'
        )
    if raw == "system":
        return SystemScope()
    if isinstance(raw, Mapping) and set(raw) == {"cgroup"}:
        try:
            return CgroupScope.from_directory(_typed(raw["cgroup"], str, f"{where}.cgroup", fail))
        except (OSError, ValueError) as exc:
            raise fail(f"{where}.cgroup", str(exc)) from None
    if isinstance(raw, Mapping) and set(raw) == {"subtree"}:
        pid = _typed(raw["subtree"], int, f"{where}.subtree", fail)
        if pid <= 0:
            raise fail(f"{where}.subtree", f"expected a process id, not {pid}")
        try:
            return SubtreeScope(pid, procfs.stat(pid).start_time)
        except NoSuchProcess:
            raise fail(f"{where}.subtree", f"process {pid} does not exist") from None
    raise fail(where, 'expected "system", { cgroup = "<dir>" } or { subtree = <pid> }')


def _plugin(raw: Any, where: str, kind: str, registry: PluginRegistry, fail: Any) -> Any:
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        name, options = raw["name"], dict(raw)
    else:
        raise fail(where, f"expected a {kind} name or a table with 'name'")
    try:
        cls = registry.get(kind, name)  # type: ignore[arg-type]
        instance = cls(make_options(cls, options))
    except PluginError as exc:
        key = f"{where}.{exc.option}" if exc.option else where
        raise fail(key, str(exc)) from None
    except Exception as exc:  # a plugin's own options code: anything it raises is a bad value
        raise fail(where, f"plugin {name!r}: {exc}") from None
    if not isinstance(instance, Selector | Action | Observer | Trigger):  # pragma: no cover
        raise fail(where, f"{name!r} is not a {kind}")
    return instance


def _table(raw: Any, where: str, fail: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise fail(where, "expected a table")
    return dict(raw)


def _list(raw: Any, where: str, fail: Any) -> Sequence[Any]:
    if not isinstance(raw, list):
        raise fail(where, "expected a list")
    return raw


def _typed(value: Any, expected: type, where: str, fail: Any) -> Any:
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise fail(where, f"expected {expected.__name__}, not {value!r}")
    return value

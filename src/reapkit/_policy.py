"""Policy files: TOML into frozen objects, with every plugin built (and so validated) at load.

Every error names the file, the key path and what was expected::

    /etc/reapkit/policy.toml: rule[0].select[1].grace: '2 parsecs' is not a duration ...

A policy with no file is the embedded default (:data:`DEFAULT_POLICY`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Final, Protocol, cast

import attrs

from ._conditions import Condition, check_on_host, parse_condition
from ._engine import Rule
from ._errors import NoSuchProcess
from ._errors import PolicyError as PolicyError  # in _errors: `reapkit probe` skips this module
from ._guard import CgroupScope, KillGuard, Scope, SubtreeScope, SystemScope
from ._kernel._probe import effective_capabilities
from ._plugins import (
    Action,
    Kind,
    Observer,
    PluginError,
    PluginRegistry,
    Selector,
    Trigger,
    default_registry,
    make_options,
)
from ._procfs import FILES_SPARE, ProcFS
from ._reap_stage import ReapSettings
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
when = ["memory some 200ms/2s", "mem_available < max(5%, 200MiB)"]
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
# Each line has a floor in bytes: what a leak takes while a victim is chosen and dies depends on
# how fast it allocates, not on the size of RAM (2% of a 2 GiB machine is gone in a blink).
when = ["mem_available < max(2%, 100MiB)", "swap_free < 10%"]
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


#: ``[reaper] prepare_ranking`` by default, in seconds.
PREPARE_RANKING: Final = 1.0
#: The largest ``prepare_ranking``: a ranking older than this is no view of a crisis.
PREPARE_RANKING_MAX: Final = 10.0
#: The largest policy file read: a policy is a few KiB.
MAX_POLICY_BYTES: Final = 1 << 20
#: The most ``oom_score`` files ``keep_score_files`` may keep open (the kernel's nr_open).
MAX_KEPT_FILES: Final = 1 << 20


def _kept_files(_policy: object, _attribute: object, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected int, not {value!r}")
    if value < 0:
        raise ValueError(f"must be 0 (off) or more, not {value}")
    if value > MAX_KEPT_FILES:
        raise ValueError(f"at most {MAX_KEPT_FILES}, not {value}")


def _ranking_age(_policy: object, _attribute: object, value: Any) -> None:
    if not (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"expected a number of seconds, 0 or more, not {value!r}")  # nan too
    if value > PREPARE_RANKING_MAX:
        raise ValueError(f"at most {PREPARE_RANKING_MAX:g}s, not {value:g}s")


@attrs.frozen
class Policy:
    """A loaded, validated policy: its rules (plugins built, guards made), the reap stage's
    settings and its observers. Get one from :func:`load_policy`."""

    #: Where it came from: a path, or ``"<default policy>"``.
    source: str
    rules: tuple[Rule, ...]
    #: ``[reaper.reap]``: how the reap stage's threads run.
    reap: ReapSettings = attrs.field(factory=ReapSettings)
    dry_run: bool = False
    observers: tuple[Observer, ...] = ()
    #: Trigger plugins: extra sources of reasons to act (they send ManualTrigger events).
    triggers: tuple[Trigger, ...] = ()
    #: ``[reaper] keep_score_files``: ``oom_score`` files kept open between decisions.
    keep_score_files: int = attrs.field(default=0, validator=_kept_files)
    #: ``[reaper] dry_run`` as the policy itself says it; ``dry_run`` is what holds, which
    #: ``load_policy(dry_run=True)`` (``--dry-run``, ``reapkit check``) forces on.
    dry_run_in_file: bool = False
    #: ``[reaper] prepare_ranking``: rankings prepared before a memory line is crossed, used
    #: until this many seconds after they were finished (0: off).
    prepare_ranking: float = attrs.field(default=PREPARE_RANKING, validator=_ranking_age)

    @property
    def needs_reap_stage(self) -> bool:
        """Whether an action of a rule reaps (``Action.needs_reap_stage``): the reaper then
        starts its reap stage."""
        return any(a.needs_reap_stage for r in self.rules for a in r.actions)

    #: The old name of :attr:`needs_reap_stage`.
    needs_reaper = needs_reap_stage


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
    if path is not None:
        source = os.fspath(path)
        if require_trusted and os.geteuid() == 0:
            check_policy_trust(source)
        text = _read(source)
    else:
        source = "<policy text>" if text is not None else "<default policy>"
    host = _OnHost(procfs or ProcFS())
    return _load(text, source, host, registry, dry_run=dry_run, scope=scope, when=when)


def load_policy_on(
    host: PolicyHost,
    path: str | os.PathLike[str] | None = None,
    *,
    text: str | None = None,
    dry_run: bool | None = None,
) -> Policy:
    """:func:`load_policy` on another host than this machine: ``reapkit replay`` serves one
    from a trace (its ``/proc``, cgroups and scopes)."""
    source = os.fspath(path) if path is not None else None
    if source is not None:
        text = _read(source)
    else:
        source = "<policy text>" if text is not None else "<default policy>"
    return _load(text, source, host, None, dry_run=dry_run)


def parse_policy(
    text: str | None = None,
    *,
    source: str = "<policy text>",
    registry: PluginRegistry | None = None,
) -> Policy:
    """Parse a policy off-host: everything :func:`load_policy` checks but the host (no
    ``/proc``, ``/sys``, capability or limit is looked at). Its cgroup and sub-tree scopes
    are not looked up and contain no process, its guards read no ``/proc``: for tests and
    tools that read policies, never to run one."""
    return _load(text, source, _OffHost(), registry)


def _read(source: str) -> str:
    try:
        with open(source, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(source, "", f"cannot read it: {exc.strerror}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(source, "", f"larger than {MAX_POLICY_BYTES >> 20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            source, "", f"not UTF-8 text: byte {exc.start} ({raw[exc.start : exc.end]!r})"
        ) from None


def _load(
    text: str | None,
    source: str,
    host: PolicyHost,
    registry: PluginRegistry | None,
    *,
    dry_run: bool | None = None,
    scope: Scope | None = None,
    when: Sequence[str] | None = None,
) -> Policy:
    """The one path from text to a :class:`Policy`, for ``run``, ``check`` and embedders: the
    one place an error becomes a :class:`PolicyError` naming the file."""
    registry = registry or default_registry
    ensure_registered(registry)
    try:
        data = tomllib.loads(text if text is not None else DEFAULT_POLICY)
        policy = _parse(data, source, _Context(registry, host, dry_run=bool(dry_run)))
        host.check(policy)
        return _override(policy, host, scope, when)
    except _Invalid as exc:
        raise PolicyError(source, exc.key, exc.message) from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, "", f"not valid TOML: {exc}") from None
    except RecursionError:
        raise PolicyError(source, "", "nested too deeply") from None
    except Exception as exc:  # a gap in validation: still the documented error, never a crash
        raise PolicyError(source, "", f"cannot be validated: {type(exc).__name__}: {exc}") from exc


def _override(
    policy: Policy, host: PolicyHost, scope: Scope | None, when: Sequence[str] | None
) -> Policy:
    """``load_policy(scope=..., when=...)``: every rule confined, or its conditions replaced."""
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
            with _at("when (override)"):
                conditions = tuple(parse_condition(w, cgroup=rule.cgroup) for w in when)
                for condition in conditions:
                    host.check_condition(condition)
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


# -- errors: one place names the key ---------------------------------------------------------


class _Invalid(Exception):
    """A bad value at a key path; :func:`_load` adds the file (a :class:`PolicyError`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message


@contextlib.contextmanager
def _at(key: str) -> Iterator[None]:
    """Read, convert and validate the value at ``key``: what a reader, a converter or a
    validator raises about it (``InvalidValue``, ``ValueError``, ``TypeError``, a plugin's
    ``PluginError`` with its option) becomes an error at that key path."""
    try:
        yield
    except PluginError as exc:
        raise _Invalid(f"{key}.{exc.option}" if exc.option else key, str(exc)) from None
    except (ValueError, TypeError) as exc:  # InvalidValue is a ValueError
        raise _Invalid(key, str(exc)) from None


# -- the host: every probe of the machine, apart from parsing ---------------------------------


class PolicyHost(Protocol):
    """What loading a policy asks of the machine it is loaded on."""

    @property
    def procfs(self) -> ProcFS: ...
    def cgroup_scope(self, directory: str) -> Scope: ...
    def cgroup_directory(self, directory: str) -> str: ...
    def subtree_scope(self, pid: int) -> Scope: ...
    def check(self, policy: Policy) -> None: ...
    def check_condition(self, condition: Condition) -> None: ...


@attrs.frozen
class _OnHost:
    """This machine: scopes are looked up, and values checked against its CPUs, limits,
    capabilities and cgroups (on load, not first when the reaper starts or a trigger is armed)."""

    procfs: ProcFS

    def cgroup_scope(self, directory: str) -> Scope:
        try:
            return CgroupScope.from_directory(directory)
        except OSError as exc:
            raise ValueError(str(exc)) from None

    def cgroup_directory(self, directory: str) -> str:
        return directory

    def subtree_scope(self, pid: int) -> Scope:
        try:
            return SubtreeScope(pid, self.procfs.stat(pid).start_time)
        except NoSuchProcess:
            raise ValueError(f"process {pid} does not exist") from None

    def check(self, policy: Policy) -> None:
        keep = policy.keep_score_files
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and keep + FILES_SPARE > hard:
            raise _Invalid(
                "reaper.keep_score_files",
                f"{keep} files (+{FILES_SPARE} spare) exceed the open-file limit (RLIMIT_NOFILE"
                f" hard limit {hard}; systemd: LimitNOFILE=)",
            )
        if policy.reap.cpus is not None:
            available = os.sched_getaffinity(0)
            missing = sorted(policy.reap.cpus - available)
            if missing:
                raise _Invalid(
                    "reaper.reap.cpus",
                    f"CPU {', '.join(map(str, missing))} not available here"
                    f" (available: {', '.join(map(str, sorted(available)))})",
                )
        for i, rule in enumerate(policy.rules):
            for j, condition in enumerate(rule.when):
                with _at(f"rule[{i}].when[{j}]"):
                    self.check_condition(condition)

    def check_condition(self, condition: Condition) -> None:
        """A PSI window this host's kernel takes, the cgroups a condition reads there."""
        unprivileged = not effective_capabilities()["CAP_SYS_RESOURCE"]
        check_on_host(condition, unprivileged_psi=unprivileged)


@attrs.frozen
class _Unresolved(Scope):
    """A scope parsed off-host: never looked up, so it holds no process."""

    what: str

    def excludes(self, pid: int, procfs: ProcFS) -> str | None:
        return f"{self.describe()}: the policy was parsed off-host"

    def describe(self) -> str:
        return f"{self.what} (not looked up)"


@attrs.frozen
class _OffHost:
    """No machine: nothing is looked up or checked (:func:`parse_policy`). Its ``/proc`` is
    none, so the guards it makes read nothing and never signal."""

    procfs: ProcFS = attrs.field(factory=lambda: ProcFS("/nonexistent/off-host/proc"))

    def cgroup_scope(self, directory: str) -> Scope:
        return _Unresolved(f"cgroup {directory}")

    def cgroup_directory(self, directory: str) -> str:
        return directory

    def subtree_scope(self, pid: int) -> Scope:
        return _Unresolved(f"the process sub-tree of {pid}")

    def check(self, policy: Policy) -> None:
        return None

    def check_condition(self, condition: Condition) -> None:
        return None


# -- the tables: derived from the classes they make -------------------------------------------


@attrs.frozen
class _Context:
    registry: PluginRegistry
    host: PolicyHost
    dry_run: bool


#: Reads one TOML value (at a key path) into the value of a field, before the field's own
#: converter and validator.
_Reader = Callable[[Any, str, _Context], Any]


def _duration(value: Any, _where: str, _context: _Context) -> float:
    return parse_duration(value)


def _typed(expected: type) -> _Reader:
    def read(value: Any, _where: str, _context: _Context) -> Any:
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise TypeError(f"expected {expected.__name__}, not {value!r}")
        return value

    return read


_SCALARS: Final = {"str": str, "int": int, "bool": bool}


def _reader_of(field: attrs.Attribute[Any]) -> _Reader | None:
    """The reader a field's annotation implies: a ``float`` in a policy is a duration; a plain
    ``str``, ``int`` or ``bool`` (or ``None``able one) is type-checked unless the field's own
    validator checks it."""
    annotation = str(field.type).removesuffix(" | None")
    if annotation == "float":
        return _duration
    if annotation in _SCALARS and field.validator is None:
        return _typed(_SCALARS[annotation])
    return None


def _identity(value: Any, _where: str, _context: _Context) -> Any:
    return value


@attrs.frozen
class _Table:
    """One TOML table, described by the attrs classes it fills.

    Its keys are those classes' ``init`` fields but ``skip`` (as the file spells them:
    ``names`` maps a field to its key where they differ). A key the file leaves out keeps its
    field's default (or the file's own, ``defaults``); without one it is required. A value
    goes through its reader (``read``, or the one its annotation implies), then its field's
    converter and validator, each under its key path.
    """

    #: How messages name the table: ``[reaper]``, ``[[rule]]``.
    name: str
    classes: tuple[type, ...]
    skip: frozenset[str] = frozenset()
    names: Mapping[str, str] = attrs.field(factory=dict)
    read: Mapping[str, _Reader] = attrs.field(factory=dict)
    defaults: Mapping[str, Any] = attrs.field(factory=dict)
    #: Why a required key is required, where more can be said than that it is.
    missing: Mapping[str, str] = attrs.field(factory=dict)
    #: Key → (index of its class, its field), in the classes' order.
    fields: Mapping[str, tuple[int, attrs.Attribute[Any]]] = attrs.field(init=False)

    @fields.default
    def _fields(self) -> dict[str, tuple[int, attrs.Attribute[Any]]]:
        found = {}
        for i, cls in enumerate(self.classes):
            for field in attrs.fields(cls):
                if field.init and field.name not in self.skip:
                    key = self.names.get(field.name, field.name)
                    found[key] = (i, field)
                    if key not in self.read and not _reader_of(field) and not field.validator:
                        raise TypeError(f"{self.name} {key}: nothing checks its value")
        return found

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self.fields)

    def values(self, raw: Any, where: str, context: _Context) -> list[dict[str, Any]]:
        """The values the file gives, by field, one mapping per class (a field left out is
        not there: its class's default holds)."""
        if not isinstance(raw, Mapping):
            raise _Invalid(where, "expected a table")
        for key in raw:
            if key not in self.fields:
                raise _Invalid(
                    f"{where}.{key}", f"unknown key (keys: {', '.join(sorted(self.fields))})"
                )
        found: list[dict[str, Any]] = [{} for _ in self.classes]
        for key, (i, field) in self.fields.items():
            if key in raw:
                value = raw[key]
            elif key in self.defaults:
                value = self.defaults[key]
            elif field.default is attrs.NOTHING:
                message = self.missing.get(key, f"missing: every {self.name} needs one")
                raise _Invalid(f"{where}.{key}", message)
            else:
                continue
            with _at(f"{where}.{key}"):
                value = self.read.get(key, _reader_of(field) or _identity)(
                    value, f"{where}.{key}", context
                )
                if field.converter is not None:  # a plain function here, never a Converter
                    value = cast(Callable[[Any], Any], field.converter)(value)
            found[i][_argument(field)] = value
        for i, cls in enumerate(self.classes):
            self._validate(cls, found[i], where)
        return found

    def _validate(self, cls: type, values: dict[str, Any], where: str) -> None:
        """Each field's validator, under its key, once every value is known (as attrs runs
        them: a validator may look at other fields, and find a default at fault)."""
        fields = [f for f in attrs.fields(cls) if f.init]
        instance = SimpleNamespace(
            **{
                f.name: values[_argument(f)] if _argument(f) in values else _default(f)
                for f in fields
            }
        )
        for field in fields:
            if field.validator is not None and field.name not in self.skip:
                with _at(f"{where}.{self.names.get(field.name, field.name)}"):
                    field.validator(instance, field, getattr(instance, field.name))


def _argument(field: attrs.Attribute[Any]) -> str:
    """The field's ``__init__`` argument (``_plugins`` → ``plugins``)."""
    return field.alias or field.name


def _default(field: attrs.Attribute[Any]) -> Any:
    default: Any = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return None if default.takes_self else default.factory()
    return None if default is attrs.NOTHING else default


def _cpu_list(value: Any, _where: str, _context: _Context) -> Any:
    if not (
        isinstance(value, list)
        and all(isinstance(c, int) and not isinstance(c, bool) for c in value)
    ):
        raise TypeError(f"expected a list of CPU numbers such as [1], not {value!r}")
    return value


#: ``[reaper.reap]``: the reap stage's threads.
_REAP: Final = _Table("[reaper.reap]", (ReapSettings,), read={"cpus": _cpu_list})


def _reap(value: Any, where: str, context: _Context) -> ReapSettings:
    (settings,) = _REAP.values(value, where, context)
    return ReapSettings(**settings)


#: ``[reaper]``: the daemon's own settings (``dry_run`` as the file says it).
_REAPER: Final = _Table(
    "[reaper]",
    (Policy,),
    # Not in [reaper]: the sections below it, and what the file says made what holds.
    skip=frozenset({"source", "rules", "observers", "triggers", "dry_run"}),
    names={"dry_run_in_file": "dry_run"},
    read={"reap": _reap},
)


def _strings(value: Any, _where: str, _context: _Context) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise TypeError("expected a list of conditions like 'mem_available < 5%'")
    return value


def _scope(raw: Any, where: str, context: _Context) -> Scope:
    if raw == "system":
        return SystemScope()
    if isinstance(raw, Mapping) and set(raw) == {"cgroup"}:
        directory = _value(_typed(str), raw["cgroup"], f"{where}.cgroup", context)
        with _at(f"{where}.cgroup"):
            return context.host.cgroup_scope(directory)
    if isinstance(raw, Mapping) and set(raw) == {"subtree"}:
        pid = _value(_typed(int), raw["subtree"], f"{where}.subtree", context)
        with _at(f"{where}.subtree"):
            if pid <= 0:
                raise ValueError(f"expected a process id, not {pid}")
            return context.host.subtree_scope(pid)
    raise ValueError('expected "system", { cgroup = "<dir>" } or { subtree = <pid> }')


def _value(read: _Reader, raw: Any, where: str, context: _Context) -> Any:
    with _at(where):
        return read(raw, where, context)


def _plugins(kind: Kind) -> _Reader:
    def read(raw: Any, where: str, context: _Context) -> tuple[Any, ...]:
        if not isinstance(raw, list):
            raise TypeError("expected a list")
        return tuple(_plugin(p, f"{where}[{j}]", kind, context) for j, p in enumerate(raw))

    return read


def _plugin(raw: Any, where: str, kind: Kind, context: _Context) -> Any:
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        name, options = raw["name"], dict(raw)
    else:
        raise _Invalid(where, f"expected a {kind} name or a table with 'name'")
    with _at(where):
        cls = context.registry.get(kind, name)
        try:
            instance = cls(make_options(cls, options))
        except PluginError:
            raise
        except Exception as exc:  # a plugin's own options code: anything it raises is a bad value
            raise ValueError(f"plugin {name!r}: {exc}") from None
    if not isinstance(instance, Selector | Action | Observer | Trigger):  # pragma: no cover
        raise _Invalid(where, f"{name!r} is not a {kind}")
    return instance


@attrs.frozen
class _RuleOnly:
    """The ``[[rule]]`` keys that fill no field of the rule or its guard: they say how to read
    the others."""

    #: A cgroup v2 directory whose pressure files the rule's PSI conditions watch.
    pressure_cgroup: str | None = None


#: ``[[rule]]``: a :class:`Rule` and its :class:`KillGuard`.
_RULE: Final = _Table(
    "[[rule]]",
    (Rule, KillGuard, _RuleOnly),
    # Made from the rest (the guard; ``when`` is parsed knowing the cgroups) or from [reaper].
    skip=frozenset({"guard", "dry_run", "procfs"}),
    names={"selectors": "select"},
    read={
        "when": _strings,
        "scope": _scope,
        "select": _plugins("selector"),
        "actions": _plugins("action"),
    },
    defaults={"when": [], "select": ["oom-score"]},
    missing={
        "scope": 'every rule needs a scope: "system", { cgroup = "<dir>" } or { subtree = <pid> }',
        "actions": 'expected at least one action, e.g. ["kill"]',
    },
)

_SECTIONS: Final = ("reaper", "rule", "observer", "trigger")


def _parse(data: Mapping[str, Any], source: str, context: _Context) -> Policy:
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        expected = ", ".join(f"[{s}]" if s == "reaper" else f"[[{s}]]" for s in _SECTIONS)
        raise _Invalid(sorted(unknown)[0], f"unknown section (expected {expected})")
    # A typo in [reaper] must not pass silently: 'dry-run = true' would otherwise kill.
    (reaper,) = _REAPER.values(data.get("reaper", {}), "reaper", context)
    context = attrs.evolve(context, dry_run=context.dry_run or bool(reaper.get("dry_run_in_file")))
    rules_data = data.get("rule")
    if not isinstance(rules_data, list) or not rules_data:
        raise _Invalid("rule", "expected at least one [[rule]]")
    rules: list[Rule] = []
    for i, raw in enumerate(rules_data):
        rule = _rule(raw, f"rule[{i}]", context)
        if any(r.name == rule.name for r in rules):
            raise _Invalid(f"rule[{i}].name", f"{rule.name!r} is used by another rule")
        rules.append(rule)
    observers = _value(_plugins("observer"), data.get("observer", []), "observer", context)
    triggers = _value(_plugins("trigger"), data.get("trigger", []), "trigger", context)
    return Policy(
        source=source,
        rules=tuple(rules),
        dry_run=context.dry_run,
        observers=observers,
        triggers=triggers,
        **reaper,
    )


def _rule(raw: Any, where: str, context: _Context) -> Rule:
    values, guard_values, only = _RULE.values(raw, where, context)
    # The directories the rule's conditions read, where this host has them.
    for key, mapping in (("cgroup", values), ("pressure_cgroup", only)):
        if mapping.get(key) is not None:
            mapping[key] = context.host.cgroup_directory(mapping[key])
    when = []
    for j, text in enumerate(values.pop("when")):
        with _at(f"{where}.when[{j}]"):
            when.append(parse_condition(text, cgroup=values.get("cgroup"), **only))
    if not values["actions"]:
        raise _Invalid(f"{where}.actions", _RULE.missing["actions"])
    guard = KillGuard(**guard_values, dry_run=context.dry_run, procfs=context.host.procfs)
    rule = Rule(when=tuple(when), guard=guard, **values)
    for j, action in enumerate(rule.actions):
        for option in ("grace", "timeout"):
            needed = _action_time(action, option)
            deadline = rule.action_deadline
            if needed is not None and needed >= deadline:
                raise _Invalid(
                    f"{where}.actions[{j}].{option}",
                    f"{action.name}'s {option} of {needed:g}s does not fit in the rule's"
                    f" action_deadline of {deadline:g}s (over by {needed - deadline:g}s at least):"
                    f" raise action_deadline above {needed:g}s or shorten {option}",
                )
    return rule


def _action_time(action: Action, option: str) -> float | None:
    """How long a built-in action may wait inside its call: terminate's ``grace`` (SIGKILL must
    follow within the deadline) and a hook's ``timeout``."""
    if action.name in ("terminate", "prekill-hook"):
        value = getattr(action.options, option, None)
        return value if isinstance(value, float) else None
    return None

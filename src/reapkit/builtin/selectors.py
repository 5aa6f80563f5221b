"""The built-in selectors: how earlyoom, nohang, oomd, systemd-oomd and lmkd choose victims.

Every selector here is a :class:`~reapkit._plugins.Selector` with ``inline = True`` (trusted,
fast, non-blocking: called on the trio thread), an ``attrs`` frozen ``Options`` class that
validates everything when the policy loads (a bad regular expression fails then, not at the
moment of a kill), and a ``select`` that returns a **new** list of
:class:`~reapkit._plugins.Ranked`, best victim first, each with a one-line ``reason``.

Two sorts:

* **Filters** (``scope``, ``protect``) drop candidates and keep the others in their incoming
  order with their incoming score.
* **Scorers** (``oom-score``, ``largest-rss``, ``memory-growth``, ``prefer-avoid``,
  ``oom-score-adj-tiers``, ``cgroup-victims``, ``newest``, ``oldest``) reorder; the sort is
  stable, so candidates that tie keep the order the previous selector gave them. Some also
  filter (``oom-score-adj-tiers`` drops the tiers below ``min_adj``, ``cgroup-victims`` keeps
  one cgroup's members).

A process may vanish at any moment: the :class:`~reapkit._plugins.Situation` readers then return
``None`` or ``""`` and no selector raises for it. A filter that cannot tell whether a process is
protected (its ``oom_score_adj`` unreadable) drops it: it cannot be killed anyway.
"""

from __future__ import annotations

import errno
import logging
import math
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import attrs

from .._accounts import ID_MAX, account_id
from .._errors import InvalidValue, ReapkitError
from .._kernel._cgroups import CgroupMount, cgroup_mounts, mount_for, v2_mount
from .._patterns import Pattern, compile_pattern, first_match
from .._plugins import Candidate, Ranked, Selector, Situation
from .._procfs import OOM_SCORE_ADJ_MIN, in_subtree
from .._sources.psi import parse_pressure
from .._units import Size, parse_size

__all__ = [
    "BUILTIN_SELECTORS",
    "CgroupVictims",
    "LargestRss",
    "MemoryGrowth",
    "Newest",
    "Oldest",
    "OomScore",
    "OomScoreAdjTiers",
    "PreferAvoid",
    "Protect",
    "Scope",
]

log = logging.getLogger("reapkit.selectors")

_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: How many dropped or tied candidates a reason names before "and N more".
_NAMED_IN_REASON = 3


# -- option converters and validators ------------------------------------------------------------
# Converters are lenient (a single value becomes a one-element tuple, as a TOML author expects);
# validators check and name the option. attrs raises TypeError/ValueError, which make_options
# turns into a PluginError naming the plugin, the key path and the option.


def _as_tuple(value: object) -> tuple[Any, ...]:
    """A list (TOML array) becomes a tuple; a single value a one-element tuple."""
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(value)
    return (value,)


def _check_regexes(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(
                f"{attribute.name}: expected a list of regular expressions (strings),"
                f" got {pattern!r}"
            )
        try:
            compile_pattern(pattern)
        except InvalidValue as exc:
            raise ValueError(f"{attribute.name}: {exc}") from None


def _check_ints(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            raise ValueError(
                f"{attribute.name}: expected a list of non-negative integers, got {item!r}"
            )


def _check_cgroup_paths(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    for item in value:
        if not isinstance(item, str) or not item.startswith("/"):
            raise ValueError(
                f"{attribute.name}: expected cgroup paths starting with '/' (as"
                f" /proc/<pid>/cgroup shows them, e.g. '/user.slice'), got {item!r}"
            )


def _check_optional_pid(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"{attribute.name}: expected a process id (a positive integer), got {value!r}"
        )


def _check_bool(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name}: expected true or false, got {value!r}")


def _size_threshold(value: object) -> Size:
    if isinstance(value, Size):
        return value
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise TypeError(f"size_threshold: expected a size such as '50%' or '4GiB', got {value!r}")
    try:
        return parse_size(value)
    except InvalidValue as exc:
        raise ValueError(f"size_threshold: {exc}") from None


# -- shared helpers ------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    """``1288490188`` → ``"1.2 GiB"`` (for reasons)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _who(c: Candidate) -> str:
    # repr() of the comm: a hostile name such as "a) Z 1 (" or one with a newline stays one
    # quoted token in the reason.
    return f"pid {c.pid} {c.comm!r}"


def _named(items: Sequence[str]) -> str:
    """``"a; b; c and 4 more"``."""
    shown = "; ".join(items[:_NAMED_IN_REASON])
    more = len(items) - _NAMED_IN_REASON
    return f"{shown} and {more} more" if more > 0 else shown


def _fmt_score(x: float) -> str:
    """A score for a reason: ``1300``, ``-2.5``, ``314572800`` (never ``3.14573e+08``)."""
    return f"{x:.0f}" if x == int(x) else f"{x:.6g}"


def _place(i: int, n: int, best: str) -> str:
    return f"{best} of {n}" if i == 0 else f"#{i + 1} of {n}"


def _rank(
    ranked: Sequence[Ranked],
    key: Callable[[Ranked], float],
    describe: Callable[[Ranked, float], str],
    best: str,
    *,
    descending: bool = True,
) -> list[Ranked]:
    """Order by ``key`` (stable), score = key, reason = ``describe`` + the place.

    ``describe`` sees the ranked entry (its candidate, its score) and is called only when a
    reason is read: a ranking of 10,000 processes writes the one or two reasons shown."""
    keyed = [(key(r), r.candidate) for r in ranked]
    # sort() on the key alone, reverse=True: stable, equal keys keep their incoming order.
    keyed.sort(key=operator.itemgetter(0), reverse=descending)
    n = len(keyed)

    def why(r: Ranked, i: int) -> str:
        place = _place(i, n, best)
        tied = sum(1 for value, _ in keyed[1:] if value == keyed[0][0]) if i == 0 else 0
        if tied:
            place += f", tied with {tied} other{'s' if tied > 1 else ''}: kept incoming order"
        return f"{describe(r, r.score)} ({place})"

    explained = Ranked.explained
    return [explained(c, float(value), why, i) for i, (value, c) in enumerate(keyed)]


def _compile(patterns: Iterable[str]) -> tuple[Pattern, ...]:
    return tuple(compile_pattern(p) for p in patterns)


def _start_seconds(c: Candidate) -> float:
    return c.start_time / _CLK_TCK


# -- scope ---------------------------------------------------------------------------------------


@attrs.frozen
class ScopeOptions:
    """Which processes a rule may choose from. Options given together must all hold; within one
    option any listed value will do."""

    #: cgroup path prefixes, matched on whole components: ``/a`` covers ``/a`` and ``/a/b``,
    #: not ``/ab``.
    cgroup: tuple[str, ...] = attrs.field(
        default=(), converter=_as_tuple, validator=_check_cgroup_paths
    )
    #: Regular expressions (RE2, searched) on the cgroup path: for layouts whose prefix varies
    #: (a cgroup namespace, a container runtime's nesting).
    cgroup_regex: tuple[str, ...] = attrs.field(
        default=(), converter=_as_tuple, validator=_check_regexes
    )
    #: Real user ids.
    uid: tuple[int, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_ints)
    #: A process id: keep its descendants (not the process itself).
    subtree: int | None = attrs.field(default=None, validator=_check_optional_pid)

    def __attrs_post_init__(self) -> None:
        if not (self.cgroup or self.cgroup_regex or self.uid or self.subtree is not None):
            raise ValueError(
                "scope needs at least one of the options cgroup, cgroup_regex, uid, subtree"
            )


def _under(path: str, prefix: str) -> bool:
    return prefix in ("/", path) or path.startswith(prefix + "/")


class Scope(Selector):
    """Keep only the candidates in the given cgroups, of the given users, or under a process."""

    name: ClassVar[str] = "scope"
    Options: ClassVar[type[Any]] = ScopeOptions
    inline: ClassVar[bool] = True
    protective: ClassVar[bool] = True
    ranks: ClassVar[bool] = False
    options: ScopeOptions

    def __init__(self, options: ScopeOptions | None = None) -> None:
        super().__init__(options)
        self._prefixes = tuple(p.rstrip("/") or "/" for p in self.options.cgroup)
        self._cgroup_patterns = _compile(self.options.cgroup_regex)
        self._uids = frozenset(self.options.uid)

    def _in_subtree(
        self, situation: Situation, c: Candidate, root: int, memo: dict[int, bool]
    ) -> bool:
        """Whether ``root`` is an ancestor of ``c``, walking ``ppid`` through ``stat``."""
        if c.pid == root or c.ppid <= 0:
            return False
        # The candidate's own ppid is its snapshot's; its ancestors are read now (one that
        # vanished meanwhile had its children reparented: the chain ends there). The walk
        # starts at the parent, so the memo holds only answers read now, never a snapshot's.
        try:
            return in_subtree(c.ppid, root, lambda pid: situation.procfs.stat(pid).ppid, memo)
        except (ReapkitError, OSError):
            return False

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        o = self.options
        memo: dict[int, bool] = {}
        out = []
        for r in candidates:
            c = r.candidate
            why = []
            if self._prefixes:
                path = situation.cgroup(c)
                prefix = next((p for p in self._prefixes if path and _under(path, p)), None)
                if prefix is None:
                    continue
                why.append(f"cgroup {path} under {prefix}")
            if self._cgroup_patterns:
                path = situation.cgroup(c)
                match = first_match(self._cgroup_patterns, path) if path else None
                if match is None:
                    continue
                why.append(f"cgroup {path} matches {match.pattern!r}")
            if self._uids:
                uid = situation.uid(c)
                if uid not in self._uids:
                    continue
                why.append(f"uid {uid}")
            if o.subtree is not None:
                if not self._in_subtree(situation, c, o.subtree, memo):
                    continue
                why.append(f"descendant of pid {o.subtree}")
            out.append(Ranked(c, r.score, "in scope: " + ", ".join(why)))
        log.debug("scope kept %d of %d candidates", len(out), len(candidates))
        return out


# -- protect -------------------------------------------------------------------------------------


def _uid_spec(item: object) -> int | str:
    """A uid, a user name (resolved now) or a range ``"A-B"`` → a uid or ``"A-B"``."""
    if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= ID_MAX:
        return item
    if isinstance(item, str):
        low, dash, high = item.partition("-")
        if item.isascii() and item.isdigit():
            return _uid_spec(int(item))
        if dash and f"{low}{high}".isascii() and low.isdigit() and high.isdigit():
            if int(low) <= int(high) <= ID_MAX:
                return f"{int(low)}-{int(high)}"
        else:
            return account_id("user", item, key="uid")
    raise ValueError(f'uid: expected uids, user names or ranges such as "0-999", got {item!r}')


def _uids(value: object) -> tuple[int | str, ...]:
    return tuple(_uid_spec(item) for item in _as_tuple(value))


def _uid_ranges(specs: Iterable[int | str]) -> tuple[tuple[int, int], ...]:
    out = []
    for spec in specs:
        low, _, high = str(spec).partition("-")
        out.append((int(low), int(high or low)))
    return tuple(out)


@attrs.frozen
class Identity:
    """What a process cannot choose for itself: its real uid, its executable (as root reads
    ``/proc/<pid>/exe``, verified: see :meth:`Situation.exe`) and its cgroup. Every option
    given must match."""

    uid: tuple[int | str, ...] = attrs.field(default=(), converter=_uids)
    exe: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_regexes)
    cgroup: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_regexes)


def _identity(value: object) -> Identity | None:
    if value is None or isinstance(value, Identity):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"require: expected a table such as {{ uid = [0] }}, got {value!r}")
    unknown = sorted(set(value) - {"uid", "exe", "cgroup"})
    if unknown:
        raise ValueError(f"require: unknown key {unknown[0]!r} (keys: uid, exe, cgroup)")
    if not value:
        raise ValueError("require: name at least one of uid, exe, cgroup")
    try:
        return Identity(**value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"require.{exc}") from None


@attrs.frozen
class ProtectOptions:
    """Processes never to choose: any of ``comm``, ``cmdline``, ``exe``, ``cgroup`` (regular
    expressions, RE2, searched) or ``uid`` matching protects, and, with ``require``, only if
    the process also has that identity. Processes with ``oom_score_adj`` -1000 are always
    protected, whatever the options."""

    comm: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_regexes)
    cmdline: tuple[str, ...] = attrs.field(
        default=(), converter=_as_tuple, validator=_check_regexes
    )
    exe: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_regexes)
    cgroup: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_regexes)
    uid: tuple[int | str, ...] = attrs.field(default=(), converter=_uids)
    require: Identity | None = attrs.field(default=None, converter=_identity)

    def __attrs_post_init__(self) -> None:
        if self.require is not None and not (
            self.comm or self.cmdline or self.exe or self.cgroup or self.uid
        ):
            raise ValueError(
                "require narrows comm, cmdline, exe, cgroup or uid: give one of them (to"
                " protect by identity alone, write uid, exe or cgroup without require)"
            )


_Test = Callable[[Situation, Candidate], "str | None"]


def _read(situation: Situation, c: Candidate, field: str) -> str:
    if field == "comm":
        return c.comm
    if field == "cmdline":
        return situation.cmdline(c)
    if field == "exe":
        return situation.exe(c)
    return situation.cgroup(c)


def _tests(options: Any) -> tuple[_Test, ...]:
    """One test per option given: why a candidate matches it, or ``None``."""
    tests: list[_Test] = []
    for field in ("comm", "cmdline", "exe", "cgroup"):
        if patterns := _compile(getattr(options, field, ())):

            def test(s: Situation, c: Candidate, f: str = field, p: Any = patterns) -> str | None:
                text = _read(s, c, f)
                match = first_match(p, text)
                return None if match is None else f"{f} {text[:60]!r} matches {match.pattern!r}"

            tests.append(test)
    if ranges := _uid_ranges(options.uid):

        def uid_test(s: Situation, c: Candidate) -> str | None:
            uid = s.uid(c)
            return (
                f"uid {uid}" if uid is not None and any(a <= uid <= b for a, b in ranges) else None
            )

        tests.append(uid_test)
    return tuple(tests)


class Protect(Selector):
    """Drop protected processes: ``oom_score_adj`` -1000, and those matching an option (and,
    with ``require``, having that identity)."""

    name: ClassVar[str] = "protect"
    Options: ClassVar[type[Any]] = ProtectOptions
    inline: ClassVar[bool] = True
    protective: ClassVar[bool] = True
    ranks: ClassVar[bool] = False
    options: ProtectOptions

    def __init__(self, options: ProtectOptions | None = None) -> None:
        super().__init__(options)
        self._any = _tests(self.options)
        self._all = () if self.options.require is None else _tests(self.options.require)

    def _protection(self, situation: Situation, c: Candidate) -> str | None:
        """Why ``c`` is protected, or ``None``."""
        adj = situation.oom_score_adj(c)
        if adj is None:
            return "oom_score_adj unreadable (gone?)"
        if adj <= OOM_SCORE_ADJ_MIN:
            return "oom_score_adj -1000"
        why = next((w for test in self._any if (w := test(situation, c)) is not None), None)
        if why is None:
            return None
        identity = [test(situation, c) for test in self._all]
        if None in identity:
            log.debug("protect: %s: %s, but not the required identity", _who(c), why)
            return None
        return "; ".join([why, *identity])  # type: ignore[list-item]

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        kept: list[Ranked] = []
        dropped: list[str] = []
        for r in candidates:
            why = self._protection(situation, r.candidate)
            if why is None:
                kept.append(r)
            else:
                dropped.append(f"{_who(r.candidate)}: {why}")
                log.debug("protect: dropped %s: %s", _who(r.candidate), why)
        n = len(candidates)
        if dropped:
            summary = f"not protected (protected {len(dropped)} of {n}: {_named(dropped)})"
        else:
            summary = f"not protected (none of {n} protected)"
        return [Ranked(r.candidate, r.score, summary) for r in kept]


# -- oom-score, largest-rss, newest, oldest -----------------------------------------------------


class OomScore(Selector):
    """The kernel's choice: highest ``/proc/<pid>/oom_score`` first (earlyoom's default)."""

    name: ClassVar[str] = "oom-score"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        return _rank(
            candidates,
            lambda r: r.candidate.oom_score,
            lambda r, v: f"oom_score {int(v)}",
            "highest",
        )


@attrs.frozen
class LargestRssOptions:
    """Options of ``largest-rss``."""

    #: Count swapped-out memory (``VmSwap``) too: killing frees it as well.
    include_swap: bool = attrs.field(default=True, validator=_check_bool)


class LargestRss(Selector):
    """Largest resident set (plus swap) first."""

    name: ClassVar[str] = "largest-rss"
    Options: ClassVar[type[Any]] = LargestRssOptions
    inline: ClassVar[bool] = True
    options: LargestRssOptions

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        # Without swap (SwapTotal 0) no process has any: skip a status read per candidate.
        if not self.options.include_swap or situation.meminfo.swap_total == 0:
            return _rank(
                candidates,
                lambda r: r.candidate.rss,
                lambda r, v: f"RSS {_fmt_bytes(v)}",
                "largest",
            )
        swaps = {r.candidate.pid: situation.swap(r.candidate) or 0 for r in candidates}

        def describe(r: Ranked, v: float) -> str:
            swap = swaps[r.candidate.pid]
            rss = _fmt_bytes(r.candidate.rss)
            return f"RSS+swap {_fmt_bytes(v)} (RSS {rss}, swap {_fmt_bytes(swap)})"

        return _rank(
            candidates, lambda r: r.candidate.rss + swaps[r.candidate.pid], describe, "largest"
        )


class Newest(Selector):
    """The most recently started process first."""

    name: ClassVar[str] = "newest"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        return _rank(
            candidates,
            lambda r: r.candidate.start_time,
            lambda r, v: f"started {_start_seconds(r.candidate):.2f}s after boot",
            "newest",
        )


class Oldest(Selector):
    """The earliest started process first."""

    name: ClassVar[str] = "oldest"
    inline: ClassVar[bool] = True

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        return _rank(
            candidates,
            lambda r: r.candidate.start_time,
            lambda r, v: f"started {_start_seconds(r.candidate):.2f}s after boot",
            "oldest",
            descending=False,
        )


# -- memory-growth -------------------------------------------------------------------------------


@attrs.frozen
class MemoryGrowthOptions:
    """Options of ``memory-growth``."""

    #: Processes at least this large (``"50%"`` of MemTotal, or bytes such as ``"4GiB"``) come
    #: first, largest first; the others follow by growth rate.
    size_threshold: Size = attrs.field(default=Size(percent=50.0), converter=_size_threshold)


class MemoryGrowth(Selector):
    """oomd's ``kill_by_memory_size_or_growth``: a process above ``size_threshold`` first (by
    size), otherwise the one growing fastest.

    Stateful: the instance remembers each process's RSS (by pid and start time, so a reused pid
    starts afresh) and when it saw it; growth is measured since then. A process not seen before
    has growth 0. Processes absent from a call are forgotten.
    """

    name: ClassVar[str] = "memory-growth"
    Options: ClassVar[type[Any]] = MemoryGrowthOptions
    inline: ClassVar[bool] = True
    options: MemoryGrowthOptions

    def __init__(self, options: MemoryGrowthOptions | None = None) -> None:
        super().__init__(options)
        #: (pid, start_time) -> (rss, when seen)
        self._seen: dict[tuple[int, int], tuple[int, float]] = {}

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        threshold = self.options.size_threshold.resolve(situation.meminfo.total)
        limit = f"size_threshold {_fmt_bytes(threshold)}"
        if self.options.size_threshold.percent is not None:
            limit += f" ({self.options.size_threshold} of MemTotal)"
        now = situation.now
        seen: dict[tuple[int, int], tuple[int, float]] = {}
        large: list[Ranked] = []
        small: list[Ranked] = []
        growth: dict[int, tuple[float, str]] = {}
        for r in candidates:
            c = r.candidate
            key = (c.pid, c.start_time)
            before = self._seen.get(key)
            if before is None:
                rate, how = 0.0, "not seen before: growth counted as 0"
                seen[key] = (c.rss, now)
            elif now > before[1]:
                rate = (c.rss - before[0]) / (now - before[1])
                verb = "growing" if rate >= 0 else "shrinking"
                how = f"{verb} {_fmt_bytes(abs(rate))}/s over {now - before[1]:.2f}s"
                seen[key] = (c.rss, now)
            else:  # seen at this very moment: keep the older sample as the baseline
                rate, how = 0.0, "seen again at the same time: growth counted as 0"
                seen[key] = before
            growth[c.pid] = (rate, how)
            (large if c.rss >= threshold else small).append(r)
        self._seen = seen  # forget processes not seen in this call

        out = _rank(
            large,
            lambda r: r.candidate.rss,
            lambda r, v: f"RSS {_fmt_bytes(v)} at or above {limit}",
            "largest",
        )
        n_large = len(out)
        below = f"below {limit}" + (f", after {n_large} larger" if n_large else "")
        out += _rank(
            small,
            lambda r: growth[r.candidate.pid][0],
            lambda r, v: f"RSS {_fmt_bytes(r.candidate.rss)} {below}; {growth[r.candidate.pid][1]}",
            "fastest",
        )
        return out


# -- prefer-avoid --------------------------------------------------------------------------------


def _check_weight(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{attribute.name}: expected a positive number, got {value!r}")


@attrs.frozen
class PreferAvoidOptions:
    """earlyoom's ``--prefer``/``--avoid`` and nohang's badness adjustment by regex."""

    prefer: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_regexes)
    avoid: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_regexes)
    #: What the regexes are matched against (RE2, searched).
    field: Literal["comm", "cmdline", "both"] = attrs.field(
        default="comm", validator=attrs.validators.in_(("comm", "cmdline", "both"))
    )
    #: Added to the incoming score for a prefer match, subtracted for an avoid match.
    weight: float = attrs.field(default=1000, validator=_check_weight)


class PreferAvoid(Selector):
    """Add ``weight`` to the incoming score of preferred processes and subtract it from avoided
    ones, then reorder by score (put it after a scorer: ``oom-score`` gives earlyoom's
    behaviour). Each list counts once however many of its patterns match; every candidate is
    kept."""

    name: ClassVar[str] = "prefer-avoid"
    Options: ClassVar[type[Any]] = PreferAvoidOptions
    inline: ClassVar[bool] = True
    options: PreferAvoidOptions

    def __init__(self, options: PreferAvoidOptions | None = None) -> None:
        super().__init__(options)
        self._prefer = _compile(self.options.prefer)
        self._avoid = _compile(self.options.avoid)

    def _match(self, situation: Situation, c: Candidate, patterns: Sequence[Pattern]) -> str | None:
        if not patterns:
            return None
        field = self.options.field
        if field in ("comm", "both") and (m := first_match(patterns, c.comm)):
            return f"comm {c.comm!r} matches {m.pattern!r}"
        if field in ("cmdline", "both"):
            cmdline = situation.cmdline(c)
            if m := first_match(patterns, cmdline):
                return f"cmdline {cmdline[:60]!r} matches {m.pattern!r}"
        return None

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        w = self.options.weight
        scored = []
        for r in candidates:
            delta = 0.0
            notes = []
            if prefer := self._match(situation, r.candidate, self._prefer):
                delta += w
                notes.append(f"prefer: {prefer}")
            if avoid := self._match(situation, r.candidate, self._avoid):
                delta -= w
                notes.append(f"avoid: {avoid}")
            if notes:
                sign = "+" if delta >= 0 else "-"
                total = f"{_fmt_score(r.score)} {sign} {_fmt_score(abs(delta))}"
                why = f"{'; '.join(notes)}; score {total} = {_fmt_score(r.score + delta)}"
            else:
                why = f"no prefer/avoid match; score {_fmt_score(r.score)}"
            scored.append(Ranked(r.candidate, r.score + delta, why))
        scored.sort(key=lambda r: r.score, reverse=True)
        n = len(scored)
        return [
            Ranked(r.candidate, r.score, f"{r.reason} ({_place(i, n, 'highest')})")
            for i, r in enumerate(scored)
        ]


# -- oom-score-adj-tiers -------------------------------------------------------------------------


def _check_min_adj(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
        raise ValueError(
            f"{attribute.name}: expected an oom_score_adj from 0 to 1000, got {value!r}"
            " (tiers below 0 hold system and foreground processes)"
        )


@attrs.frozen
class OomScoreAdjTiersOptions:
    """Options of ``oom-score-adj-tiers``."""

    #: The lowest ``oom_score_adj`` that may be chosen (lmkd's lowest ``minfree`` level's adj).
    min_adj: int = attrs.field(default=0, validator=_check_min_adj)


class OomScoreAdjTiers(Selector):
    """Android lmkd: the highest non-empty ``oom_score_adj`` tier first, the biggest process
    (RSS) of a tier first; tiers below ``min_adj`` are dropped."""

    name: ClassVar[str] = "oom-score-adj-tiers"
    Options: ClassVar[type[Any]] = OomScoreAdjTiersOptions
    inline: ClassVar[bool] = True
    options: OomScoreAdjTiersOptions

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        tiers: dict[int, list[Ranked]] = {}
        for r in candidates:
            adj = situation.oom_score_adj(r.candidate)
            if adj is not None and adj >= self.options.min_adj:
                tiers.setdefault(adj, []).append(r)
        n_tiers = len(tiers)
        out: list[Ranked] = []
        for t, adj in enumerate(sorted(tiers, reverse=True)):
            tier = f"oom_score_adj {adj}: {_place(t, n_tiers, 'highest')} non-empty tiers"
            if t == 0:
                tier += f" at or above min_adj {self.options.min_adj}"
            members = sorted(tiers[adj], key=lambda r: r.candidate.rss, reverse=True)
            for i, r in enumerate(members):
                place = _place(i, len(members), "largest")
                reason = f"{tier}; RSS {_fmt_bytes(r.candidate.rss)} ({place} in the tier)"
                out.append(Ranked(r.candidate, float(adj), reason))
        return out


# -- cgroup-victims ------------------------------------------------------------------------------

_TRUE = frozenset({b"1", b"y", b"yes", b"true", b"on"})


def _check_root(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.startswith("/")):
        raise ValueError(f"{attribute.name}: expected an absolute directory path, got {value!r}")


@attrs.frozen
class CgroupVictimsOptions:
    """Options of ``cgroup-victims``."""

    #: How to choose the cgroup: ``"usage"`` (sum of its candidates' RSS) or ``"pressure"``
    #: (``memory.pressure`` ``some avg10``; ties by usage).
    by: Literal["usage", "pressure"] = attrs.field(
        default="usage", validator=attrs.validators.in_(("usage", "pressure"))
    )
    #: The directory standing for the cgroup root ``/`` (a cgroup path ``/a/b`` is then
    #: ``<cgroup_root>/a/b``); by default the memory hierarchy's mount from mountinfo.
    cgroup_root: str | None = attrs.field(default=None, validator=_check_root)
    #: Honour ``user.oomd_*`` xattrs only on root-owned cgroups (as systemd-oomd does): an
    #: unprivileged owner of a delegated cgroup must not shield itself.
    xattrs_root_only: bool = attrs.field(default=True, validator=_check_bool)


@attrs.frozen
class _Group:
    path: str
    members: list[Ranked]
    usage: int
    pressure: float | None
    preference: str | None  # "prefer", "avoid", "omit" or None


class CgroupVictims(Selector):
    """oomd and systemd-oomd: group the candidates by cgroup, choose one cgroup by usage or
    pressure, and return its members, largest RSS first.

    The cgroup directory's xattrs are honoured (``"1"``/``"yes"``/``"true"``/``"on"`` mean set):
    ``user.oomd_prefer`` is chosen before the others, ``user.oomd_avoid`` only when nothing
    else is left, ``user.oomd_omit`` never.
    """

    name: ClassVar[str] = "cgroup-victims"
    Options: ClassVar[type[Any]] = CgroupVictimsOptions
    inline: ClassVar[bool] = True
    options: CgroupVictimsOptions

    def __init__(self, options: CgroupVictimsOptions | None = None) -> None:
        super().__init__(options)
        self._mount: CgroupMount | None = None
        self._mount_looked_up = False

    def directory(self, path: str) -> str | None:
        """The directory of cgroup ``path``, or ``None`` where unknown."""
        root = self.options.cgroup_root
        if root is not None:
            return os.path.join(root, path.lstrip("/"))
        if not self._mount_looked_up:
            self._mount_looked_up = True
            try:
                mounts = cgroup_mounts()
            except OSError as exc:
                log.warning("cgroup-victims: cannot read the cgroup mounts: %s", exc)
                mounts = ()
            # Situation.cgroup() gives the v1 memory hierarchy's path where there is one.
            self._mount = mount_for("memory", mounts) or v2_mount(mounts)
        return None if self._mount is None else self._mount.directory(path)

    def _xattr(self, directory: str, name: str) -> bool:
        try:
            value = os.getxattr(directory, name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
                log.debug("cgroup-victims: %s of %s: %s", name, directory, exc)
            return False
        return value.strip(b"\0 \n").lower() in _TRUE

    def _preference(self, directory: str | None) -> str | None:
        if directory is None:
            return None
        if self.options.xattrs_root_only:
            try:
                if os.stat(directory).st_uid != 0:
                    return None
            except OSError:
                return None
        for pref in ("omit", "avoid", "prefer"):
            if self._xattr(directory, f"user.oomd_{pref}"):
                return pref
        return None

    @staticmethod
    def _pressure(directory: str | None) -> float | None:
        """``some avg10`` of ``memory.pressure``."""
        if directory is None:
            return None
        try:
            with open(os.path.join(directory, "memory.pressure"), "rb") as f:
                return parse_pressure(f.read(4096)).some.avg10
        except (OSError, InvalidValue):
            return None

    def select(self, situation: Situation, candidates: Sequence[Ranked]) -> list[Ranked]:
        by_path: dict[str, list[Ranked]] = {}
        for r in candidates:
            path = situation.cgroup(r.candidate)
            if path:  # "" : the process is gone
                by_path.setdefault(path, []).append(r)
        if not by_path:
            return []
        groups = []
        for path, members in by_path.items():
            directory = self.directory(path)
            groups.append(
                _Group(
                    path,
                    members,
                    sum(r.candidate.rss for r in members),
                    self._pressure(directory) if self.options.by == "pressure" else None,
                    self._preference(directory),
                )
            )

        usable = [g for g in groups if g.preference != "omit"]
        n_omitted = len(groups) - len(usable)
        preferred = [g for g in usable if g.preference == "prefer"]
        plain = [g for g in usable if g.preference is None]
        avoided = [g for g in usable if g.preference == "avoid"]
        if preferred:
            pool, why = preferred, f"user.oomd_prefer set ({len(preferred)} of {len(groups)})"
        elif plain:
            pool, why = plain, ""
        elif avoided:
            pool, why = avoided, f"every usable cgroup has user.oomd_avoid ({len(avoided)})"
        else:
            log.debug("cgroup-victims: all %d cgroups have user.oomd_omit", len(groups))
            return []

        if self.options.by == "pressure":
            pool = sorted(pool, key=lambda g: (g.pressure or 0.0, g.usage), reverse=True)
            chosen = pool[0]
            metric = (
                f"memory pressure some avg10 {chosen.pressure:.2f}"
                if chosen.pressure is not None
                else "memory.pressure unreadable (counted as 0)"
            )
            ranking = f"highest pressure of {len(pool)}"
        else:
            pool = sorted(pool, key=lambda g: g.usage, reverse=True)
            chosen = pool[0]
            metric = ""
            ranking = f"largest usage of {len(pool)}"
        notes = [n for n in (why, ranking) if n]
        if avoided and pool is not avoided:
            notes.append(f"{len(avoided)} with user.oomd_avoid skipped")
        if n_omitted:
            notes.append(f"{n_omitted} with user.oomd_omit skipped")
        head = (
            f"cgroup {chosen.path}: usage {_fmt_bytes(chosen.usage)} in"
            f" {len(chosen.members)} process{'es' if len(chosen.members) > 1 else ''}"
            + (f", {metric}" if metric else "")
            + f" ({'; '.join(notes)})"
        )
        return _rank(
            chosen.members,
            lambda r: r.candidate.rss,
            lambda r, v: f"{head}; RSS {_fmt_bytes(v)}",
            "largest",
        )


BUILTIN_SELECTORS: tuple[type[Selector], ...] = (
    Scope,
    Protect,
    OomScore,
    LargestRss,
    MemoryGrowth,
    PreferAvoid,
    OomScoreAdjTiers,
    CgroupVictims,
    Newest,
    Oldest,
)

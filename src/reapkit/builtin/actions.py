"""Built-in actions. None of them signals anything except through the kill guard
(``context.send_signal`` / ``context.guard``)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import string
import subprocess
from typing import Any, ClassVar

import attrs
import trio

from .._accounts import account_id, groups_of, may_execute
from .._errors import InvalidValue, ReapkitError
from .._guard import KillRefused, Refusal, RefusalReason, cgroup_members
from .._kernel._cgroups import cgroup_mounts, mount_for, v2_mount
from .._plugins import Action, ActionContext, Candidate, Ranked
from .._records import KillWarning
from .._sources._base import owned_fd
from .._units import parse_duration

log = logging.getLogger("reapkit.actions")


class LogAction(Action):
    """Log the chosen victim (at warning level) and what the rule saw."""

    name: ClassVar[str] = "log"
    inline: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        c = context.candidate
        log.warning(
            "rule %s chose %s (pid %d, rss %d MiB, oom_score %d)",
            context.rule.name,
            c.comm,
            c.pid,
            c.rss >> 20,
            c.oom_score,
        )
        return "logged"


#: The fields a ``warn`` message may use, with a value of each one's type (to try a format).
_WARN_FIELDS: dict[str, object] = {"name": "comm", "pid": 1, "rss_mib": 1, "rule": "rule"}
#: The widest field a message may ask for (``{name:>40}``).
_MAX_WIDTH = 256


def _check_message(_inst: object, _attr: object, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"message: expected a string, got {value!r}")
    known = ", ".join(f"{{{f}}}" for f in _WARN_FIELDS)
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"message: {exc} (write {{{{ and }}}} for braces)") from None
    for _text, field, spec, _conversion in fields:
        if field is None:
            continue
        if field not in _WARN_FIELDS:
            raise ValueError(f"message: unknown field {{{field}}} (fields: {known})")
        if "{" in (spec or "") or any(
            int(n) > _MAX_WIDTH for n in re.findall(r"[0-9]+", spec or "")
        ):
            raise ValueError(
                f"message: format spec {spec!r} of {{{field}}}: no nested fields, widths up to"
                f" {_MAX_WIDTH}"
            )
    try:
        value.format(**_WARN_FIELDS)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"message: {value!r} cannot be formatted: {exc}") from None


@attrs.frozen
class WarnOptions:
    message: str = attrs.field(
        default="memory is low: about to free memory by ending {name} ({pid})",
        validator=_check_message,
    )


class Warn(Action):
    """Tell every observer which process is about to be ended (desktop notifications, chat
    messages): ``message`` may use ``{name}``, ``{pid}``, ``{rss_mib}`` and ``{rule}``."""

    name: ClassVar[str] = "warn"
    Options: ClassVar[type[Any]] = WarnOptions
    inline: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        c = context.candidate
        text = self.options.message.format(
            name=c.comm, pid=c.pid, rss_mib=c.rss >> 20, rule=context.rule.name
        )
        if context.warn_observers is None:
            return "no observers"
        victim = context.situation.victim(c)
        dry = not context.guard.signals_enabled
        await context.warn_observers(
            KillWarning(trio.current_time(), context.rule.name, victim, text, dry_run=dry)
        )
        return f"warned{' (dry-run)' if dry else ''}: {text}"


def _argv(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidValue(
            f"command must be a list of strings (program and arguments), not {value!r}:"
            f" write [{value!r}]"
        )
    return tuple(value)


#: The hook's PATH when the daemon has none.
_HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _user(value: object) -> int | None:
    return None if value is None else account_id("user", value)


def _group(value: object) -> int | None:
    return None if value is None else account_id("group", value)


@attrs.frozen
class HookOptions:
    #: The command and its arguments (no shell).
    command: tuple[str, ...] = attrs.field(converter=_argv)
    #: After this long the hook's whole process group is killed.
    timeout: float = attrs.field(default=5.0, converter=parse_duration)
    #: Run as this user and group (names, resolved when the policy loads, or ids) instead of
    #: the daemon's (root's).
    user: int | None = attrs.field(default=None, converter=_user)
    group: int | None = attrs.field(default=None, converter=_group)
    #: Run it in dry-run too (with ``REAPKIT_DRY_RUN=1``). Off: a dry run changes nothing.
    run_in_dry_run: bool = False

    @command.validator
    def _non_empty(self, _attribute: object, value: tuple[str, ...]) -> None:
        if not value or not all(isinstance(a, str) and "\0" not in a for a in value):
            raise InvalidValue("command must be a non-empty list of strings (without NUL)")

    def __attrs_post_init__(self) -> None:
        program = shutil.which(self.command[0], path=os.environ.get("PATH", _HOOK_PATH))
        uid, (gid, groups) = os.getuid(), (os.getgid(), tuple(os.getgroups()))
        if self.user is not None:
            uid, (gid, groups) = self.user, groups_of(self.user, self.group)
        elif self.group is not None:
            gid, groups = self.group, (self.group,)
        if program is None or not may_execute(program, uid, {gid, *groups}):
            raise InvalidValue(
                f"command: program {self.command[0]!r} not found or not executable by uid {uid}"
            )

    def credentials(self) -> dict[str, Any]:
        """``subprocess.Popen``'s ``user``, ``group`` and ``extra_groups``: a hook run as another
        user gets that user's groups, not the daemon's."""
        if self.user is not None:
            gid, groups = groups_of(self.user, self.group)
            return {"user": self.user, "group": gid, "extra_groups": list(groups)}
        if self.group is not None:
            return {"group": self.group, "extra_groups": [self.group]}
        return {}


# The daemon runs with oom_score_adj -1000 and maybe a raised priority: the hook must not.
# Done by a tiny exec wrapper, not preexec_fn (not safe once the reaper's threads run).
# renice -n sets the nice value (nice -n would add to the daemon's -20).
# Then, where util-linux setpriv exists, the hook dies with the daemon, even SIGKILLed: a
# supervising shell gets SIGTERM as its parent-death signal (armed after the switch of user,
# which clears it) and kills the hook's whole group; if the daemon died before it was armed,
# the parent is no longer the daemon and it kills the group at once.
_HOOK_WRAPPER = """renice -n 0 -p $$ >/dev/null 2>&1; echo 0 > /proc/self/oom_score_adj || exit 126
command -v setpriv >/dev/null 2>&1 || exec "$0" "$@"
exec setpriv --pdeathsig TERM -- /bin/sh -c '
trap "kill -KILL 0" TERM
[ "$PPID" = "$1" ] || kill -KILL 0
shift
"$@" &
wait $!' sh "$PPID" "$0" "$@"
"""


async def _wait(process: subprocess.Popen[bytes]) -> int:
    with owned_fd(os.pidfd_open(process.pid)) as pidfd:  # our child: its PID stays until waited
        await trio.lowlevel.wait_readable(pidfd)
    return process.wait()


class PrekillHook(Action):
    """Run a command before the kill, in its own session, with a minimal environment
    (``PATH``, ``REAPKIT_PID``, ``REAPKIT_NAME``, ``REAPKIT_RULE``, ``REAPKIT_RSS``,
    ``REAPKIT_DRY_RUN``), ``oom_score_adj`` 0, optionally as another ``user``/``group``,
    its whole process group killed after ``timeout``. Skipped in dry-run unless
    ``run_in_dry_run``."""

    name: ClassVar[str] = "prekill-hook"
    Options: ClassVar[type[Any]] = HookOptions

    async def act(self, context: ActionContext) -> str:
        dry = not context.guard.signals_enabled
        if dry and not self.options.run_in_dry_run:
            return "dry-run: hook not run"
        c = context.candidate
        env = {
            "PATH": os.environ.get("PATH", _HOOK_PATH),
            "REAPKIT_PID": str(c.pid),
            "REAPKIT_NAME": c.comm,
            "REAPKIT_RULE": context.rule.name,
            "REAPKIT_RSS": str(c.rss),
            "REAPKIT_DRY_RUN": "1" if dry else "0",
        }
        # Forked on the trio thread, which lives as long as the daemon: the parent-death
        # signal follows the thread that forked (prctl(2)), and trio.lowlevel.open_process
        # forks on a worker thread that ends when idle.
        process = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec, no waiting
            ["/bin/sh", "-c", _HOOK_WRAPPER, *self.options.command],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **self.options.credentials(),
        )
        try:
            with trio.move_on_after(self.options.timeout):
                return f"hook exited with {await _wait(process)}"
        finally:
            if process.returncode is None:  # timed out or cancelled: the hook's whole group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await _wait(process)
        return f"hook killed after {self.options.timeout:g} s"


@attrs.frozen
class TerminateOptions:
    #: How long the victim gets to exit after SIGTERM before SIGKILL.
    grace: float = attrs.field(default=2.0, converter=parse_duration)


#: ``terminate`` sends SIGKILL this long before its deadline when the grace would outlast it.
KILL_MARGIN = 0.05


class Terminate(Action):
    """SIGTERM, wait for the exit on the pidfd for ``grace`` (cut to end just before the
    action's deadline), then SIGKILL."""

    name: ClassVar[str] = "terminate"
    Options: ClassVar[type[Any]] = TerminateOptions
    inline: ClassVar[bool] = True
    signals: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        context.send_signal(signal.SIGTERM)
        if context.dry_run:
            return "dry-run: would send SIGTERM, then SIGKILL after the grace period"
        left = trio.current_effective_deadline() - trio.current_time() - KILL_MARGIN
        grace = max(0.0, min(self.options.grace, left))
        if await context.wait_exit(grace):
            return "exited after SIGTERM"
        try:
            context.send_signal(signal.SIGKILL)
        except KillRefused as exc:
            if exc.refusal.reason is RefusalReason.GONE:  # it began to exit at the last moment
                return "exiting at the end of the grace period: no SIGKILL needed"
            raise
        cut = "" if grace == self.options.grace else " (the grace cut to the action's deadline)"
        return f"no exit within {grace:g} s of SIGTERM{cut}: sent SIGKILL"


class Kill(Action):
    """SIGKILL."""

    name: ClassVar[str] = "kill"
    inline: ClassVar[bool] = True
    signals: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        outcome = context.send_signal(signal.SIGKILL)
        return f"SIGKILL {outcome.value}"


class CgroupKill(Action):
    """Kill the victim's whole cgroup: ``cgroup.kill`` on v2 inside a cgroup scope, else every
    member through its pidfd. The guard checks every member first."""

    name: ClassVar[str] = "cgroup-kill"
    inline: ClassVar[bool] = True
    signals: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        path = context.situation.cgroup(context.candidate)
        mounts = cgroup_mounts()
        mount = mount_for("memory", mounts) or v2_mount(mounts)
        directory = mount.directory(path) if mount else None
        if not path or path == "/" or directory is None:
            raise InvalidValue(f"the victim's cgroup {path!r} cannot be killed as a whole")
        # The guard checks what it knows (scope, -1000, PID 1, the reaper); the rule's own
        # protections (its protective selectors) must hold for every member too.
        spared = await _protected_members(context, directory)
        if spared:
            pid, why = spared[0]
            raise KillRefused(
                Refusal(pid, RefusalReason.PROTECTED, f"{why}; member of {directory}")
            )
        outcome = context.guard.kill_cgroup(directory)
        context.mark("signal_sent")
        context.killed = True
        context.dry_run = context.dry_run or outcome.value == "dry-run"
        return f"cgroup {directory}: {outcome.value}"


async def _protected_members(context: ActionContext, directory: str) -> list[tuple[int, str]]:
    """Members of ``directory`` that a protective selector of the rule would spare (called by
    the engine, as in the decision; one that fails refuses the kill)."""
    if not context.rule.protects:
        return []
    procfs = context.situation.procfs
    candidates = []
    for pid in cgroup_members(directory):
        with contextlib.suppress(ReapkitError):
            candidates.append(Ranked(Candidate.from_info(procfs.process_info(pid))))
    kept = {r.candidate.pid for r in await context.protected(candidates)}
    return [
        (r.candidate.pid, f"{r.candidate.comm!r} is protected by the rule")
        for r in candidates
        if r.candidate.pid not in kept
    ]


class Reap(Action):
    """``process_mrelease`` on a reaper thread — only after SIGKILL. If every reaper is busy
    the victim is left to free its own memory (counted, as lmkd does)."""

    name: ClassVar[str] = "reap"
    inline: ClassVar[bool] = True
    needs_reap_stage: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        if context.dry_run:
            return "dry-run: would reap"
        if not context.killed:
            return "skipped: no SIGKILL was sent (the victim exited or was not killed)"
        if not context.can_reap:
            return "skipped: no reap stage"
        result = await context.reap()
        if result is None:
            return "skipped: every reaper thread was busy"
        return f"{result.outcome} in {result.duration * 1000:.1f} ms on {result.thread}"


BUILTIN_ACTIONS: tuple[type[Action], ...] = (
    LogAction,
    Warn,
    PrekillHook,
    Terminate,
    Kill,
    CgroupKill,
    Reap,
)

"""Built-in actions. None of them signals anything except through the kill guard
(``context.send_signal`` / ``context.guard``)."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
from typing import Any, ClassVar

import attrs
import trio

from .._engine import ActionContext
from .._errors import InvalidValue
from .._kernel._cgroups import cgroup_mounts, mount_for, v2_mount
from .._plugins import Action
from .._records import KillWarning
from .._sources.pidfd import wait_exit
from .._units import parse_duration

log = logging.getLogger("reapkit.actions")


def _duration(value: Any) -> float:
    seconds = parse_duration(value)
    if not 0 <= seconds < math.inf:
        raise InvalidValue(f"{value!r} is not a usable duration")
    return seconds


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


@attrs.frozen
class WarnOptions:
    message: str = "memory is low: about to free memory by ending {name} ({pid})"


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
        if context.notify is None:
            return "no observers"
        victim = context.situation.victim(c)
        await context.notify(KillWarning(trio.current_time(), context.rule.name, victim, text))
        return f"warned: {text}"


@attrs.frozen
class HookOptions:
    #: The command and its arguments (no shell).
    command: tuple[str, ...] = attrs.field(converter=tuple)
    #: Killed after this long (its own process group, by its Popen).
    timeout: float = attrs.field(default=5.0, converter=_duration)

    @command.validator
    def _non_empty(self, _attribute: object, value: tuple[str, ...]) -> None:
        if not value or not all(isinstance(a, str) for a in value):
            raise InvalidValue("command must be a non-empty list of strings")


def _hook_preexec() -> None:
    # The daemon runs with oom_score_adj -1000; its hooks must stay killable.
    with open("/proc/self/oom_score_adj", "w", encoding="ascii") as f:
        f.write("0")


class PrekillHook(Action):
    """Run a command before the kill, with ``REAPKIT_PID``, ``REAPKIT_NAME``, ``REAPKIT_RULE``,
    ``REAPKIT_RSS`` and ``REAPKIT_DRY_RUN`` in its environment, under a timeout and with
    ``oom_score_adj`` 0."""

    name: ClassVar[str] = "prekill-hook"
    Options: ClassVar[type[Any]] = HookOptions

    async def act(self, context: ActionContext) -> str:
        c = context.candidate
        env = dict(
            os.environ,
            REAPKIT_PID=str(c.pid),
            REAPKIT_NAME=c.comm,
            REAPKIT_RULE=context.rule.name,
            REAPKIT_RSS=str(c.rss),
            REAPKIT_DRY_RUN="1" if not context.guard.signals_enabled else "0",
        )
        process = await trio.lowlevel.open_process(
            list(self.options.command),
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_hook_preexec,
        )
        try:
            with trio.move_on_after(self.options.timeout):
                code = await process.wait()
                return f"hook exited with {code}"
        finally:
            if process.returncode is None:  # timed out or cancelled: our own child, by Popen
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
        return f"hook killed after {self.options.timeout:g} s"


@attrs.frozen
class TerminateOptions:
    #: How long the victim gets to exit after SIGTERM before SIGKILL.
    grace: float = attrs.field(default=2.0, converter=_duration)


class Terminate(Action):
    """SIGTERM, wait for the exit on the pidfd for ``grace``, then SIGKILL."""

    name: ClassVar[str] = "terminate"
    Options: ClassVar[type[Any]] = TerminateOptions
    inline: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        context.send_signal(signal.SIGTERM)
        if context.dry_run:
            return "dry-run: would send SIGTERM, then SIGKILL after the grace period"
        if await wait_exit(context.ref, timeout=self.options.grace):
            context.mark("exit_seen")
            return "exited after SIGTERM"
        context.send_signal(signal.SIGKILL)
        return f"no exit within {self.options.grace:g} s of SIGTERM: sent SIGKILL"


class Kill(Action):
    """SIGKILL."""

    name: ClassVar[str] = "kill"
    inline: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        outcome = context.send_signal(signal.SIGKILL)
        return f"SIGKILL {outcome.value}"


class CgroupKill(Action):
    """Kill the victim's whole cgroup: ``cgroup.kill`` on v2 inside a cgroup scope, else every
    member through its pidfd. The guard checks every member first."""

    name: ClassVar[str] = "cgroup-kill"
    inline: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        path = context.situation.cgroup(context.candidate)
        mounts = cgroup_mounts()
        mount = mount_for("memory", mounts) or v2_mount(mounts)
        directory = mount.directory(path) if mount else None
        if not path or path == "/" or directory is None:
            raise InvalidValue(f"the victim's cgroup {path!r} cannot be killed as a whole")
        outcome = context.guard.kill_cgroup(directory)
        context.mark("signal_sent")
        context.killed = True
        context.dry_run = context.dry_run or outcome.value == "dry-run"
        return f"cgroup {directory}: {outcome.value}"


class Reap(Action):
    """``process_mrelease`` on a reaper thread — only after SIGKILL. If every reaper is busy
    the victim is left to free its own memory (counted, as lmkd does)."""

    name: ClassVar[str] = "reap"
    inline: ClassVar[bool] = True

    async def act(self, context: ActionContext) -> str:
        if context.dry_run:
            return "dry-run: would reap"
        if not context.killed:
            return "skipped: no SIGKILL was sent (the victim exited or was not killed)"
        if context.reaper is None:
            return "skipped: no reap stage"
        result = await context.reaper.reap_or_skip(context.ref)
        if result is None:
            return "skipped: every reaper thread was busy"
        # The reaper thread's own times, already on the trio clock.
        context.timeline["reap_started"] = result.started
        context.timeline["reap_finished"] = result.finished
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

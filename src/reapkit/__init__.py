"""reapkit: a trio framework for user-space out-of-memory reapers on Linux.

Public names only; the code lives in private modules (trio's style). Kernel-level pieces are
in :mod:`reapkit.lowlevel`.

Each name is imported from its module the first time it is used (PEP 562), so ``import
reapkit`` costs a few milliseconds and loads neither trio nor the engine; a plugin that uses
only the plugin layer's names does not load the reaper's. Type checkers read the imports
below as plain re-exports.
"""

import importlib as _importlib
import typing as _typing

from . import _hangup  # noqa: F401 - first: under `python -m reapkit`, SIGHUP is ignored now
from ._version import __version__ as __version__

if _typing.TYPE_CHECKING:
    from ._errors import AccessDenied as AccessDenied
    from ._errors import InvalidValue as InvalidValue
    from ._errors import NoSuchProcess as NoSuchProcess
    from ._errors import NotDying as NotDying
    from ._errors import PolicyError as PolicyError
    from ._errors import ProcessChanged as ProcessChanged
    from ._errors import ProcFormatError as ProcFormatError
    from ._errors import ReapkitError as ReapkitError
    from ._errors import Unsupported as Unsupported
    from ._guard import CgroupScope as CgroupScope
    from ._guard import KillGuard as KillGuard
    from ._guard import KillRefused as KillRefused
    from ._guard import Refusal as Refusal
    from ._guard import RefusalReason as RefusalReason
    from ._guard import Scope as Scope
    from ._guard import SignalOutcome as SignalOutcome
    from ._guard import SubtreeScope as SubtreeScope
    from ._guard import SystemScope as SystemScope
    from ._plugins import Action as Action
    from ._plugins import ActionContext as ActionContext
    from ._plugins import Candidate as Candidate
    from ._plugins import ManualTrigger as ManualTrigger
    from ._plugins import NoOptions as NoOptions
    from ._plugins import Observer as Observer
    from ._plugins import PluginError as PluginError
    from ._plugins import PluginRegistry as PluginRegistry
    from ._plugins import Ranked as Ranked
    from ._plugins import Selector as Selector
    from ._plugins import Situation as Situation
    from ._plugins import Trigger as Trigger
    from ._plugins import register as register
    from ._plugins import selector as selector
    from ._policy import DEFAULT_POLICY as DEFAULT_POLICY
    from ._policy import Policy as Policy
    from ._policy import load_policy as load_policy
    from ._process import ProcessRef as ProcessRef
    from ._reaper import OutputCounters as OutputCounters
    from ._reaper import Reaper as Reaper
    from ._reaper import ReaperStatistics as ReaperStatistics
    from ._reaper import open_reaper as open_reaper
    from ._reaper import serve_reaper as serve_reaper
    from ._records import ActionStep as ActionStep
    from ._records import KillRecord as KillRecord
    from ._records import KillWarning as KillWarning
    from ._records import SelectorStep as SelectorStep
    from ._records import Timeline as Timeline
    from ._records import Victim as Victim

#: Each public name's private module (the same imports as above, resolved on first use).
_PUBLIC: dict[str, tuple[str, ...]] = {
    "._errors": (
        "AccessDenied",
        "InvalidValue",
        "NoSuchProcess",
        "NotDying",
        "PolicyError",
        "ProcessChanged",
        "ProcFormatError",
        "ReapkitError",
        "Unsupported",
    ),
    "._guard": (
        "CgroupScope",
        "KillGuard",
        "KillRefused",
        "Refusal",
        "RefusalReason",
        "Scope",
        "SignalOutcome",
        "SubtreeScope",
        "SystemScope",
    ),
    "._plugins": (
        "Action",
        "ActionContext",
        "Candidate",
        "ManualTrigger",
        "NoOptions",
        "Observer",
        "PluginError",
        "PluginRegistry",
        "Ranked",
        "Selector",
        "Situation",
        "Trigger",
        "register",
        "selector",
    ),
    "._policy": ("DEFAULT_POLICY", "Policy", "load_policy"),
    "._process": ("ProcessRef",),
    "._reaper": ("OutputCounters", "Reaper", "ReaperStatistics", "open_reaper", "serve_reaper"),
    "._records": ("ActionStep", "KillRecord", "KillWarning", "SelectorStep", "Timeline", "Victim"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = ["__version__", *_HOME]  # noqa: PLE0604 - the names resolve through __getattr__


def __getattr__(name: str) -> object:
    try:
        module = _HOME[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})

"""The built-in plugins, registered under ``source="built-in"``.

:func:`register_builtins` (or :func:`ensure_registered`, for the default registry) adds the
selectors (:mod:`reapkit.builtin.selectors`) and the actions (:mod:`reapkit.builtin.actions`)
to a :class:`~reapkit._plugins.PluginRegistry`.
"""

from __future__ import annotations

from .._plugins import Plugin, PluginRegistry, default_registry
from .selectors import BUILTIN_SELECTORS as BUILTIN_SELECTORS

__all__ = ["BUILTIN_SELECTORS", "builtin_plugins", "ensure_registered", "register_builtins"]


def builtin_plugins() -> tuple[type[Plugin], ...]:
    """Every built-in plugin class: the selectors, then the actions."""
    # Imported here, not at the top: the actions import the engine, and the engine may import
    # the selectors (its fallback), so a top-level import would be a cycle.
    from .actions import BUILTIN_ACTIONS  # noqa: PLC0415

    return (*BUILTIN_SELECTORS, *BUILTIN_ACTIONS)


def register_builtins(registry: PluginRegistry) -> tuple[type[Plugin], ...]:
    """Register every built-in plugin in ``registry``; returns them.

    Registering again is harmless (the registry accepts the same class again under its name).
    """
    plugins = builtin_plugins()
    for cls in plugins:
        registry.register(cls, source="built-in")
    return plugins


_ENTRY_POINTS_FOUND: set[int] = set()


def ensure_registered(registry: PluginRegistry | None = None) -> None:
    """Make sure the built-ins are in ``registry`` (the default registry when ``None``) and,
    for the default registry, the installed plugins of the ``reapkit.plugins`` entry-point
    group (once per process). Those are imported when a policy first names them, or when
    they are listed; one that fails to load is logged and listed by ``reapkit plugins``, the
    others still load."""
    target = default_registry if registry is None else registry
    register_builtins(target)
    if target is default_registry and id(target) not in _ENTRY_POINTS_FOUND:
        _ENTRY_POINTS_FOUND.add(id(target))
        target.discover_entry_points()

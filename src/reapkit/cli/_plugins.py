"""``reapkit plugins [--json]``: every installed plugin, built-in and from entry points.

A plugin that fails to load is listed with its error; the others are still listed (and still
usable), and the exit status is 0: a broken third-party package is something to see, not a
reason for the listing to fail (pluggy's ``load_setuptools_entrypoints`` behaves the same).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from typing import TYPE_CHECKING, Any

import attrs

from .._plugins import ENTRY_POINT_GROUP, PluginInfo, PluginRegistry, default_registry
from ..builtin import ensure_registered
from ._status import EXIT_OK, extra_missing

if TYPE_CHECKING:  # rich comes with the cli extra: imported by the table alone, not by --json
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "plugins",
        help="list every installed plugin: built-in and entry-point, kind, options, source",
        description="List every plugin a policy can use: the built-ins and those advertised in"
        f" the '{ENTRY_POINT_GROUP}' entry-point group, with their kind, options (and"
        " defaults) and the distribution that supplied them. A plugin that fails to load is"
        " listed with its error; the others still work. Exit 0.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array, one object a plugin")
    p.set_defaults(run=run)


@attrs.frozen
class OptionInfo:
    """One option of a plugin: its name, its declared type and its default."""

    name: str
    #: The annotation as written (``"float"``, ``"tuple[str, ...]"``), or ``None``.
    type: str | None
    required: bool
    #: The default value (a factory's result); meaningless when ``required``.
    default: Any = None


@attrs.frozen
class PluginEntry:
    """What the command shows for one plugin."""

    name: str
    kind: str
    #: ``"built-in"``, ``"code"`` or the distribution that supplied it.
    source: str
    options: tuple[OptionInfo, ...]
    #: ``module:QualifiedName`` of the class, or ``None`` for one that failed to load.
    object: str | None
    #: The first paragraph of the class's docstring, as one line.
    summary: str
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "options": [
                {
                    "name": o.name,
                    "type": o.type,
                    "required": o.required,
                    "default": None if o.required else _jsonable(o.default),
                }
                for o in self.options
            ],
            "object": self.object,
            "summary": self.summary,
            "error": self.error,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf or nan
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)  # e.g. a Size: its own notation ("50%")


def _type_name(annotation: Any) -> str | None:
    if annotation is None or isinstance(annotation, str):  # strings under postponed annotations
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation)


def _options(options_cls: type[Any]) -> tuple[OptionInfo, ...]:
    found = []
    for field in attrs.fields(options_cls):
        if not field.init:
            continue
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            factory: Any = default
            required, value = False, (None if factory.takes_self else factory.factory())
        else:
            required, value = default is attrs.NOTHING, default
        found.append(OptionInfo(field.name.lstrip("_"), _type_name(field.type), required, value))
    return tuple(found)


def entry(info: PluginInfo) -> PluginEntry:
    """A registry's :class:`PluginInfo` with the details the command shows."""
    cls = info.plugin
    if cls is None:
        return PluginEntry(info.name, info.kind, info.source, (), None, "", info.error)
    # The first paragraph of the docstring, as one line.
    summary = " ".join((inspect.getdoc(cls) or "").strip().split("\n\n")[0].split())
    return PluginEntry(
        info.name,
        info.kind,
        info.source,
        _options(cls.Options),
        f"{cls.__module__}:{cls.__qualname__}",
        summary,
        info.error,
    )


def collect(registry: PluginRegistry | None = None) -> list[PluginEntry]:
    """The built-ins and every entry-point plugin, registered into ``registry`` (the default
    registry, as ``reapkit run`` sees it, when ``None``); failures are listed, not raised."""
    registry = default_registry if registry is None else registry
    ensure_registered(registry)
    registry.load_entry_points()
    return [entry(info) for info in registry.plugins()]


def _show_default(value: Any) -> str:
    if value is None or isinstance(value, bool | int | float | str | tuple | list):
        return repr(value)
    return str(value)


def _describe_options(options: tuple[OptionInfo, ...]) -> Text:
    from rich.text import Text  # noqa: PLC0415 - the cli extra

    if not options:
        return Text("—", style="dim")
    return Text(
        ", ".join(
            f"{o.name} (required)" if o.required else f"{o.name}={_show_default(o.default)}"
            for o in options
        )
    )


def render(entries: list[PluginEntry]) -> Table:
    """The human listing: a table, failures in red where their options would be."""
    from rich.table import Table  # noqa: PLC0415 - the cli extra
    from rich.text import Text  # noqa: PLC0415

    failed = sum(1 for e in entries if e.error is not None)
    caption = (
        f"{failed} plugin{'s' if failed != 1 else ''} failed to load; the others are usable."
        if failed
        else None
    )
    table = Table(title="reapkit plugins", caption=caption, title_justify="left")
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("kind", no_wrap=True)
    table.add_column("options (default)")
    table.add_column("source")
    for e in entries:
        if e.error is not None:
            options = Text(f"failed to load: {e.error}", style="red")
        else:
            options = _describe_options(e.options)
        table.add_row(Text(e.name), Text(e.kind), options, Text(e.source))
    return table


def run(
    args: argparse.Namespace,
    *,
    registry: PluginRegistry | None = None,
    console: Console | None = None,
) -> int:
    entries = collect(registry)
    if args.json:
        print(json.dumps([e.as_json() for e in entries], indent=2))
        return EXIT_OK
    try:
        from rich.console import Console  # noqa: PLC0415 - the cli extra
    except ModuleNotFoundError as exc:
        raise extra_missing("plugins", exc, " (or use --json)") or exc from None
    (console or Console()).print(render(entries))
    return EXIT_OK

"""The layers of the package (docs/architecture.md, "Layers"): a module imports only from its
own layer and those below it, and no imports go round in a cycle. Read from the source with
``ast`` (every import, also those under ``TYPE_CHECKING`` and inside functions), so nothing
is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import reapkit

SRC = Path(reapkit.__file__).parent

#: Bottom to top. A module is in the layer of its longest listed prefix (``_kernel`` holds
#: ``_kernel._probe``); ``""`` is the package itself.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("base", frozenset({
        "_errors", "_records", "_units", "_version", "_hangup", "_interrupts", "_sd_notify",
        "_heartbeat", "_accounts", "_patterns", "_trace",
    })),
    ("kernel", frozenset({"_kernel", "_procfs"})),
    ("processes and events", frozenset({"_process", "_sources", "_table"})),
    ("guard, conditions, reap stage", frozenset({"_conditions", "_guard", "_reap_stage"})),
    ("plugin API", frozenset({"_plugins"})),
    ("built-in plugins", frozenset({"builtin"})),
    ("engine", frozenset({"_engine"})),
    ("policy", frozenset({"_policy"})),
    ("reaper, recorder", frozenset({"_reaper", "_recorder"})),
    ("public modules, command line, replay, test helpers", frozenset({
        "", "__main__", "lowlevel", "asyncio", "units", "testing", "cli", "_guest", "_testing",
        "_replay",
    })),
)  # fmt: skip


def _name(path: Path, root: Path = SRC) -> str:
    """``reapkit/_kernel/_probe.py`` -> ``_kernel._probe``; the package itself is ``""``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str], root: Path = SRC) -> set[str]:
    """The package's modules that ``path`` imports."""
    name = _name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:  # `from . import x`: a module, or a name of the package
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reapkit"):
            found.add(str(node.module).removeprefix("reapkit").lstrip("."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "reapkit" or alias.name.startswith("reapkit."):
                    found.add(alias.name.removeprefix("reapkit").lstrip("."))
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    paths = {_name(p): p for p in SRC.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _layer(module: str) -> int:
    """The index in LAYERS of the longest prefix that holds ``module``."""
    holds = [
        (len(prefix), index)
        for index, (_title, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(f"{prefix}.") or not prefix
    ]
    return max(holds)[1]


def test_every_module_has_a_layer() -> None:
    graph = _graph()
    assert "_plugins" in graph and "builtin.actions" in graph  # the walk found the package
    listed = {p for _title, prefixes in LAYERS for p in prefixes}
    unlisted = [
        m for m in graph if m and not any(m == p or m.startswith(f"{p}.") for p in listed if p)
    ]
    assert not unlisted, f"add these modules to a layer in LAYERS (and docs): {unlisted}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})"
        for module, deps in sorted(_graph().items())
        for dep in sorted(deps)
        if _layer(dep) > _layer(module)
    ]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            cycle = " -> ".join((*path[path.index(module) :], module))
            raise AssertionError(f"an import cycle: {cycle}")
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The parser itself: a plugin-layer module that imports the engine is caught.
    source = tmp_path / "_plugins.py"
    source.write_text("from ._engine import Engine\nif 1:\n    from . import builtin\n")
    assert _imports(source, {"_plugins", "_engine", "builtin"}, tmp_path) == {"_engine", "builtin"}
    assert _layer("_engine") > _layer("_plugins") and _layer("builtin") > _layer("_plugins")

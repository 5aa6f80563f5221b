"""The public surface (trio's test_exports idea): public modules only re-export, nothing
private leaks, and every public name is documented."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import reapkit
import reapkit.asyncio
import reapkit.lowlevel
import reapkit.testing
import reapkit.units

PUBLIC = [reapkit, reapkit.asyncio, reapkit.lowlevel, reapkit.testing, reapkit.units]


@pytest.mark.parametrize("module", PUBLIC, ids=lambda m: m.__name__)
def test_public_modules_only_reexport(module: types.ModuleType) -> None:
    names = [n for n in dir(module) if not n.startswith("_")]  # reapkit's resolve on first use
    assert names, f"{module.__name__} exports nothing"
    for name in names:
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            assert obj.__name__.startswith("reapkit."), f"{module.__name__}.{name}"
            continue
        if isinstance(obj, str | int | float):  # constants such as DEFAULT_POLICY
            continue
        home = getattr(obj, "__module__", "")
        assert home.startswith("reapkit._"), f"{module.__name__}.{name} is defined in {home}"
        assert obj.__doc__, f"{module.__name__}.{name} has no docstring"


ROOT = Path(__file__).resolve().parent.parent
#: An import of a private module or name: ``from reapkit._x import``, ``import reapkit._x``,
#: ``from reapkit import _x``, ``from reapkit.cli import _x``.
_PRIVATE_IMPORT = re.compile(
    r"^\s*(?:from\s+reapkit(?:\.\w+)*\._\w*|import\s+reapkit(?:\.\w+)*\._\w*"
    r"|from\s+reapkit(?:\.\w+)*\s+import\s+\(?\s*_)",
    re.MULTILINE,
)


def test_plugins_examples_and_docs_use_only_public_names() -> None:
    # What a plugin author copies must work against the public API: reapkit's own plugins
    # (and their tests), the examples and the docs' snippets import nothing private.
    files = [
        p
        for top in ("plugins", "examples", "docs")
        for p in (ROOT / top).rglob("*")
        if p.suffix in {".py", ".md"} and "site" not in p.parts
    ]
    assert len(files) > 20
    private = [
        f"{p.relative_to(ROOT)}: {m.group().strip()}"
        for p in files
        for m in _PRIVATE_IMPORT.finditer(p.read_text(encoding="utf-8"))
    ]
    assert private == []
    assert _PRIVATE_IMPORT.search("from reapkit._engine import Engine")
    assert _PRIVATE_IMPORT.search("    from reapkit import _plugins")
    assert _PRIVATE_IMPORT.search("import reapkit._testing._hog")
    assert not _PRIVATE_IMPORT.search("from reapkit.testing import FakeProc")


def test_the_kill_guard_is_the_public_way_to_signal() -> None:
    # Signals go through KillGuard; the raw syscalls live only in reapkit.lowlevel.
    assert not hasattr(reapkit, "pidfd_send_signal")
    assert hasattr(reapkit.lowlevel, "pidfd_send_signal")


def test_the_lazy_names_are_the_imports_type_checkers_see() -> None:
    # reapkit/__init__.py lists each name twice: imports under TYPE_CHECKING, and the table
    # __getattr__ resolves them from. They must agree, name for name and module for module.
    tree = ast.parse(Path(reapkit.__file__).read_text())
    [block] = [n for n in tree.body if isinstance(n, ast.If)]
    seen = {
        alias.name: f".{node.module}"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name
    }
    assert len(seen) == len(block.body)
    assert seen == reapkit._HOME
    assert sorted(reapkit.__all__) == sorted(["__version__", *seen])


#: Every public name of reapkit resolved, in a fresh interpreter; prints the modules loaded.
_IMPORT_ALL = """
import sys
import reapkit
before = sorted(sys.modules)
for name in reapkit.__all__:
    getattr(reapkit, name)
print(" ".join(before))
print(" ".join(sorted(sys.modules)))
"""


def test_importing_reapkit_loads_no_pyroute2_rich_or_asyncio() -> None:
    # What a plugin author or an embedding service pays (issue 13): pyroute2 is no dependency
    # any more, rich belongs to the interactive commands, asyncio to reapkit.asyncio. The time
    # it takes is measured by the footprint benchmark (no timing asserts in tests).
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=60, check=True
    )
    at_import, after_every_name = (set(line.split()) for line in done.stdout.splitlines())
    heavy = {"pyroute2", "rich", "asyncio"}
    assert not {m for m in after_every_name if m.partition(".")[0] in heavy}
    # `import reapkit` alone loads none of its modules (but the version, and the few lines that
    # ignore SIGHUP under `python -m reapkit`): each name imports its own on first use.
    loaded = {m for m in at_import if m.startswith("reapkit")}
    assert loaded == {"reapkit", "reapkit._version", "reapkit._hangup"}
    assert "trio" not in at_import

"""The API reference (``docs/api.md``, mkdocstrings): every public name of every public
module has its entry (checked on the site that ``test_docs.py`` builds), and the site says
where it lives (``site_url``, ``repo_url``)."""

from __future__ import annotations

import re
import types
from pathlib import Path

import reapkit
import reapkit.asyncio
import reapkit.lowlevel
import reapkit.testing
import reapkit.units

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = [reapkit, reapkit.lowlevel, reapkit.units, reapkit.testing, reapkit.asyncio]


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return [
        n for n in names
        if not isinstance(getattr(module, n), types.ModuleType | str | int | float)
    ]  # fmt: skip


def test_the_site_says_where_it_lives() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^site_url: https://\S+/$", config, re.MULTILINE)
    assert re.search(r"^repo_url: https://github.com/reapkit/reapkit$", config, re.MULTILINE)


def check_the_api_reference(site: Path) -> None:
    """Every public name has its entry in the built ``site`` (test_docs.py builds it), and
    the header links to the repository without asking GitHub for its stars."""
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    entries = set(re.findall(r'<h\d id="(reapkit[\w.]*)"', page))
    missing = [
        f"{module.__name__}.{name}"
        for module in PUBLIC
        for name in _public_names(module)
        if f"{module.__name__}.{name}" not in entries
    ]
    assert missing == []
    assert ":class:" not in page  # the docstrings' roles read as code (docs/_hooks/api_roles.py)
    # The repository link is there, and asks GitHub's API nothing (docs/_overrides/).
    home = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="https://github.com/reapkit/reapkit" title=' in home
    assert 'data-md-component="source"' not in home

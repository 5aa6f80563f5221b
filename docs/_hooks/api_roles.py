"""mkdocs hook: the docstrings that the API reference (``api.md``, mkdocstrings) renders are
written for reading in the source, with reStructuredText's roles (``:class:`Size```) and a
paragraph ending in ``::`` before an example. Rendered as Markdown, the roles' names and the
``::`` would show: on that page, drop them, so the names read as code and the colon as one.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):(?=<code>)")
#: ``:class:`~reapkit._plugins.Selector``` shows its last part only, as Sphinx would.
_TILDE = re.compile(r"<code>~(?:[\w]+\.)*(\w+)</code>")


def on_page_content(html: str, page: Any, **_kwargs: Any) -> str:
    if page.file.src_uri != "api.md":
        return html
    html = _TILDE.sub(r"<code>\1</code>", _ROLE.sub("", html))
    return html.replace("<p>::</p>", "").replace("::</p>", ":</p>")

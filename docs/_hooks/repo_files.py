"""mkdocs hook: publish the repository files that the documentation links to.

The pages link to files outside ``docs/`` with ordinary relative links, e.g.
``[the unit](../examples/deploy/reapkit.service)``, so that the Markdown also reads right in
the repository itself. mkdocs publishes only ``docs/``, so this hook adds one page per linked
file under ``repo/`` (a Markdown file as it is, any other file as a highlighted code block)
and points the links there. Links inside those pages are followed the same way, so a
README's own links work on the site too.

A link from ``docs/`` to a file that does not exist is left alone, and mkdocs reports it
("not found among documentation files": an error under ``--strict``). A link that a
published repository page makes to a missing file, or to one outside the repository, becomes
its path in code: that file's links are not the documentation's to check.

``tests/test_docs.py`` checks every relative link of ``docs/*.md`` on its own.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.repo_files")

#: Where published repository files go in the site.
PREFIX = "repo"

_LANGUAGES = {
    ".toml": "toml",
    ".py": "python",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".service": "ini",
    ".ini": "ini",
    ".cfg": "ini",
    ".json": "json",
    ".sh": "bash",
    ".txt": "text",
}
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title"; [label]: target definitions.
_INLINE = re.compile(r"(!?\[[^\]]*\]\()(<[^>]*>|[^)\s]+)((?:\s+\"[^\"]*\")?\))")
_DEFINITION = re.compile(r"^(\s{0,3}\[[^\]]+\]:[ \t]*)(\S+)(.*)$", re.MULTILINE)


class _Site:
    """What one build knows (set by ``on_config`` and ``on_files``)."""

    repo_root = ""
    docs_dir = ""
    #: src_uri of a published page -> the repository file it shows.
    published: dict[str, str] = {}  # noqa: RUF012 - one build at a time
    #: Repository file (absolute path) -> src_uri of its page.
    pages: dict[str, str] = {}  # noqa: RUF012


_site = _Site()


def _code_ranges(markdown: str) -> list[tuple[int, int]]:
    """Where the code is: fenced blocks and inline code spans, as (start, end) offsets."""
    ranges = []
    fence: str | None = None
    pos = 0
    for line in markdown.splitlines(keepends=True):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            ranges.append((pos, pos + len(line)))
        elif fence is not None:
            ranges.append((pos, pos + len(line)))
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
        else:
            ranges.extend((pos + m.start(), pos + m.end()) for m in _CODE_SPAN.finditer(line))
        pos += len(line)
    return ranges


def _in_code(ranges: list[tuple[int, int]], i: int) -> bool:
    return any(start <= i < end for start, end in ranges)


def _target(source: str, link: str) -> tuple[str, str] | None:
    """``(absolute path, "#anchor" or "")`` of a relative link in the file ``source``, or None
    for external, absolute and same-page links."""
    link = link.strip("<>")
    if not link or link.startswith(("#", "/")) or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link):
        return None
    path, _, anchor = link.partition("#")
    path = path.split("?")[0]
    absolute = os.path.normpath(os.path.join(os.path.dirname(source), path))
    return absolute, f"#{anchor}" if anchor else ""


def _in(directory: str, path: str) -> bool:
    return path == directory or path.startswith(directory + os.sep)


def _repo_file(path: str) -> str | None:
    """The file a link to ``path`` in the repository (outside docs/) shows, or None."""
    if not _in(_site.repo_root, path) or _in(_site.docs_dir, path):
        return None
    if os.path.isdir(path):
        readme = os.path.join(path, "README.md")
        return readme if os.path.isfile(readme) else None
    return path if os.path.isfile(path) else None


def _links(markdown: str) -> list[str]:
    """The targets of the links outside code."""
    code = _code_ranges(markdown)
    return [
        m.group(2)
        for pattern in (_INLINE, _DEFINITION)
        for m in pattern.finditer(markdown)
        if not _in_code(code, m.start())
    ]


def _page_for(path: str) -> str:
    rel = os.path.relpath(path, _site.repo_root).replace(os.sep, "/")
    return f"{PREFIX}/{rel}" if rel.endswith(".md") else f"{PREFIX}/{rel}.md"


def _render(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".md"):
        return text
    rel = os.path.relpath(path, _site.repo_root).replace(os.sep, "/")
    name = os.path.basename(path)
    language = _LANGUAGES.get(os.path.splitext(name)[1], "make" if name == "Makefile" else "text")
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return (
        f"# `{rel}`\n\nThis file is part of the reapkit repository; it is shown here as it"
        f" is.\n\n{fence}{language}\n{text.rstrip()}\n{fence}\n"
    )


def on_config(config: Any) -> Any:
    _site.repo_root = os.path.dirname(os.path.abspath(config.config_file_path))
    _site.docs_dir = os.path.abspath(config.docs_dir)
    _site.published = {}
    _site.pages = {}
    return config


def on_files(files: Any, config: Any) -> Any:
    """Publish every repository file reachable by links from the documentation pages."""
    from mkdocs.structure.files import File, InclusionLevel  # noqa: PLC0415 - mkdocs only

    _site.published.clear()
    _site.pages.clear()
    queue = [
        (f.abs_src_path, f.content_string)
        for f in files.documentation_pages()
        if f.abs_src_path is not None
    ]
    while queue:
        source, markdown = queue.pop()
        for link in _links(markdown):
            target = _target(source, link)
            path = _repo_file(target[0]) if target else None
            if path is None or path in _site.pages:
                continue
            src_uri = _page_for(path)
            content = _render(path)
            _site.pages[path] = src_uri
            _site.published[src_uri] = path
            files.append(
                File.generated(
                    config, src_uri, content=content, inclusion=InclusionLevel.NOT_IN_NAV
                )
            )
            if path.endswith(".md"):
                queue.append((path, content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Point links to repository files at their published pages."""
    src_uri = page.file.src_uri
    source = _site.published.get(src_uri) or page.file.abs_src_path
    if source is None:
        return markdown
    ours = src_uri not in _site.published  # a page of docs/, not a published repository file
    here = posixpath.dirname(src_uri)

    def rewrite(link: str) -> str | None:
        """The new link; the same link to leave it alone; None to show it as code."""
        target = _target(source, link)
        if target is None:
            return link
        absolute, anchor = target
        path = _repo_file(absolute)
        if path is not None and path in _site.pages:
            return posixpath.relpath(_site.pages[path], here) + anchor
        if _in(_site.docs_dir, absolute) and os.path.exists(absolute):
            uri = os.path.relpath(absolute, _site.docs_dir).replace(os.sep, "/")
            return posixpath.relpath(uri, here) + anchor
        if ours:
            return link  # missing: mkdocs reports it
        return None

    code = _code_ranges(markdown)

    def inline(m: re.Match[str]) -> str:
        if _in_code(code, m.start()):
            return m.group(0)
        new = rewrite(m.group(2))
        if new is not None:
            return f"{m.group(1)}{new}{m.group(3)}"
        # A dangling link of a published file: the link's text, and its path in code.
        text = m.group(1)[m.group(1).index("[") + 1 : -2]
        target = _target(source, m.group(2))
        assert target is not None
        path = os.path.relpath(target[0], _site.repo_root).replace(os.sep, "/")
        return f"`{path}`" if text.strip("`") == path else f"{text} (`{path}`)"

    def definition(m: re.Match[str]) -> str:
        if _in_code(code, m.start()):
            return m.group(0)
        new = rewrite(m.group(2))
        return f"{m.group(1)}{new if new is not None else '#'}{m.group(3)}"

    # One pass per pattern over the original offsets: definitions never hold inline links.
    markdown = _DEFINITION.sub(definition, markdown)
    code = _code_ranges(markdown)
    return _INLINE.sub(inline, markdown)

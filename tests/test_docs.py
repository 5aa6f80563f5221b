"""The documentation against the code.

1. The policy reference (``docs/policies.md``) cannot drift: every key of every section,
   every built-in plugin and every option is there, with the code's defaults, and nothing is
   there that the code does not have. The same for the operations page's tables (refusals,
   outcomes, record fields, exit statuses) and the command line.
2. Every relative link of ``docs/*.md`` points at a file of the repository (and an anchor
   into a page at a heading of that page).
3. The site builds with ``mkdocs build --strict``: no warning at all (skipped, saying so,
   where mkdocs is not installed: it comes with the ``docs`` extra).
4. The code snippets run: every Python block of ``docs/embedding.md``, on a sandbox policy;
   the tutorial's kill records have the fields and the reasons reapkit writes. (Every other
   page's snippets: ``tests/test_docs_snippets.py``.)
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import reapkit
from reapkit import _policy
from reapkit._engine import Rule
from reapkit._guard import RefusalReason
from reapkit._plugins import Candidate, NoOptions, Ranked, Situation
from reapkit._procfs import ProcFS
from reapkit._reap_stage import ReapSettings
from reapkit._records import ActionStep, KillRecord, Outcome, SelectorStep, Timeline, Victim
from reapkit._sources.memory import Metric
from reapkit._units import _DURATION_UNITS, _SIZE_UNITS, PSI_RESOURCES, parse_duration, parse_size
from reapkit.builtin import builtin_plugins
from reapkit.cli import _main, _status
from reapkit.testing import FakeProc

from .test_api_docs import check_the_api_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)(?:\s+\{#([\w-]+)\})?\s*$")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")

# A minimal valid rule, for loading and comparing defaults.
_MINIMAL = {"name": '"x"', "scope": '"system"', "actions": '["kill"]'}


# -- reading the Markdown ----------------------------------------------------------------------


def _lines_outside_code(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines that are not inside fenced code blocks."""
    out = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                continue
            out.append((number, line))
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
    return out


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug of a heading's text (what mkdocs uses for anchors)."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


@attrs.frozen
class Section:
    id: str
    title: str
    level: int
    #: The text up to the next heading of any level.
    body: str
    #: The text up to the next heading of the same or a higher level.
    whole: str


@functools.cache
def _sections(page: str) -> dict[str, Section]:
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    outside = {n for n, _ in _lines_outside_code("\n".join(lines))}
    heads = []
    for number, line in enumerate(lines, 1):
        match = _HEADING.match(line)
        if match and number in outside:
            level, title, explicit = len(match.group(1)), match.group(2), match.group(3)
            heads.append((number, level, title, explicit or _slug(title)))
    sections = {}
    for i, (number, level, title, id_) in enumerate(heads):
        next_any = heads[i + 1][0] if i + 1 < len(heads) else len(lines) + 1
        next_same = next((h[0] for h in heads[i + 1 :] if h[1] <= level), len(lines) + 1)
        sections[id_] = Section(
            id_,
            title,
            level,
            "\n".join(lines[number : next_any - 1]),
            "\n".join(lines[number : next_same - 1]),
        )
    return sections


def _section(page: str, id_: str) -> Section:
    sections = _sections(page)
    assert id_ in sections, f"docs/{page} has no section {{#{id_}}}"
    return sections[id_]


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _table(page: str, id_: str) -> list[dict[str, str]]:
    """The first table of a section: one dict per row, keyed by the header's cells; the
    first column's backticks removed."""
    rows = [line for line in _section(page, id_).body.splitlines() if line.startswith("|")]
    assert len(rows) >= 2, f"docs/{page}#{id_} has no table"
    header = [h.lower() for h in _cells(rows[0])]
    table = []
    for row in rows[2:]:
        cells = _cells(row)
        entry = dict(zip(header, cells, strict=True))
        entry[header[0]] = cells[0].strip("`")
        table.append(entry)
    return table


def _first_column(page: str, id_: str) -> list[str]:
    return [next(iter(row.values())) for row in _table(page, id_)]


def _code_words(text: str) -> set[str]:
    """Everything written as inline code."""
    return {w.strip() for w in re.findall(r"`([^`\n]+)`", text)}


def _toml_value(cell: str) -> Any:
    """A documented default (a TOML value in backticks) as Python."""
    match = re.fullmatch(r"`(.+)`", cell)
    assert match, f"a default must be a TOML value in backticks, 'required' or 'unset': {cell!r}"
    return tomllib.loads(f"v = {match.group(1)}")["v"]


def _error(text: str) -> str:
    with pytest.raises(reapkit.PolicyError) as info:
        reapkit.load_policy(text=text)
    return str(info.value)


def _rule_text(**keys: str) -> str:
    table = {**_MINIMAL, **keys}
    return "[[rule]]\n" + "".join(f"{k} = {v}\n" for k, v in table.items() if v is not None)


def _listed_keys(message: str) -> set[str]:
    """``... unknown key (keys: a, b, c)`` -> {a, b, c}."""
    match = re.search(r"\(keys: ([^)]*)\)", message)
    assert match, message
    return {k.strip() for k in match.group(1).split(",")}


# -- 1. the policy reference -------------------------------------------------------------------


def test_every_top_level_section_is_documented() -> None:
    message = _error("[nonsense]\n")
    names = re.findall(r"\[\[?(\w+)\]\]?", message.split("expected", 1)[1])
    assert names == ["reaper", "rule", "observer", "trigger"], message
    for name in names:
        _section("policies.md", name)


def test_reaper_keys_are_documented() -> None:
    keys = _listed_keys(_error("[reaper]\nnonsense = 1\n" + _rule_text()))
    assert set(_first_column("policies.md", "reaper")) == keys
    dry_run = next(r for r in _table("policies.md", "reaper") if r["key"] == "dry_run")
    assert _toml_value(dry_run["default"]) is reapkit.load_policy(text=_rule_text()).dry_run


def test_reap_keys_are_documented_with_their_defaults() -> None:
    keys = _listed_keys(_error("[reaper.reap]\nnonsense = 1\n" + _rule_text()))
    fields = {f.name: f for f in attrs.fields(ReapSettings)}
    assert keys == set(fields)
    rows = _table("policies.md", "reaper-reap")
    assert {r["key"] for r in rows} == keys
    for row in rows:
        default = fields[row["key"]].default
        if row["default"] == "unset":
            assert default is None, row["key"]
        else:
            assert _toml_value(row["default"]) == default, row["key"]


def test_rule_keys_are_documented_with_their_defaults() -> None:
    rows = {r["key"]: r for r in _table("policies.md", "rule")}
    assert set(rows) == _policy._RULE.keys
    rule: Rule = reapkit.load_policy(text=_rule_text()).rules[0]
    for key, row in rows.items():
        cell = row["default"]
        if cell == "required":
            message = _error(_rule_text(**{key: None}))
            assert f"rule[0].{key}" in message, (key, message)
            continue
        if cell == "unset":
            assert getattr(rule, key, None) is None, key
            continue
        value = _toml_value(cell)
        if key == "select":
            assert [s.name for s in rule.selectors] == value
        elif key == "when":
            assert [str(c) for c in rule.when] == value
        elif key == "allow_oom_score_adj_min":
            assert rule.guard.allow_oom_score_adj_min is value
        elif isinstance(value, str):  # a duration
            assert parse_duration(value) == getattr(rule, key), key
        else:
            assert value == getattr(rule, key), key


def _plugin_sections(kind: str) -> dict[str, Section]:
    """The ``### `name` {#kind-name}`` sections under ``## ... {#kinds}``."""
    whole = _section("policies.md", f"{kind}s").whole
    found = {}
    for line in whole.splitlines():
        match = _HEADING.match(line)
        if match and match.group(3) and match.group(3).startswith(f"{kind}-"):
            name = match.group(3).removeprefix(f"{kind}-")
            assert match.group(2) == f"`{name}`", f"heading {line!r}: title and id disagree"
            found[name] = _section("policies.md", match.group(3))
    return found


@pytest.mark.parametrize("kind", ["selector", "action"])
def test_every_builtin_plugin_is_documented_and_nothing_else(kind: str) -> None:
    builtins = {cls.name for cls in builtin_plugins() if cls.kind == kind}
    documented = set(_plugin_sections(kind))
    assert documented - builtins == set(), "documented, but not a built-in"
    assert builtins - documented == set(), "built-in, but not documented"


@pytest.mark.parametrize("cls", builtin_plugins(), ids=lambda c: f"{c.kind}-{c.name}")
def test_every_option_is_documented_with_its_default(cls: Any) -> None:
    section = _section("policies.md", f"{cls.kind}-{cls.name}")
    fields = {f.name.lstrip("_"): f for f in attrs.fields(cls.Options) if f.init}
    if cls.Options is NoOptions:
        assert "No options." in section.body
        assert not any(line.startswith("|") for line in section.body.splitlines())
        return
    rows = {r["option"]: r for r in _table("policies.md", section.id)}
    assert set(rows) == set(fields), "the option table must list exactly the options"
    for name, field in fields.items():
        cell = rows[name]["default"]
        assert rows[name]["meaning"], f"{cls.name}.{name}: say what it means"
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()  # type: ignore[attr-defined]
        if default is attrs.NOTHING:
            assert cell == "required", f"{cls.name}.{name} has no default"
        elif cell == "unset":
            assert default is None, f"{cls.name}.{name}"
        else:
            # The documented value, through the option's own converter, is the default.
            value = _toml_value(cell)
            if field.converter is not None:
                value = field.converter(value)  # type: ignore[call-arg]
            assert value == default, f"{cls.name}.{name}: documented {cell}, code {default!r}"


def test_condition_syntax_is_documented() -> None:
    text = _section("policies.md", "conditions").whole
    words = _code_words(text)
    for metric in typing.get_args(Metric):
        assert any(w.startswith(f"{metric} ") for w in words), metric
    for resource in PSI_RESOURCES:
        assert resource in text
    for kind in ("some", "full"):
        assert kind in text


def test_duration_and_size_units_are_documented() -> None:
    documented = {
        unit.strip("` ")
        for cell in _first_column("policies.md", "durations")
        for unit in cell.split(",")
    }
    assert {u.lower() for u in documented} == {u for u in _DURATION_UNITS}
    for unit in documented:
        assert parse_duration(f"2{unit}") > 0
    cells = [c.split("(")[0] for c in _first_column("policies.md", "sizes")]
    documented = {unit.strip("` ") for cell in cells for unit in cell.split(",")}
    assert {u.lower() for u in documented} == {u for u in _SIZE_UNITS if u} | {"%"}
    for unit in documented:
        parse_size(f"2{unit}")


def test_the_default_policy_is_quoted_as_it_is() -> None:
    body = _section("policies.md", "default-policy").body
    match = re.search(r"```toml\n(.*?)```", body, re.DOTALL)
    assert match, "the default policy must be quoted in a toml code block"
    assert match.group(1) == reapkit.DEFAULT_POLICY


def test_operations_tables_match_the_code() -> None:
    assert set(_first_column("operations.md", "kill-guard")) == {r.value for r in RefusalReason}
    records = {r["field"]: r for r in _table("operations.md", "records")}
    fields = set(KillRecord.as_json(_a_record()))
    assert set(records) == fields
    outcomes = _code_words(records["outcome"]["what"])
    assert set(typing.get_args(Outcome)) <= outcomes
    assert {f.name for f in attrs.fields(Timeline)} <= _code_words(records["timeline"]["what"])
    assert {f.name for f in attrs.fields(Victim)} <= _code_words(records["victim"]["what"])
    statuses = {int(s) for s in _first_column("operations.md", "exit-statuses")}
    assert statuses == {getattr(_status, name) for name in dir(_status) if name.startswith("EXIT_")}


def _a_record() -> KillRecord:
    return KillRecord("x", "killed", "because", "always", Timeline(0.0))


def _subcommands() -> dict[str, Any]:
    parser = _main._build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def test_every_command_is_documented() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"## The command line\n+```sh\n(.*?)```", readme, re.S)
    assert listed, "README.md lists the commands under '## The command line'"
    in_readme = set(re.findall(r"^reapkit (\w+)", listed.group(1), re.M))
    assert in_readme == set(_subcommands()), "README.md's command list"
    for name in _subcommands():
        assert f"`reapkit {name}" in index, name


def test_every_option_of_reapkit_run_is_documented() -> None:
    documented = " ".join(_first_column("operations.md", "daemon"))
    for action in _subcommands()["run"]._actions:
        if action.dest == "help":
            continue
        names = action.option_strings or [action.dest.upper()]
        assert any(n in documented for n in names), names


def test_the_synopsis_of_reapkit_run_is_its_parser() -> None:
    synopsis = re.search(
        r"```\n(reapkit run .*?)```", _section("operations.md", "daemon").body, re.S
    )
    assert synopsis, "docs/operations.md#daemon starts with the synopsis of reapkit run"
    shown = set(re.findall(r"\[(-[-\w]+)", synopsis.group(1)))
    options = {
        action.option_strings[0]  # the short form, where there is one
        for action in _subcommands()["run"]._actions
        if action.option_strings and action.dest not in ("help", "version")
    }
    assert shown == options


# -- 2. links ----------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)


def _links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of the relative links outside code of a Markdown file."""
    kept = dict(_lines_outside_code(path.read_text(encoding="utf-8")))
    text = "\n".join(kept.get(n, "") for n in range(1, max(kept, default=0) + 1))
    text = _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    found = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("/"):
            continue  # external, mailto:, or absolute (the build refuses those)
        found.append((text.count("\n", 0, match.start()) + 1, target))
    return found


def _anchors(path: Path) -> set[str]:
    return set(_sections(path.name)) if path.parent == DOCS else set()


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_relative_link_points_at_a_file(page: str) -> None:
    source = DOCS / page
    broken = []
    for line, link in _links(source):
        target, _, anchor = link.partition("#")
        path = (source.parent / target).resolve() if target else source
        if not path.exists():
            broken.append(f"{page}:{line}: {link}: no such file")
        elif not (path == ROOT or ROOT in path.parents):
            broken.append(f"{page}:{line}: {link}: outside the repository")
        elif (
            anchor and path.suffix == ".md" and path.parent == DOCS and anchor not in _anchors(path)
        ):
            broken.append(f"{page}:{line}: {link}: no heading #{anchor} in {path.name}")
    assert not broken, "\n".join(broken)


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config.split("\nnav:", 1)[1]
    listed = re.findall(r":\s*([\w/-]+\.md)\s*$", nav, re.MULTILINE)
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    assert sorted(listed) == pages
    assert "benchmarks.md" in listed


# -- 3. the site builds ------------------------------------------------------------------------


def test_the_site_builds_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the 'docs' extra has it)")
    pytest.importorskip("material", reason="mkdocs-material is not installed ('docs' extra)")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    check_the_api_reference(site)
    for page in ("tutorial", "policies", "plugins", "embedding", "operations", "benchmarks"):
        assert (site / page / "index.html").is_file(), page
    # Repository files that pages link to are published beside them.
    assert (site / "repo" / "examples" / "deploy" / "reapkit.service" / "index.html").is_file()


# -- 4. the code snippets run ------------------------------------------------------------------


def _snippets(page: str | Path, language: str = "python") -> list[tuple[int, str]]:
    """(first line, code) of each fenced ``language`` block of a page: a name in ``docs/``,
    or any Markdown file's absolute path."""
    found, start, code = [], 0, None
    for number, line in enumerate((DOCS / page).read_text(encoding="utf-8").splitlines(), 1):
        if code is None and line.strip() == f"```{language}":
            start, code = number + 1, []
        elif code is not None and line.strip() == "```":
            found.append((start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line)
    return found


def _run_snippet(code: str, where: str, namespace: dict[str, Any]) -> None:
    """Run ``code`` in ``namespace``. A snippet that awaits at its top (the body of an async
    function, as a page shows it: ``async with reapkit.open_reaper(...)``) runs under
    ``trio.run``, for at most 60 s."""
    compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)  # an `async with` at the top: a coroutine to await
    if inspect.iscoroutine(result):

        async def top_level() -> None:
            with trio.fail_after(60):
                await result

        trio.run(top_level)


def _sandbox_rule(cgroup_dir: str) -> str:
    """A rule that may kill only in ``cgroup_dir`` (a cgroup the test made), and only when
    asked (it has no conditions)."""
    return (
        f'[[rule]]\nname = "sandbox"\nscope = {{ cgroup = "{cgroup_dir}" }}\n'
        'select = ["largest-rss"]\nactions = ["kill"]\nvictim_timeout = "3s"\n'
    )


#: The policy file the snippets load: replaced by a sandbox policy when they run.
_POLICY_FILE = "/etc/reapkit/policy.toml"
#: A snippet's placeholder for the service around the reaper: replaced by
#: ``_the_rest_of_the_service`` (below).
_THE_REST = "...  # the rest of the service"


@pytest.mark.kernel
@pytest.mark.parametrize("snippet", _snippets("embedding.md"), ids=lambda s: f"line-{s[0]}")
def test_every_embedding_snippet_runs(
    snippet: tuple[int, str], spawn: Any, memory_cgroup: Any, tmp_path: Path
) -> None:
    """Each snippet runs as written, on a policy whose one rule may kill only in a memory
    cgroup the test made, where the only process is one the test started; the snippets
    that trigger a decision kill it and print its record."""
    line, code = snippet
    victim = spawn(cgroups=[memory_cgroup])
    policy = tmp_path / "policy.toml"
    policy.write_text(_sandbox_rule(memory_cgroup.directory))
    assert _POLICY_FILE in code, f"embedding.md:{line}: a snippet loads {_POLICY_FILE}"
    code = code.replace(_POLICY_FILE, str(policy))
    code = code.replace(_THE_REST, "await _the_rest_of_the_service(reaper, nursery)")
    code = code.replace("asyncio.run(main())", "asyncio.run(asyncio.wait_for(main(), 60))")
    printed: list[tuple[object, ...]] = []

    def print_(*args: object, **kwargs: Any) -> None:
        printed.append(args)
        builtins.print(*args, **kwargs)

    async def _the_rest_of_the_service(reaper: reapkit.Reaper, nursery: trio.Nursery) -> None:
        """Ask for a decision, wait until the snippet printed its record, stop the service."""
        await reaper.trigger("the docs' test asks")
        with trio.fail_after(60):
            while not printed:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    namespace = {
        "__name__": "__main__",
        "print": print_,
        "_the_rest_of_the_service": _the_rest_of_the_service,
    }
    _run_snippet(code, f"docs/embedding.md:{line}", namespace)
    if "trigger(" in code:
        assert victim.wait(10) == -signal.SIGKILL
        assert len(printed) == 1, printed
        assert "killed" in printed[0], printed
    else:
        assert victim.poll() is None
        assert printed == []


def _record_fields() -> dict[str, set[str]]:
    """The fields of a kill record (``as_json``), of its victim and of its steps."""
    return {
        "record": set(KillRecord.as_json(_a_record())),
        "victim": {f.name for f in attrs.fields(Victim)},
        "selectors": {f.name for f in attrs.fields(SelectorStep)},
        "actions": {f.name for f in attrs.fields(ActionStep)},
        "timeline_ms": {f.name for f in attrs.fields(Timeline)},
    }


def _largest_rss_reason(rss_mib: float, of: int, tmp_path: Path) -> str:
    """What largest-rss says when the largest of ``of`` processes has ``rss_mib`` MiB, on a
    machine without swap (the tutorial's)."""
    fake = FakeProc(tmp_path / f"proc-{rss_mib}-{of}")
    fake.set_meminfo(total=8 << 30, available=4 << 30)
    page = fake.page_size
    fake.add_process(100, rss=round(rss_mib * (1 << 20) / page) * page)
    for pid in range(101, 100 + of):
        fake.add_process(pid, rss=1 << 20)
    procfs = ProcFS(fake.root)
    ranked = [Ranked(Candidate.from_info(procfs.process_info(p))) for p in range(100, 100 + of)]
    situation = Situation("tutorial", None, procfs.meminfo(), procfs, 0.0)
    selector = next(c for c in builtin_plugins() if c.name == "largest-rss")()
    return str(selector.select(situation, ranked)[0].reason)


def test_the_tutorials_records_are_what_reapkit_writes(tmp_path: Path) -> None:
    fields = _record_fields()
    records = [json.loads(code) for _, code in _snippets("tutorial.md", "json")]
    assert records, "the tutorial shows kill records"
    for record in records:
        assert set(record) <= fields["record"], set(record) - fields["record"]
        assert set(record.get("victim", {})) - {"..."} <= fields["victim"]
        assert set(record["timeline_ms"]) - {"..."} <= fields["timeline_ms"]
        for kind in ("selectors", "actions"):
            for step in record[kind]:
                assert set(step) - {"..."} <= fields[kind], step
        for step in record["selectors"]:
            match = re.fullmatch(r"RSS ([\d.]+) MiB \(largest of (\d+)\)", step.get("reason", ""))
            if step["selector"] == "largest-rss" and "reason" in step:
                assert match, f"not what largest-rss says without swap: {step['reason']!r}"
                rss, of = float(match.group(1)), int(match.group(2))
                assert step["reason"] == _largest_rss_reason(rss, of, tmp_path)


#: "41 MiB resident", "~46 MiB resident": a figure of the daemon's own footprint.
_RESIDENT = re.compile(r"(\d+(?:\.\d+)?) MiB\s+resident")


def test_footprint_figures_agree_with_the_benchmarks() -> None:
    # docs/benchmarks.md, written by `make bench`, holds the measured footprint; a page that
    # quotes it must quote the same figure (issue 13: "41 MiB" and "~46 MiB" both appeared).
    report = (DOCS / "benchmarks.md").read_text()
    measured = re.search(r"^\| VmRSS \| ([\d.]+) MiB \|", report, re.M)
    assert measured, "docs/benchmarks.md has no footprint VmRSS row"
    pages = [
        *(p for p in DOCS.glob("*.md") if p.name != "benchmarks.md"),
        ROOT / "README.md",
        *(p for p in (ROOT / "examples" / "deploy").rglob("*") if p.is_file()),
    ]
    wrong = [
        f"{page.relative_to(ROOT)}: {match.group(0)!r}"
        for page in pages
        for match in _RESIDENT.finditer(page.read_text())
        if round(float(match.group(1))) != round(float(measured.group(1)))
    ]
    assert not wrong, f"docs/benchmarks.md measured {measured.group(1)} MiB: " + ", ".join(wrong)

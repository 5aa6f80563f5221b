"""Every code snippet of the documentation runs, and does what its page says.

The pages: ``docs/*.md``, ``README.md``, ``examples/**/README.md``, ``plugins/*/README.md``.

* Every ``python`` and ``toml`` block is claimed by exactly one check below (or by the test
  named in ``_ELSEWHERE``): a new snippet without one fails
  ``test_every_snippet_has_its_check``, and so does a check whose snippet is gone.
* A page's Python snippets run in order, in one namespace per page: a later snippet continues
  an earlier one (``class Counter(reapkit.Observer)`` uses the imports above it). Each snippet
  is a test of its own, which runs the page's earlier snippets first, then the snippet and its
  check. Where a page's text names a module as the reader's own (``my_reaper_plugins``), the
  page's namespace is that module, importable by that name while the test runs.
* A snippet runs as written. Only what a page's text marks as a placeholder is replaced:
  ``name = "..."``, the policy file and ``...  # the rest of the service`` (as the embedding
  test does), the tutorial's cgroup directory (the one it has the reader create).
* Each test gets an empty default registry (as at start-up: installed plugins are found
  through their entry points), so a snippet that registers a plugin can run in every test.
* Checks on a fake ``/proc`` tree where the kernel is not the point. A check that kills does
  so in a memory cgroup the test made, to a process the test started (marked ``kernel``).
* The ``sh`` and ``console`` blocks (and the ``Exec...=`` lines of ``ini`` drop-ins): every
  ``reapkit`` command line parses with the command's own parser, every ``make`` target
  exists, and every repository file named is there.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import io
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import types
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio
import trio.testing

import reapkit
from reapkit import _plugins
from reapkit.cli import _main
from reapkit.cli._status import UsageError
from reapkit.lowlevel import Engine, ProcFS, TraceError, read_trace
from reapkit.testing import FakeProc, replay, start_grower

from .conftest import need, require_root
from .test_docs import (
    _POLICY_FILE,
    _THE_REST,
    DOCS,
    ROOT,
    _run_snippet,
    _sandbox_rule,
    _snippets,
)

MiB = 1 << 20

#: The languages whose snippets run (or load) here; ``sh`` and ``console`` are checked below.
_LANGUAGES = ("python", "toml")


def _pages() -> list[str]:
    """The Markdown pages, relative to the repository."""
    paths = {
        *DOCS.glob("*.md"),
        ROOT / "README.md",
        *(ROOT / "examples").rglob("README.md"),
        *(ROOT / "plugins").glob("*/README.md"),
    }
    return sorted(str(p.relative_to(ROOT)) for p in paths)


@attrs.frozen
class Snippet:
    page: str
    line: int
    language: str
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


@functools.cache
def _page_snippets(page: str) -> tuple[Snippet, ...]:
    """A page's ``python`` and ``toml`` snippets, in the page's order."""
    found = [
        Snippet(page, line, language, code)
        for language in _LANGUAGES
        for line, code in _snippets(ROOT / page, language)
    ]
    return tuple(sorted(found, key=lambda s: s.line))


#: Pages whose text names a module as the reader's own: the page's namespace is that module.
_MODULES = {"docs/plugins.md": "my_reaper_plugins"}


@attrs.define
class Run:
    """One snippet, to run in its page's namespace (the page's earlier snippets have run)."""

    snippet: Snippet
    namespace: dict[str, Any]
    request: pytest.FixtureRequest

    @property
    def code(self) -> str:
        return self.snippet.code

    @property
    def tmp_path(self) -> Path:
        path: Path = self.request.getfixturevalue("tmp_path")
        return path

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)

    def exec(self, code: str | None = None) -> None:
        """Run the snippet (or ``code``: the snippet with its placeholders replaced)."""
        _run_snippet(self.code if code is None else code, str(self.snippet), self.namespace)

    def run_its_tests(self) -> list[str]:
        """Run the test functions the snippet defines, as pytest would: their arguments are
        fixtures (``tmp_path``), and an ``async def`` runs under trio (as pytest-trio does).
        Returns their names."""
        ran = []
        for name, func in list(self.namespace.items()):
            code = getattr(func, "__code__", None)
            if not name.startswith("test_") or code is None:
                continue
            if code.co_filename != str(self.snippet):
                continue  # an earlier snippet's
            kwargs = {p: self.fixture(p) for p in inspect.signature(func).parameters}
            if inspect.iscoroutinefunction(func):
                trio.run(functools.partial(func, **kwargs))
            else:
                func(**kwargs)
            ran.append(name)
        return ran


Check = Callable[[Run], None]


@attrs.frozen
class Claim:
    """The check of the ``language`` snippet of ``page`` that contains ``marker``."""

    page: str
    language: str
    marker: str
    check: Check
    kernel: bool


_CLAIMS: list[Claim] = []

#: Snippets checked by another test: (page, language, marker) -> that test.
_ELSEWHERE = {
    ("docs/embedding.md", "python", "import reapkit"): (
        "tests/test_docs.py::test_every_embedding_snippet_runs"
    ),
    ("docs/policies.md", "toml", "# reapkit's embedded default policy"): (
        "tests/test_docs.py::test_the_default_policy_is_quoted_as_it_is"
    ),
    ("plugins/reapkit-kubernetes/README.md", "toml", 'name = "kubernetes-qos"'): (
        "plugins/reapkit-kubernetes/tests/test_kubernetes_selector.py"
        "::test_the_readme_policy_loads_with_the_default_options"
    ),
    ("plugins/reapkit-prometheus/README.md", "toml", 'name = "prometheus"'): (
        "plugins/reapkit-prometheus/tests/test_prometheus_metrics.py::test_the_readmes_policy_loads"
    ),
}


def exercises(
    page: str, marker: str, *, language: str = "python", kernel: bool = False
) -> Callable[[Check], Check]:
    """Make the decorated function the check of the ``language`` snippet of ``page`` that
    contains ``marker``."""

    def claim(check: Check) -> Check:
        _CLAIMS.append(Claim(page, language, marker, check, kernel))
        return check

    return claim


def _claims_of(snippet: Snippet) -> list[Claim | str]:
    where = (snippet.page, snippet.language)
    found: list[Claim | str] = [
        c for c in _CLAIMS if (c.page, c.language) == where and c.marker in snippet.code
    ]
    found += [
        test for (*at, m), test in _ELSEWHERE.items() if tuple(at) == where and m in snippet.code
    ]
    return found


# -- helpers for the checks --------------------------------------------------------------------


def _rule(select: str, *, actions: str = 'actions = ["kill"]') -> str:
    """A rule that chooses system-wide with ``select`` (a ``select = ...`` line): only for
    fake trees, where no guard signals."""
    return f'[[rule]]\nname = "docs"\nscope = "system"\n{actions}\n{select.strip()}\n'


def _preview(fake: FakeProc, policy_text: str) -> tuple[reapkit.Ranked | None, list[Any]]:
    """What the policy's first rule chooses on a fake tree, and its selector steps
    (``reapkit check --now``'s question)."""
    procfs = ProcFS(fake.root)
    policy = reapkit.load_policy(text=policy_text, procfs=procfs)

    async def ignore(record: reapkit.KillRecord) -> None:
        pass

    async def preview() -> tuple[reapkit.Ranked | None, list[Any]]:
        engine = Engine(policy.rules, emit=ignore, procfs=procfs)
        chosen, _ranked, steps = await engine.preview(policy.rules[0])
        return chosen, steps

    return trio.run(preview)


def _quoted(page: str, prefix: str) -> str:
    """The inline code of ``page`` that starts with ``prefix`` (what the text says)."""
    text = " ".join((ROOT / page).read_text(encoding="utf-8").split())
    match = re.search(rf"`({re.escape(prefix)}[^`]*)`", text)
    assert match, f"{page} no longer quotes `{prefix}...`"
    return match.group(1)


async def _first_record(
    policy: reapkit.Policy,
    *,
    procfs: ProcFS | None = None,
    trigger: bool = True,
    within: float = 30,
) -> reapkit.KillRecord:
    """Run a reaper on ``policy`` until its first record (asking for a decision if
    ``trigger``), for at most ``within`` seconds."""
    async with (
        reapkit.open_reaper(policy, procfs=procfs, live_table=False) as reaper,
        reaper.records() as records,
    ):
        if trigger:
            await reaper.trigger("the docs' test asks")
        with trio.fail_after(within):
            return await records.receive()


def _http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        text: str = response.read().decode()
        return text


class _AnObserver(reapkit.Observer):
    """Stands for a page's ``name = "..."`` observer."""

    name: ClassVar[str] = "an-observer"

    def on_record(self, record: reapkit.KillRecord) -> None:
        pass


class _ATrigger(reapkit.Trigger):
    """Stands for a page's ``name = "..."`` trigger."""

    name: ClassVar[str] = "a-trigger"

    async def run(self, send: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


def _fill_placeholders(code: str) -> str:
    """``name = "..."`` of an ``[[observer]]`` or ``[[trigger]]``: the stand-ins above,
    registered."""
    stand_ins = {"observer": _AnObserver, "trigger": _ATrigger}
    for cls in stand_ins.values():
        reapkit.register(cls)
    filled = re.sub(
        r'(\[\[(observer|trigger)\]\][^\n]*\n)name = "\.\.\."',
        lambda m: f'{m.group(1)}name = "{stand_ins[m.group(2)].name}"',
        code,
    )
    assert 'name = "..."' not in filled, code
    return filled


# -- docs/plugins.md ---------------------------------------------------------------------------


@exercises("docs/plugins.md", '@reapkit.selector("not-root")')
def _function_selector(run: Run) -> None:
    run.exec()
    not_root = run.namespace["not_root"]
    assert issubclass(not_root, reapkit.Selector)
    assert isinstance(not_root(), reapkit.Selector)
    fake = FakeProc(run.tmp_path / "proc")
    fake.add_process(100, comm="rootd", uid=0, oom_score=900)
    fake.add_process(101, comm="small", uid=1000, oom_score=100)
    fake.add_process(102, comm="big", uid=1000, oom_score=600)
    # "A policy can then say ...": registered in the default registry, its name will do.
    chosen, steps = _preview(fake, _rule(_quoted("docs/plugins.md", 'select = ["not-root"')))
    assert chosen is not None
    assert chosen.candidate.pid == 102
    assert [s.selector for s in steps] == ["not-root", "oom-score"]
    assert steps[0].reason == "not root"


@exercises("docs/plugins.md", "class LargestBackground(reapkit.Selector)")
def _class_selector(run: Run) -> None:
    run.exec()
    cls, options = run.namespace["LargestBackground"], run.namespace["BackgroundOptions"]
    policy = reapkit.load_policy(text=_rule('select = ["largest-background"]'))
    (selector,) = policy.rules[0].selectors
    assert type(selector) is cls
    assert selector.options == options()
    assert options(foreground=["^a$"]).foreground == ("^a$",)
    with pytest.raises(ValueError, match=r"^'\(' in foreground: "):  # not re.error
        options(foreground=["("])


@exercises("docs/plugins.md", '{ name = "largest-background", foreground', language="toml")
def _class_selector_in_a_policy(run: Run) -> None:
    fake = FakeProc(run.tmp_path / "proc")
    for pid, comm, rss in [(100, "firefox", 900), (101, "code", 800), (102, "slack", 600)]:
        fake.add_process(pid, comm=comm, rss=rss * MiB, uid=1000)
    fake.add_process(103, comm="spotify", rss=300 * MiB, uid=1000)
    chosen, steps = _preview(fake, _rule(run.code))
    assert chosen is not None
    assert chosen.candidate.comm == "slack"
    assert [s.selector for s in steps] == ["protect", "largest-background"]
    assert steps[1].reason == "background, RSS 600 MiB"
    # "... makes the policy fail to load, and the error names the rule, the plugin and the
    # option: `rule[0].select[1].foreground: plugin 'largest-background': ...`"
    said = _quoted("docs/plugins.md", "rule[0].select[1].foreground").removesuffix("...")
    bad = run.code.replace('"^code$"', '"(code"')
    with pytest.raises(reapkit.PolicyError, match=re.escape(said)):
        reapkit.load_policy(text=_rule(bad))


@exercises("docs/plugins.md", "class AtLeastOptions")
def _units(run: Run) -> None:
    run.exec()  # its asserts are the check; the error it quotes: tests/test_units_public.py


@exercises("docs/plugins.md", "def test_the_foreground_app_is_never_chosen")
@exercises("docs/plugins.md", "async def test_the_whole_rule_on_a_fake_tree")
def _tests_on_a_fake_tree(run: Run) -> None:
    run.exec()
    assert run.run_its_tests(), "the snippet defines a test"


@exercises("docs/plugins.md", "def test_it_kills_the_largest_background", kernel=True)
def _test_in_a_sandbox(run: Run) -> None:
    # The snippet makes its own memory cgroup (with a hard limit) and hogs inside it.
    require_root()
    run.exec()
    try:
        assert run.run_its_tests() == ["test_it_kills_the_largest_background_process_in_a_sandbox"]
    except reapkit.Unsupported as exc:
        need(exc.feature)


@exercises("docs/plugins.md", '[project.entry-points."reapkit.plugins"]', language="toml")
def _entry_point(run: Run) -> None:
    project = tomllib.loads(run.code)["project"]
    assert "reapkit" in project["dependencies"]
    eps = [
        importlib.metadata.EntryPoint(name, value, group)
        for group, table in project["entry-points"].items()
        for name, value in table.items()
    ]
    run.fixture("monkeypatch").setattr(
        importlib.metadata, "entry_points", lambda *, group: [e for e in eps if e.group == group]
    )
    registry = reapkit.PluginRegistry()
    assert registry.load_entry_points() == []  # the group reapkit reads, by default
    assert registry.get("selector", "largest-background") is run.namespace["LargestBackground"]


def _registered_on_a_fake_tree(
    run: Run, plugin: str, policy_text: str
) -> tuple[ProcFS, reapkit.Policy]:
    """Run the snippet and register the ``plugin`` class it defines; load ``policy_text`` on a
    fake tree of one process."""
    run.exec()
    reapkit.register(run.namespace[plugin])
    fake = FakeProc(run.tmp_path / "proc")
    fake.add_process(100, comm="victim", rss=100 * MiB)
    procfs = ProcFS(fake.root)
    return procfs, reapkit.load_policy(text=policy_text, procfs=procfs)


@exercises("docs/plugins.md", "class Snapshot(reapkit.Action)")
def _action(run: Run) -> None:
    procfs, policy = _registered_on_a_fake_tree(
        run, "Snapshot", _rule('select = ["largest-rss"]', actions='actions = ["snapshot", "kill"]')
    )
    record = trio.run(functools.partial(_first_record, policy, procfs=procfs))
    assert record.outcome == "dry-run"  # a fake tree's guard never signals
    snapshot = record.actions[0]
    assert (snapshot.action, snapshot.outcome, snapshot.detail) == ("snapshot", "ok", "saved")


@exercises("docs/plugins.md", "class Counter(reapkit.Observer)", kernel=True)
def _observer(run: Run) -> None:
    run.exec()
    reapkit.register(run.namespace["Counter"])
    cgroup = run.fixture("memory_cgroup")
    victim = run.fixture("spawn")(cgroups=[cgroup])
    policy = reapkit.load_policy(
        text=_sandbox_rule(cgroup.directory) + '[[observer]]\nname = "counter"\n'
    )
    (counter,) = policy.observers

    async def kill_and_count() -> reapkit.KillRecord:
        async with (
            reapkit.open_reaper(policy, live_table=False) as reaper,
            reaper.records() as records,
        ):
            await reaper.trigger("the docs' test asks")
            with trio.fail_after(30):
                record = await records.receive()
                while counter.kills == 0:  # observers hear after the subscribers
                    await trio.sleep(0.01)
            return record

    record = trio.run(kill_and_count)
    assert record.outcome == "killed"
    assert victim.wait(10) == -signal.SIGKILL
    assert counter.kills == 1


@exercises("docs/plugins.md", "class Every(reapkit.Trigger)")
def _trigger(run: Run) -> None:
    procfs, policy = _registered_on_a_fake_tree(
        run, "Every", _rule('select = ["largest-rss"]') + '[[trigger]]\nname = "every-minute"\n'
    )

    async def a_minute() -> tuple[float, reapkit.KillRecord]:
        start = trio.current_time()
        record = await _first_record(policy, procfs=procfs, trigger=False, within=90)
        return trio.current_time() - start, record

    # A fake tree, no conditions, built-in selectors only: no fds, no threads to wait for,
    # so the autojump clock can skip the minute.
    waited, record = trio.run(a_minute, clock=trio.testing.MockClock(autojump_threshold=0))
    assert waited >= 60
    assert "a minute passed" in record.condition
    assert record.outcome == "dry-run"


# -- docs/policies.md, docs/operations.md, docs/tutorial.md ------------------------------------


@exercises("docs/policies.md", "[reaper]              # optional", language="toml")
def _layout(run: Run) -> None:
    policy = reapkit.load_policy(text=_fill_placeholders(run.code))
    assert policy.dry_run is False
    assert policy.reap.threads == 2
    (rule,) = policy.rules
    assert rule.name == "low-memory"
    assert [s.name for s in rule.selectors] == ["protect", "oom-score"]
    assert [a.name for a in rule.actions] == ["terminate", "reap"]
    assert [type(o) for o in policy.observers] == [_AnObserver]
    assert [type(t) for t in policy.triggers] == [_ATrigger]


@exercises("docs/policies.md", '{ name = "protect", comm = ["^(sshd|', language="toml")
def _protect_by_identity(run: Run) -> None:
    # "system services by name *and* a system account, which no user can take"
    fake = FakeProc(run.tmp_path / "proc")
    fake.add_process(100, comm="sshd", uid=0, oom_score=900)
    fake.add_process(101, comm="sshd", uid=1000, oom_score=800)  # a user's, so named
    fake.add_process(102, comm="worker", uid=1000, oom_score=100)
    chosen, _steps = _preview(fake, _rule(run.code))
    assert chosen is not None
    assert chosen.candidate.pid == 101


@exercises(
    "docs/policies.md", '[[trigger]]\nname = "..."            # a plugin name', language="toml"
)
def _trigger_table(run: Run) -> None:
    policy = reapkit.load_policy(text=_rule("") + _fill_placeholders(run.code))
    assert [type(t) for t in policy.triggers] == [_ATrigger]


@exercises("docs/policies.md", 'name = "prometheus"     # a plugin name', language="toml")
@exercises(
    "docs/operations.md", 'name = "prometheus"   # http://127.0.0.1:9877/metrics', language="toml"
)
def _prometheus_observer(run: Run) -> None:
    pytest.importorskip("reapkit_prometheus", reason="reapkit-prometheus is not installed")
    policy = reapkit.load_policy(text=_rule("") + run.code)  # found through its entry point
    (observer,) = policy.observers
    assert observer.name == "prometheus"
    options = observer.options
    said = re.search(r"# (http://\S+); options ([\w, ]+)", run.code)
    if said:  # operations.md: where it serves, by default, and its options
        assert said.group(1) == f"http://{options.host}:{options.port}{options.path}"
        assert said.group(2).split(", ") == [f.name for f in attrs.fields(type(options))]


#: The cgroup the tutorial has the reader create (v1; it says what it is on v2).
_TUTORIAL_CGROUP = "/sys/fs/cgroup/memory/tutorial"


@exercises("docs/tutorial.md", "# first.toml", language="toml", kernel=True)
def _first_policy(run: Run) -> None:
    cgroup = run.fixture("memory_cgroup")
    assert _TUTORIAL_CGROUP in run.code
    first = run.tmp_path / "first.toml"
    first.write_text(run.code.replace(_TUTORIAL_CGROUP, cgroup.directory))
    # `reapkit check first.toml --now` prints the policy as understood, then the live part.
    (shown,) = [c for _, c in _snippets("tutorial.md", "console") if "check first.toml" in c]
    expected = shown.split("\n", 1)[1].split("\nright now")[0].rstrip()
    done = subprocess.run(
        [sys.executable, "-m", "reapkit", "check", "first.toml"],
        cwd=run.tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.replace(cgroup.directory, _TUTORIAL_CGROUP).rstrip() == expected


# -- plugins/*/README.md -----------------------------------------------------------------------


@exercises("plugins/reapkit-kubernetes/README.md", "parse_cgroup_path(")
def _pod_info(run: Run) -> None:
    pytest.importorskip("reapkit_kubernetes", reason="reapkit-kubernetes is not installed")
    run.exec()
    info = run.namespace["info"]
    # The comment under the call shows the result: `PodInfo(qos='besteffort', ...)`.
    shown = " ".join(line.lstrip("# ") for line in run.code.splitlines() if line.startswith("#"))
    assert shown.startswith(f"{type(info).__name__}(")
    fields = re.findall(r"(\w+)=('[^']*'|True|False|None)", shown)
    assert {name for name, _ in fields} == {f.name for f in attrs.fields(type(info))}
    for name, value in fields:
        actual = repr(getattr(info, name))
        if value.endswith("…'"):  # cut short on the page
            assert actual.startswith(value.removesuffix("…'")), name
        else:
            assert actual == value, name


@exercises("plugins/reapkit-prometheus/README.md", "isinstance(o, PrometheusObserver)", kernel=True)
def _prometheus_endpoint(run: Run) -> None:
    pytest.importorskip("reapkit_prometheus", reason="reapkit-prometheus is not installed")
    from prometheus_client.parser import text_string_to_metric_families

    cgroup = run.fixture("memory_cgroup")
    policy = run.tmp_path / "policy.toml"
    policy.write_text(
        _sandbox_rule(cgroup.directory) + '[[observer]]\nname = "prometheus"\nport = 0\n'
    )
    printed: list[tuple[object, ...]] = []
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

    async def the_rest_of_the_service(reaper: reapkit.Reaper) -> None:
        """Scrape the endpoint the snippet printed."""
        (url,) = printed[0]
        text = await trio.to_thread.run_sync(_http_get, str(url))  # the server runs on trio
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value

    assert _POLICY_FILE in run.code
    assert _THE_REST in run.code
    code = run.code.replace(_POLICY_FILE, str(policy))
    code = code.replace(_THE_REST, "await _the_rest_of_the_service(reaper)")
    run.namespace["print"] = lambda *args: printed.append(args)
    run.namespace["_the_rest_of_the_service"] = the_rest_of_the_service
    run.exec(code)
    (url,) = printed[0]
    assert re.fullmatch(r"http://127\.0\.0\.1:[1-9]\d*/metrics", str(url)), url
    # The reaper attached itself: its own counters, and the rule's series from 0.
    assert samples[("reapkit_decisions_total", frozenset())] == 0
    killed = frozenset({("rule", "sandbox"), ("outcome", "killed")})
    assert samples[("reapkit_kills_total", killed)] == 0


@exercises("plugins/reapkit-notify/README.md", 'name = "notify"', language="toml")
def _notify_observer(run: Run) -> None:
    pytest.importorskip("reapkit_notify", reason="reapkit-notify is not installed")
    policy = reapkit.load_policy(text=run.code)  # found through its entry point
    (observer,) = policy.observers
    assert observer.name == "notify"
    assert observer.options.min_interval == 30.0
    assert [a.name for a in policy.rules[0].actions] == ["warn", "terminate"]


# -- the runner --------------------------------------------------------------------------------


@pytest.fixture
def fresh_default_registry() -> Iterator[None]:
    """The default registry as a process starts with it (the installed plugins to be found
    through their entry points), and as it was again after the test: a snippet that
    registers a plugin can run once in every test."""
    registry = _plugins.default_registry
    names = [a.name for a in attrs.fields(type(registry))]
    saved = {name: getattr(registry, name) for name in names}
    fresh = reapkit.PluginRegistry()
    fresh.discover_entry_points()
    for name in names:
        setattr(registry, name, getattr(fresh, name))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(registry, name, value)


# -- docs/replay.md ------------------------------------------------------------------------------


@exercises("docs/replay.md", "def test_a_leak_costs_the_leaker_and_never_sshd")
def _replay_test(run: Run) -> None:
    run.exec()
    assert run.run_its_tests() == ["test_a_leak_costs_the_leaker_and_never_sshd"]


_REPLAY_CGROUP = "/sys/fs/cgroup/memory/replay-demo"


def _wait_for_trace(path: Path, timeout: float = 30.0) -> None:
    """Until the trace at ``path`` has its first sample on disk (the recorder is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(TraceError):
            if read_trace(str(path)).records:
                return
        time.sleep(0.1)
    raise AssertionError(f"no trace at {path} within {timeout} s")


@exercises("docs/replay.md", 'name = "early"', language="toml", kernel=True)
def _replay_walkthrough(run: Run) -> None:
    # Steps 2-4 in a memory cgroup this test made (256 MiB), with a grower this test started:
    # record for both policies, then compare them as the page does.
    require_root()
    cgroup = run.fixture("memory_cgroup")
    cgroup.set_memory_limit(256 * MiB)
    early = run.tmp_path / "early.toml"
    early.write_text(run.code.replace(_REPLAY_CGROUP, cgroup.directory))
    late = run.tmp_path / "late.toml"  # "the same with `name = "late"` and `... > 90%`"
    assert _quoted("docs/replay.md", 'name = "late"') and _quoted("docs/replay.md", '"cgroup_usage')
    late.write_text(
        early.read_text().replace('name = "early"', 'name = "late"').replace("> 50%", "> 90%")
    )
    trace = run.tmp_path / "demo.trace"
    command = [sys.executable, "-m", "reapkit.cli"]
    recorder = subprocess.Popen(
        [*command, "record", "--out", str(trace), "--policy", str(early), "--policy", str(late),
         "--duration", "8s"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_trace(trace)  # the recorder is up
        with start_grower(8 * MiB, 0.1, 512 * MiB, [cgroup.directory]) as grower:
            grower.process.wait(timeout=20)  # the kernel's OOM killer ends it at the limit
        _out, err = recorder.communicate(timeout=30)
        assert recorder.returncode == 0, err
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    shown = subprocess.run(
        [*command, "replay", str(early), str(late), str(trace)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    result = replay(str(early), str(trace))
    later = replay(str(late), str(trace))
    first, last = result.decisions[0], later.decisions[0]
    assert first.record.victim and last.record.victim
    assert first.record.victim.pid == last.record.victim.pid  # the grower, by both
    assert first.t < last.t  # half the limit before 90 % of it
    assert first.happened and last.happened
    assert "then differ" in shown and str(early) in shown


def _runs() -> list[Any]:
    """A test for each snippet with a check of its own here (one without is reported by
    ``test_every_snippet_has_its_check``)."""
    runs = []
    for page in _pages():
        for snippet in _page_snippets(page):
            claims = _claims_of(snippet)
            if len(claims) == 1 and isinstance(claims[0], Claim):
                marks = [pytest.mark.kernel] if claims[0].kernel else []
                runs.append(pytest.param(snippet, id=str(snippet), marks=marks))
    return runs


@pytest.mark.parametrize("snippet", _runs())
@pytest.mark.usefixtures("fresh_default_registry")
def test_the_snippet_does_what_its_page_says(
    snippet: Snippet, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_name = _MODULES.get(snippet.page)
    if module_name is None:
        namespace: dict[str, Any] = {"__name__": "__main__"}
    else:
        module = types.ModuleType(module_name)
        monkeypatch.setitem(sys.modules, module_name, module)
        namespace = module.__dict__
    for earlier in _page_snippets(snippet.page):
        if earlier == snippet:
            break
        if earlier.language == "python":
            _run_snippet(earlier.code, str(earlier), namespace)
    (claim,) = _claims_of(snippet)
    assert isinstance(claim, Claim)
    claim.check(Run(snippet, namespace, request))


def test_every_snippet_has_its_check() -> None:
    problems = []
    snippets = [s for page in _pages() for s in _page_snippets(page)]
    for snippet in snippets:
        claims = _claims_of(snippet)
        if len(claims) != 1:
            problems.append(f"{snippet} ({snippet.language}): {len(claims)} checks, not one")
    markers = [(c.page, c.language, c.marker) for c in _CLAIMS] + list(_ELSEWHERE)
    for page, language, marker in markers:
        if not any((s.page, s.language) == (page, language) and marker in s.code for s in snippets):
            problems.append(f"{page}: no {language} snippet contains {marker!r} any more")
    for test in _ELSEWHERE.values():
        path, name = test.split("::")
        if f"def {name}(" not in (ROOT / path).read_text(encoding="utf-8"):
            problems.append(f"{test}: no such test")
    assert not problems, "\n".join(problems)


# -- sh and console blocks ---------------------------------------------------------------------

#: What ``make`` writes, named in the commands after it (``make man``, ``make completions``).
_MADE = ("build/",)


def _command_lines(page: str) -> Iterator[tuple[int, list[str]]]:
    """(line, argv) of each command of the page's ``sh`` blocks, of its ``console`` blocks
    the lines after a ``$`` prompt, and of its ``ini`` blocks (systemd drop-ins) the
    ``Exec...=`` commands. Comments go; continued lines are joined."""
    for language in ("sh", "console", "ini"):
        for start, code in _snippets(ROOT / page, language):
            lines = code.splitlines()
            i = 0
            while i < len(lines):
                number, line = start + i, lines[i].strip()
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = f"{line[:-1]} {lines[i].strip()}"
                i += 1
                if language == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                elif language == "ini":
                    line = line.partition("=")[2] if line.startswith("Exec") else ""
                argv = shlex.split(line, comments=True)
                if argv:
                    yield number, argv


def _files_named(argv: list[str]) -> list[str]:
    """The repository files a command names (relative paths)."""
    if argv[0] == "kubectl":
        return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-f"]
    if argv[0] == "install":
        named = [argv[-2]]
    elif Path(argv[0]).name in ("reapkit", "python"):
        named = argv[1:]
    else:
        return []
    return [a for a in named if "/" in a and not a.startswith(("-", "/", *_MADE))]


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([\w.-]+):", text, re.M))


def test_the_commands_shown_exist() -> None:
    parser = _main._build_parser()
    targets = _makefile_targets()
    problems = []
    for page in _pages():
        for line, argv in _command_lines(page):
            where = f"{page}:{line}: {shlex.join(argv)}"
            if Path(argv[0]).name == "reapkit":  # or where a drop-in says it is
                out = io.StringIO()
                try:
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                        parser.parse_args(argv[1:])
                except UsageError as exc:
                    problems.append(f"{where}: {exc}")
                except SystemExit as exc:  # --version, --help
                    if exc.code:
                        problems.append(f"{where}: {out.getvalue().strip()}")
            elif argv[0] == "make":
                problems += [f"{where}: no target {t}" for t in argv[1:] if t not in targets]
            for name in _files_named(argv):
                if not any((base / name).exists() for base in (ROOT, (ROOT / page).parent)):
                    problems.append(f"{where}: no file {name}")
    assert not problems, "\n".join(problems)

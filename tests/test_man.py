"""The man page and the shell completions, made from the command's own parser
(``man/generate.py``; ``make man``, ``make completions``), and ``python -m reapkit``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from reapkit import __version__
from reapkit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "man" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands() -> dict[str, object]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return dict(sub.choices)  # type: ignore[arg-type]


def test_the_man_page_has_every_command_and_option(tmp_path: Path) -> None:
    if not Path(sys.executable).with_name("argparse-manpage").exists():
        pytest.skip("argparse-manpage is not installed (the 'docs' extra has it)")
    page = _generate().write_man(tmp_path).read_text(encoding="utf-8")
    assert page.startswith('.TH REAPKIT "1" ')
    assert f"reapkit {__version__}" in page.splitlines()[0]
    for name, parser in [("", build_parser()), *_commands().items()]:
        assert not name or f"'reapkit {name}'" in page, name
        for action in parser._actions:  # type: ignore[attr-defined]
            for option in action.option_strings:
                if option not in ("-h", "--help"):  # argparse-manpage leaves help out
                    assert option.replace("-", r"\-") in page, (name, option)
    for section in ("ENVIRONMENT", "FILES", "SIGNALS", "SEE ALSO"):
        assert f".SH {section}" in page
    assert "REAPKIT_POLICY" in page and "/etc/reapkit/policy.toml" in page
    man = shutil.which("man")
    if man is None:
        pytest.skip("man(1) is not installed: the page was not rendered")
    rendered = subprocess.run(
        [man, "--warnings", "-l", str(tmp_path / "reapkit.1")],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat"},
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stderr == "", rendered.stderr  # groff's warnings: none
    assert "reapkit run" in rendered.stdout


def _complete(script: Path, *words: str) -> list[str]:
    """What bash completes after ``words`` (the last one being typed)."""
    line = " ".join(words)
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
        f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}\n'
        "_shtab_reapkit\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_bash_completion_completes_commands_options_and_paths(tmp_path: Path) -> None:
    pytest.importorskip("shtab", reason="shtab is not installed (the 'docs' extra has it)")
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    bash, zsh = _generate().write_completions(tmp_path / "completions")
    assert (bash.name, zsh.name) == ("reapkit", "_reapkit")
    assert sorted(_complete(bash, "reapkit", "")) == sorted(_commands())
    assert _complete(bash, "reapkit", "ch") == ["check"]
    assert {"--dry-run", "--records", "--scope", "--log-format"} <= set(
        _complete(bash, "reapkit", "run", "--")
    )
    assert _complete(bash, "reapkit", "run", "--log-format", "") == ["text", "json"]
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "server.toml").write_text("")
    (tmp_path / "pol").mkdir()
    prefix = str(tmp_path / "pol")
    # A policy is a file: files and directories; --scope is a cgroup directory: directories.
    assert sorted(_complete(bash, "reapkit", "check", prefix)) == [prefix, f"{prefix}icies"]
    assert _complete(bash, "reapkit", "check", f"{tmp_path}/policies/s") == [
        f"{tmp_path}/policies/server.toml"
    ]
    assert _complete(bash, "reapkit", "run", "--scope", f"{tmp_path}/policies/") == []
    text = zsh.read_text(encoding="utf-8")
    assert text.startswith("#compdef reapkit")
    assert ":CGROUP_DIR:_files -/" in text  # --scope completes directories in zsh too
    zsh_binary = shutil.which("zsh")
    if zsh_binary is not None:
        checked = subprocess.run(
            [zsh_binary, "-n", str(zsh)], capture_output=True, timeout=60, check=False
        )
        assert checked.returncode == 0, checked.stderr


def test_python_m_reapkit_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "reapkit", "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, f"reapkit {__version__}")
    bad = subprocess.run(
        [sys.executable, "-m", "reapkit", "nonsense"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("reapkit: error: ")

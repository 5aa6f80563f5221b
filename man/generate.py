"""Write the ``reapkit`` man page and shell completions, both made from the command's own
argument parser (``reapkit.cli.build_parser``), so they cannot drift from it.

    python man/generate.py --man build/man            # reapkit.1 (argparse-manpage)
    python man/generate.py --completions build/completions
                                                      # bash/reapkit, zsh/_reapkit (shtab)

``make man`` and ``make completions`` run it; the tools come with the ``docs`` extra. The
man page's date is ``SOURCE_DATE_EPOCH`` where set (reproducible builds), else today.
Install: ``reapkit.1`` in ``/usr/local/share/man/man1/``, ``bash/reapkit`` in
``/usr/local/share/bash-completion/completions/``, ``zsh/_reapkit`` in a directory of
``$fpath`` such as ``/usr/local/share/zsh/site-functions/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import reapkit
from reapkit.cli import build_parser

HERE = Path(__file__).resolve().parent
#: Completion scripts, by shell: where each goes under the output directory.
COMPLETIONS = {"bash": "bash/reapkit", "zsh": "zsh/_reapkit"}
DESCRIPTION = "user-space out-of-memory reaper: pidfds, PSI, the proc connector, process_mrelease"
URL = "https://github.com/reapkit/reapkit"


def _missing(tool: str) -> SystemExit:
    return SystemExit(f"{tool} is not installed: pip install -e '.[docs]' (make .venv/.installed)")


def write_man(directory: Path) -> Path:
    """``directory/reapkit.1``."""
    tool = Path(sys.executable).with_name("argparse-manpage")
    if not tool.exists():
        raise _missing("argparse-manpage")
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "reapkit.1"
    subprocess.run(
        [
            str(tool), "--module", "reapkit.cli", "--function", "build_parser",
            "--project-name", "reapkit", "--prog", "reapkit", "--version", reapkit.__version__,
            "--description", DESCRIPTION, "--url", URL, "--manual-title", "reapkit manual",
            "--include", str(HERE / "reapkit.1.include"), "--output", str(out),
        ],
        check=True,
    )  # fmt: skip
    return out


def write_completions(directory: Path) -> list[Path]:
    """``directory/bash/reapkit`` and ``directory/zsh/_reapkit``."""
    try:
        import shtab  # noqa: PLC0415 - the docs extra's: a clear message without it
    except ImportError:
        raise _missing("shtab") from None
    written = []
    for shell, name in COMPLETIONS.items():
        out = directory / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(shtab.complete(build_parser(), shell=shell), encoding="utf-8")
        written.append(out)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--man", type=Path, metavar="DIR", help="write DIR/reapkit.1")
    parser.add_argument("--completions", type=Path, metavar="DIR", help="write them under DIR")
    args = parser.parse_args()
    if args.man is None and args.completions is None:
        parser.error("nothing to do: --man DIR, --completions DIR or both")
    written = []
    if args.man is not None:
        written.append(write_man(args.man))
    if args.completions is not None:
        written += write_completions(args.completions)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()

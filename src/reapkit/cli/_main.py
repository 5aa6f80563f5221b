"""Argument parsing and the one place where errors become one line and an exit status."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

from .._errors import AccessDenied, PolicyError, ReapkitError, Unsupported
from .._interrupts import interrupt_on_termination
from .._version import __version__
from ._journal import JournalFormatter, prefixed, under_journald
from ._status import (
    CLI_EXTRA,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
    extra_missing,
)

#: Each command's module in this package, in the order ``reapkit --help`` lists them. A command
#: imports only its own module: the daemon (``run``) must not carry the other commands' code and
#: libraries (rich) in its locked memory.
COMMANDS: Final = {
    "run": "._run",
    "check": "._check",
    "demo": "._demo",
    "top": "._top",
    "plugins": "._plugins",
    "doctor": "._doctor",
    "probe": "._probe",
    "record": "._record",
    "replay": "._replay",
}

EPILOG = """\
exit status: 0 success; 1 failed (doctor: a needed feature is missing; record: the trace
could not be written to the end); 2 bad usage, invalid policy or unreadable trace; 3 not
possible here (privilege, capability, kernel feature, cgroup controller, the extra
reapkit[cli]); 130 interrupted."""


#: How the commands other than ``run`` log (warnings only, or debug with ``-v``).
_LOG_FORMAT: Final = "%(name)s: %(levelname)s: %(message)s"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage block.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone when it is one of ours."""
    parser = _Parser(
        prog="reapkit",
        description="A user-space OOM reaper framework: pidfds, PSI, the proc connector and"
        " process_mrelease, on trio.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in COMMANDS.items():
        if command in COMMANDS and name != command:
            continue
        try:
            importlib.import_module(module, __package__).add_parser(commands)
        except ModuleNotFoundError as exc:
            missing = extra_missing(name, exc)
            if missing is None:
                raise
            if name == command:
                raise missing from None
            commands.add_parser(name, help=f"(needs the extra {CLI_EXTRA}, not installed here)")
    for sub in commands.choices.values():
        # Not given after the command word, they leave what was given before it.
        _add_global_options(sub, default=argparse.SUPPRESS)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    """``reapkit``'s own options, accepted before and after the command word."""
    parser.add_argument("-V", "--version", action="version", version=f"reapkit {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="log debug details, and show the traceback of an unexpected error",
    )  # fmt: skip


#: The completions' hints for arguments that name files or directories (shtab's FILE and
#: DIRECTORY, for the shells ``make completions`` writes for), by metavar or, without one,
#: by name.
_FILE: Final = {"bash": "_shtab_compgen_files", "zsh": "_files"}
_COMPLETE: Final = {
    "policy": _FILE,
    "PATH": _FILE,
    "HEARTBEAT": _FILE,
    "CGROUP_DIR": {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"},
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: what the man page and the shell completions are made
    from (``make man``, ``make completions``), with hints where files are named."""
    parser = _build_parser()
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in [parser, *(p for a in commands for p in a.choices.values())]:
        for action in sub._actions:
            name = action.metavar or action.dest
            hint = _COMPLETE.get(name) if isinstance(name, str) else None
            if hint is not None:
                action.complete = hint  # shtab reads it
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command word of ``argv``: its first word that is not an option (``reapkit``'s own
    options take no value); ``None`` when help is asked for before it (every command listed)."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reapkit`` command; returns the exit status."""
    prog = "reapkit"
    verbose = False
    try:
        if argv is None:
            argv = sys.argv[1:]
        command = _command_in(argv)
        interrupt_on_termination(hangup=command != "run")
        parser = _build_parser(command)
        args = parser.parse_args(argv)
        verbose = args.verbose
        handler, formatter = logging.StreamHandler(), logging.Formatter(_LOG_FORMAT)
        handler.setFormatter(JournalFormatter(formatter) if under_journald() else formatter)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[handler]
        )
        run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
        if run is None:
            parser.print_help()
            return EXIT_USAGE
        prog = f"reapkit {args.command}"
        return run(args)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        return _report(_single_cause(exc), prog, verbose=verbose)


def _single_cause(exc: BaseException) -> BaseException:
    """An error in a task that started others (the reaper's nursery) arrives wrapped in
    exception groups: with a single cause, that cause, as if it had come alone."""
    leaves: list[BaseException] = []

    def collect(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                collect(inner)
        else:
            leaves.append(e)

    collect(exc)
    return leaves[0] if len(leaves) == 1 else exc


def _report(exc: BaseException, prog: str, *, verbose: bool) -> int:
    """One line on stderr and the documented exit status."""

    def say(message: str) -> None:
        line = f"{prog}: {message}"
        print(prefixed(line, logging.ERROR) if under_journald() else line, file=sys.stderr)

    if isinstance(exc, UsageError):
        say(f"error: {exc}")
        return EXIT_USAGE
    if isinstance(exc, PolicyError):
        say(f"invalid policy: {exc}")
        return EXIT_USAGE
    if isinstance(exc, Unsupported | AccessDenied):
        say(str(exc))
        return EXIT_UNAVAILABLE
    if isinstance(exc, ReapkitError):  # KillRefused among them: a refusal, not a privilege
        say(str(exc))
        return EXIT_FAILURE
    if isinstance(exc, BrokenPipeError):
        # `reapkit check | head -1`: the reader left; say nothing (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    if isinstance(exc, PermissionError):
        say(f"permission denied: {exc.filename or exc} (run as root)")
        return EXIT_UNAVAILABLE
    if isinstance(exc, KeyboardInterrupt):
        say("interrupted")
        return EXIT_INTERRUPTED
    if not isinstance(exc, Exception):
        raise exc
    # A bug or an unforeseen host: one line, the traceback only when asked for.
    if verbose:
        traceback.print_exception(exc)
    hint = "" if verbose else " (rerun with -v for the traceback)"
    say(f"unexpected error: {type(exc).__name__}: {exc}{hint}")
    return EXIT_FAILURE

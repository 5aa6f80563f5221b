"""``python -m reapkit`` imports this package before its ``__main__`` runs, a third of a
second or more: a SIGHUP meanwhile (``systemctl reload`` of a unit still starting) would
end the daemon. Imported first by ``__init__``, this ignores SIGHUP at once, as the console
script does from its first line (``src/_reapkit_cli.py``), when and only when the
interpreter was started to run the command (``-m reapkit`` or ``-m reapkit.cli``)."""

import signal
import sys

#: What ``python -m`` may name to run the ``reapkit`` command.
COMMAND_MODULES = ("reapkit", "reapkit.cli")


def run_as_the_command(argv: list[str]) -> bool:
    """Whether the interpreter's own command line (``sys.orig_argv``) runs the command."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None) in COMMAND_MODULES
        if arg.startswith("-m"):
            return arg[2:] in COMMAND_MODULES
        if arg in ("-W", "-X", "--check-hash-based-pycs"):
            next(args, None)  # the option's value
        elif arg in ("-c", "-") or not arg.startswith("-"):
            return False  # a program of its own, or a script
    return False


if run_as_the_command(sys.orig_argv):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

"""The ``reapkit`` console script. It lives outside the ``reapkit`` package so that its first
line runs before the package's imports (a third of a second, seconds on a loaded host): a
SIGHUP meanwhile (``systemctl reload`` of a unit that is still starting) would end the daemon.
SIGHUP is ignored until ``reapkit run`` can reload (its trio signal receiver takes over) or
another command installs its own handler."""

import signal
import sys


def main() -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from reapkit.cli import main as reapkit_main  # noqa: PLC0415 - after the line above

    return reapkit_main()


if __name__ == "__main__":
    sys.exit(main())

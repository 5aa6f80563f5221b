"""The ``reapkit`` command.

Exit statuses (documented in the README and ``reapkit --help``):

* 0 — success;
* 1 — the job failed (``doctor``: a feature a reaper needs is missing);
* 2 — bad usage: unknown command or option, invalid value, invalid policy;
* 3 — not possible here: missing privilege, capability, kernel feature or cgroup controller,
  or the extra ``reapkit[cli]`` an interactive command needs;
* 130 — interrupted (Ctrl-C), after cleaning up.
"""

from __future__ import annotations

from ._main import build_parser, main
from ._status import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

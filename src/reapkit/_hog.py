"""A memory hog for the demo, tests and benchmarks: ``python -m reapkit._hog``.

The child joins the given cgroups *before* it allocates (so every page is charged to the
sandbox and its hard limit), touches ``size`` bytes of private anonymous memory (what
``process_mrelease`` frees), says ``ready`` on stdout and then sleeps until killed.
"""

from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType

import attrs

_CHUNK = 1 << 20


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    size = int(args[0])
    for directory in args[1:]:
        with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write(str(os.getpid()))
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    chunk = b"\x5a" * _CHUNK
    for _ in range(size // _CHUNK):
        memory.write(chunk)
    memory.write(chunk[: size % _CHUNK])
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        time.sleep(3600)


@attrs.define(eq=False)
class Hog:
    """A running hog started by :func:`start_hog`. Context manager: kills and waits on exit."""

    process: subprocess.Popen[bytes]
    size: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGKILL (through ``Popen``, which holds our child's PID until we wait) and reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Hog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_hog(size: int, cgroup_dirs: Sequence[str], *, timeout: float = 30.0) -> Hog:
    """Start a hog of ``size`` bytes inside ``cgroup_dirs`` and wait until it holds them all."""
    if not cgroup_dirs:
        raise ValueError("a hog must run inside a memory cgroup with a hard limit")
    process = subprocess.Popen(
        [sys.executable, "-m", "reapkit._hog", str(size), *cgroup_dirs],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    hog = Hog(process, size)
    try:
        assert process.stdout is not None
        # A hog that dies (e.g. OOM-killed in its cgroup) closes stdout: readline returns b"".
        if not select.select([process.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"memory hog of {size} bytes not ready within {timeout} s")
        line = process.stdout.readline()
        if line.strip() != b"ready":
            code = process.wait(timeout)
            raise RuntimeError(f"memory hog of {size} bytes failed to start (exit status {code})")
    except BaseException:
        hog.stop()
        raise
    return hog


if __name__ == "__main__":
    main()

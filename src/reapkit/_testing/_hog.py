"""Memory hogs and pressure makers for the demo, tests and benchmarks, each a child process
(``python -m reapkit._testing._hog``, below as ``hog``).

``hog SIZE [CGROUP_DIR ...]``: the child joins the given cgroups *before* it allocates (so
every page is charged to the sandbox and its hard limit), touches ``SIZE`` bytes of private
anonymous memory (what ``process_mrelease`` frees), says ``ready`` on stdout and then sleeps
until killed.

``hog grow STEP INTERVAL LIMIT [CGROUP_DIR ...]``: a leak, growing by
``STEP`` bytes every ``INTERVAL`` seconds up to ``LIMIT``.

``hog pulse [CGROUP_DIR ...]``: holds memory on orders from stdin, ``N``
bytes touched at once for a line ``N`` (``0``: none), answering each with ``ok``: a cgroup's
usage that falls (as after a kill) and rises again when the test says, without a process start
in between.

``hog thrash FILE [CGROUP_DIR ...]``: real memory pressure without swap
(``shared/KERNEL_NOTES.md``). It reads a file larger than its memory cgroup's limit through
``mmap``, page by page, in a loop: the page cache thrashes and tasks stall on reclaim and I/O,
which is what PSI measures.
"""

from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType

import attrs

from .._interrupts import deferred_interrupts

_CHUNK = 1 << 20


def _join(cgroup_dirs: Sequence[str]) -> None:
    for directory in cgroup_dirs:
        with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write(str(os.getpid()))


def _thrash(path: str) -> None:
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    step = mmap.PAGESIZE
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for offset in range(0, len(view), step):
            view[offset]


def _grow(step: int, interval: float, limit: int) -> None:
    """Allocate ``step`` bytes every ``interval`` seconds up to ``limit``: a leak, visibly."""
    blocks: list[bytes] = []
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while len(blocks) * step < limit:
        blocks.append(b"\x5a" * step)
        time.sleep(interval)
    while True:
        time.sleep(3600)


def _touch(size: int) -> mmap.mmap:
    """``size`` bytes of private anonymous memory, every page written."""
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    chunk = b"\x5a" * _CHUNK
    for _ in range(size // _CHUNK):
        memory.write(chunk)
    memory.write(chunk[: size % _CHUNK])
    return memory


def _pulse() -> None:
    held = _touch(0)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        held.close()
        held = _touch(int(line))
        sys.stdout.write("ok\n")
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[0] == "thrash":
        _join(args[2:])
        _thrash(args[1])
        return
    if args[0] == "grow":
        _join(args[4:])
        _grow(int(args[1]), float(args[2]), int(args[3]))
        return
    if args[0] == "pulse":
        _join(args[1:])
        _pulse()
        return
    _join(args[1:])
    memory = _touch(int(args[0]))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while memory:  # holds the mapping until killed
        time.sleep(3600)


@attrs.define(eq=False)
class Hog:
    """A running hog started by :func:`start_hog`. Context manager: kills and waits on exit."""

    process: subprocess.Popen[bytes]
    size: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def hold(self, size: int) -> None:
        """A hog of :func:`start_pulser`: free what it holds, then hold ``size`` bytes."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(b"%d\n" % size)
        stdin.flush()
        if stdout.readline() != b"ok\n":
            raise RuntimeError(f"memory hog {self.pid} died (exit status {self.process.wait()})")

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGKILL (through ``Popen``, which holds our child's PID until we wait) and reap.
        Interrupts are held meanwhile, so a second Ctrl-C cannot leave the hog behind."""
        with deferred_interrupts():
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout)
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    stream.close()

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
    return _start([str(size)], size, cgroup_dirs, timeout)


def start_grower(
    step: int, interval: float, limit: int, cgroup_dirs: Sequence[str], *, timeout: float = 30.0
) -> Hog:
    """Start a hog that grows by ``step`` bytes every ``interval`` s up to ``limit`` bytes."""
    return _start(["grow", str(step), str(interval), str(limit)], limit, cgroup_dirs, timeout)


def start_pulser(cgroup_dirs: Sequence[str], *, timeout: float = 30.0) -> Hog:
    """Start a hog that holds nothing until told: :meth:`Hog.hold`."""
    return _start(["pulse"], 0, cgroup_dirs, timeout, stdin=subprocess.PIPE)


def filesystem_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (from ``/proc/self/mountinfo``)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            mountpoint = fields[4]
            inside = real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best):
                best, fstype = mountpoint, fields[fields.index("-") + 1]
    return fstype


def disk_backed_tmp() -> str | None:
    """A temporary directory whose pages are page cache that can be reclaimed: not tmpfs
    (shmem cannot be reclaimed without swap, so thrashing it makes no pressure)."""
    for candidate in (tempfile.gettempdir(), "/var/tmp"):
        if os.path.isdir(candidate) and filesystem_type(candidate) not in ("tmpfs", "ramfs"):
            return candidate
    return None


def make_thrash_file(path: str, size: int = 256 << 20) -> None:
    """Write ``size`` bytes of real data (not holes: reading them must do I/O) and drop the
    file from the page cache, so a thrasher's reads are charged to its own cgroup."""
    chunk = bytes(range(256)) * 4096
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def start_thrasher(path: str, cgroup_dirs: Sequence[str], *, timeout: float = 30.0) -> Hog:
    """Start a page-cache thrasher over ``path`` (see :func:`make_thrash_file`) inside
    ``cgroup_dirs``, which must include a memory cgroup limited well below the file's size."""
    return _start(["thrash", path], 0, cgroup_dirs, timeout)


def _start(
    args: list[str],
    size: int,
    cgroup_dirs: Sequence[str],
    timeout: float,
    stdin: int = subprocess.DEVNULL,
) -> Hog:
    if not cgroup_dirs:
        raise ValueError("a hog must run inside a memory cgroup with a hard limit")
    process = subprocess.Popen(
        [sys.executable, "-m", "reapkit._testing._hog", *args, *cgroup_dirs],
        stdin=stdin,
        stdout=subprocess.PIPE,
    )
    hog = Hog(process, size)
    try:
        assert process.stdout is not None
        # A hog that dies (e.g. OOM-killed in its cgroup) closes stdout: readline returns b"".
        if not select.select([process.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"memory hog {args} not ready within {timeout} s")
        line = process.stdout.readline()
        if line.strip() != b"ready":
            code = process.wait(timeout)
            raise RuntimeError(f"memory hog {args} failed to start (exit status {code})")
    except BaseException:
        hog.stop()
        raise
    return hog


if __name__ == "__main__":
    main()

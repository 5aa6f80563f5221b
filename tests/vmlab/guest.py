"""The guest-kernel lab: run one command as root in a guest with pure cgroup v2, PSI and
(optionally) zram swap, and return its output and exit status.

Used by ``make test-vm`` (the cgroup v2 test subset) and ``make bench-vm`` (whole-machine
shortages), one guest at a time::

    python -m tests.vmlab.guest [--memory 2G] [--zram 1G] [--timeout 1500] -- COMMAND...

The guest is Debian's stock kernel (``linux-image-amd64``) booted by virtme-ng under qemu's
software emulation (these machines' KVM cannot run a stock kernel: ``shared/VMLAB_NOTES.md``).
It sees the host's root file system read-only over 9p with tmpfs overlays for writes, so the
host's programs run unchanged. Python and the project are slow to import over 9p under
emulation (``reapkit doctor``: 104 s), so both go in as ext4 images on virtio-blk, mounted over
the same paths (14 s). The guest's memory is the command's to exhaust; the host's is not
touched. The command runs with a hard timeout, after which the guest is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import os
import select
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("REAPKIT_VM_DIR", "/var/tmp/reapkit-vm"))
#: Debian's packages the lab needs on the host (the kernel's ABI number moves: the
#: metapackage follows it). earlyoom and nohang are contenders in ``make bench-vm``; they
#: run only inside the guest (``setup`` installs them without starting their services).
APT_PACKAGES = (
    "qemu-system-x86", "busybox-static", "linux-image-amd64", "earlyoom", "nohang", "dmsetup",
)  # fmt: skip
#: Installed by ``setup`` for the length of an install when the host has none: services
#: that packages ship (earlyoom's, nohang's) are not started on the host.
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
#: udev loading these cost ~6 s of emulated boot, and kvm cannot work in the guest anyway.
BLACKLIST = (
    "kvm,kvm_amd,kvm_intel,ahci,libahci,sr_mod,cdrom,crc32_pclmul,crct10dif_pclmul,"
    "ghash_clmulni_intel,aesni_intel,sha256_ssse3,sha512_ssse3"
)
#: The guest's run script, written onto the scratch disk (the kernel command line, which
#: carries ``--exec``, holds 2 KiB: a long command there panics the kernel at boot).
_INIT = r"""set -eu
mount -o ro /dev/vda {python_home}
mount -o ro /dev/vdb {project}
mount -t tmpfs -o mode=1777 tmpfs /tmp  # not the host's /tmp (its FIFOs, its test leftovers)
echo "+memory +cpu +io +pids" > /sys/fs/cgroup/cgroup.subtree_control
if [ -n {zram} ]; then
  modprobe zram num_devices=1
  echo {zram} > /sys/block/zram0/disksize
  mkswap /dev/zram0 >/dev/null
  swapon /dev/zram0
fi
export TMPDIR=/var/tmp REAPKIT_IN_GUEST=1 PYTHONDONTWRITEBYTECODE=1
export HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis
cd {project}
exec {command}
"""
#: What ``--exec`` runs: the scratch disk (disk-backed, so page cache can thrash there; the
#: guest's own /var/tmp is a tmpfs) at /var/tmp, then the run script on it.
_EXEC = "mount /dev/vdc /var/tmp && exec sh /var/tmp/.vmlab/run.sh"


class LabError(RuntimeError):
    """The lab could not be set up or the guest could not run; says what to do."""


def _missing_packages() -> list[str]:
    missing = []
    for package in APT_PACKAGES:
        probe = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if "install ok installed" not in probe.stdout:
            missing.append(package)
    return missing


def setup() -> None:
    """Install what the lab needs from Debian's packages (once; needs root)."""
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabError(f"the guest lab needs these Debian packages: {' '.join(missing)}")
    print(f"vmlab: installing {' '.join(missing)} (once)", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    ours = not _POLICY_RC_D.exists()
    if ours:  # exit status 101: "action forbidden", invoke-rc.d starts no service
        _POLICY_RC_D.write_text("#!/bin/sh\n# reapkit vmlab: no services now\nexit 101\n")
        _POLICY_RC_D.chmod(0o755)
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    finally:
        if ours:
            _POLICY_RC_D.unlink()


def kernel() -> str:
    """The newest Debian kernel image in /boot."""
    images = sorted(glob.glob("/boot/vmlinuz-*-amd64"), key=os.path.getmtime)
    if not images:
        raise LabError("no Debian kernel in /boot (apt-get install linux-image-amd64)")
    return images[-1]


def _path() -> str:
    """PATH with this venv's scripts first (vng, and the virtme-run it calls)."""
    return os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def _vng() -> str:
    vng = shutil.which("vng", path=_path())
    if vng is None:
        raise LabError("virtme-ng is not installed (pip install -e '.[vm]')")
    return vng


def _python_home() -> Path:
    return Path(sys.base_prefix).resolve()


def _ext4(image: Path, source: Path, size_mib: int) -> None:
    """An ext4 image holding ``source``'s tree (``mke2fs -d``: no mount needed)."""
    tmp = image.with_suffix(".tmp")
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(source), str(tmp), f"{size_mib}M"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    tmp.rename(image)


def _size_mib(path: Path) -> int:
    """Room for ``path``'s tree in an ext4 image: twice its size, at least 256 MiB."""
    du = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True)
    return max(256, 2 * int(du.stdout.split()[0]))


def python_image() -> Path:
    """The host Python's standard library (no site-packages, no tests) as an image, made
    once per Python build."""
    home = _python_home()
    stamp = f"{sys.version_info[0]}.{sys.version_info[1]}-{int(home.stat().st_mtime)}"
    image = WORK / f"python-{stamp}.img"
    if image.exists():
        return image
    for old in WORK.glob("python-*.img"):
        old.unlink()
    stage = WORK / "python-stage"
    shutil.rmtree(stage, ignore_errors=True)
    stdlib = Path(sysconfig.get_paths(vars={"installed_base": str(home)})["stdlib"])
    rel = stdlib.relative_to(home)
    ignore = shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter", "ensurepip")
    for part in ("bin", "lib", "include"):
        if (home / part).exists():
            shutil.copytree(home / part, stage / part, symlinks=True, ignore=ignore)
    if not (stage / rel).is_dir():
        raise LabError(f"the standard library {stdlib} was not found under {home}")
    try:
        _ext4(image, stage, _size_mib(stage))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return image


def project_image() -> Path:
    """This checkout, with its ``.venv``, as an image made afresh for each run."""
    image = WORK / "project.img"
    image.unlink(missing_ok=True)
    _ext4(image, ROOT, _size_mib(ROOT))
    return image


def scratch_image(script: str) -> Path:
    """An empty file system for the guest's /var/tmp, holding only the run script, made
    afresh for each run (sparse)."""
    image = WORK / "scratch.img"
    image.unlink(missing_ok=True)
    stage = WORK / "scratch-stage"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / ".vmlab").mkdir(parents=True)
    (stage / ".vmlab" / "run.sh").write_text(script)
    try:
        _ext4(image, stage, 2048)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return image


def run(
    command: Sequence[str], *, memory: str = "2G", zram: str = "", timeout: float = 1500.0
) -> int:
    """Boot a guest, run ``command`` in this project's directory there, stream its output to
    ours, and return its exit status. One guest at a time (a lock file)."""
    setup()
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        script = _INIT.format(
            python_home=shlex.quote(str(_python_home())), project=shlex.quote(str(ROOT)),
            zram=shlex.quote(zram), command=shlex.join(command),
        )  # fmt: skip
        images = (python_image(), project_image(), scratch_image(script))
        argv = [
            _vng(), "--run", kernel(), "--disable-kvm", "--force-9p", "--memory", memory,
            "--cpus", "2", "--disk", str(images[0]), "--disk", str(images[1]),
            "--disk", str(images[2]),
            "--append", f"psi=1 cgroup_no_v1=all module_blacklist={BLACKLIST}",
            "--verbose", "--exec", _EXEC,
        ]  # fmt: skip
        return _supervise(argv, timeout)


def _supervise(argv: list[str], timeout: float) -> int:
    """Run the guest, streaming its standard output to ours through a pipe (qemu reopens its
    own: a regular file would be overwritten from its start); the kernel's console and the
    command's standard error go to ``console.log``, whose end is shown when the run fails.
    The guest is killed with its whole process group after ``timeout``."""
    console_log = WORK / "console.log"
    with open(console_log, "wb") as console:
        guest = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=console, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PATH": _path()},
        )  # fmt: skip
    assert guest.stdout is not None
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        os.set_blocking(guest.stdout.fileno(), False)
        while True:
            chunk = _read_until(guest.stdout.fileno(), deadline, console_log)
            if chunk is None:
                timed_out = True
                break
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    finally:
        if guest.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(guest.pid, 9)  # our own child's group: qemu and vng
        status = guest.wait()
        guest.stdout.close()
    if timed_out:
        status = 124
        why = "its kernel died" if _died(console_log) else f"it overran its {timeout:g} s"
        print(f"vmlab: the guest was killed: {why}", file=sys.stderr)
    if status != 0:
        tail = console_log.read_bytes().decode(errors="replace").splitlines()[-40:]
        print(f"vmlab: exit status {status}; the end of {console_log}:", file=sys.stderr)
        print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
    return status


#: What the console says when the guest kernel died: no need to wait for the timeout.
_DEAD = (b"Kernel panic", b"PANIC: ", b"kernel BUG at")


def _read_until(fd: int, deadline: float, console: Path) -> bytes | None:
    """The next output, ``b""`` at its end, ``None`` once ``deadline`` passed or the guest's
    kernel died (checked on its console once a second)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or _died(console):
            return None
        if select.select([fd], [], [], min(left, 1.0))[0]:
            try:
                return os.read(fd, 65536)
            except BlockingIOError:
                continue


def _died(console: Path) -> bool:
    with open(console, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
        tail = f.read()
    return any(mark in tail for mark in _DEAD)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vmlab.guest", description=__doc__)
    parser.add_argument("--memory", default="2G", help="guest memory (qemu -m; default 2G)")
    parser.add_argument("--zram", default="", help="zram swap of this size in the guest")
    parser.add_argument("--timeout", type=float, default=1500.0, help="hard limit in seconds")
    parser.add_argument("command", nargs="+", help="run in the project directory, as root")
    args = parser.parse_args(argv)
    try:
        return run(args.command, memory=args.memory, zram=args.zram, timeout=args.timeout)
    except (LabError, subprocess.CalledProcessError) as exc:
        print(f"vmlab: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

"""The example policies in ``examples/policies/``: each one loads, passes ``reapkit check``, and
kills in a sandbox exactly what its comments promise while the others survive.

The sandbox runs use the two overrides :func:`reapkit.load_policy` has for this purpose:

* ``scope=CgroupScope.from_directory(<sandbox>)`` confines every rule to a memory cgroup the test
  created (with its hard limit); a policy is never run here without it;
* ``when=[]`` replaces every rule's conditions, so a rule acts only on ``reaper.trigger()``.
  The conditions themselves (PSI triggers, memory thresholds) are tested elsewhere
  (``tests/kernel/test_psi.py``, ``test_memory_source.py``, ``test_pipeline.py``); here the
  question is whom each policy chooses and how it ends them.

Rules are asked in order on each trigger, and the first that signals ends the round; a rule that
finds nobody records ``no-candidate`` and lets the next one try. Policies whose rules differ only
in their conditions are run rule by rule (``attrs.evolve(policy, rules=...)``).

The processes are small Python programs that name themselves with ``prctl(PR_SET_NAME)`` (the
``comm`` a policy matches; ``exec -a`` would only change ``argv[0]``), hold a given amount of
memory, and optionally grow on request. Their ``oom_score_adj`` is raised (which needs no
capability) so that every ``oom_score`` ordering is deterministic: here ``oom_score`` is about
``(1000 + oom_score_adj) * 2 / 3`` for a small process. A bystander that the policy would like
best lives in a sibling cgroup, outside the scope. Every process is started by the test, inside
cgroups the test created; nothing else is ever signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio

from reapkit import (
    CgroupScope,
    KillRecord,
    KillWarning,
    Observer,
    Policy,
    Reaper,
    SystemScope,
    load_policy,
    open_reaper,
)
from reapkit.lowlevel import Engine
from reapkit.testing import SandboxCgroup

from .conftest import MiB, Spawn, need

POLICIES = Path(__file__).resolve().parent.parent / "examples" / "policies"
EXPECTED = ("desktop", "earlyoom", "kubernetes", "lmkd", "oomd", "server")

# Named with prctl(PR_SET_NAME = 15); holds argv[2] MiB (written: resident); prints "ready";
# then, for each line N on stdin, holds N MiB more and prints "grown". Further arguments are
# only there to be seen in /proc/<pid>/cmdline.
_PROGRAM = """\
import ctypes, sys, time
ctypes.CDLL(None, use_errno=True).prctl(15, sys.argv[1].encode(), 0, 0, 0)
held = [b"x" * (int(sys.argv[2]) << 20)]
print("ready", flush=True)
for line in sys.stdin:
    held.append(b"x" * (int(line) << 20))
    print("grown", flush=True)
time.sleep(600)
"""


def _start(
    spawn: Spawn,
    comm: str,
    cgroup: SandboxCgroup,
    *,
    adj: int = 0,
    mib: int = 0,
    args: tuple[str, ...] = (),
    grows: bool = False,
) -> subprocess.Popen[bytes]:
    """A process named ``comm`` in ``cgroup`` holding ``mib`` MiB, at ``oom_score_adj`` ``adj``."""
    proc = spawn(
        [sys.executable, "-c", _PROGRAM, comm, str(mib), *args],
        cgroups=[cgroup],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if grows else subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    Path(f"/proc/{proc.pid}/oom_score_adj").write_text(str(adj))
    assert Path(f"/proc/{proc.pid}/comm").read_text() == comm[:15] + "\n"
    return proc


def _grow(proc: subprocess.Popen[bytes], mib: int) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"%d\n" % mib)
    proc.stdin.flush()
    assert proc.stdout.readline() == b"grown\n"


def _child(parent: SandboxCgroup, path: str) -> SandboxCgroup:
    """A nested cgroup ``<parent>/<path>`` (e.g. a kubelet pod's). The parent's ``remove()``
    removes it too, bottom-up, killing whatever is left in it."""
    directory = os.path.join(parent.directory, *path.split("/"))
    os.makedirs(directory)
    return SandboxCgroup(directory, parent.mount)


def _sandboxed(name: str, sandbox: SandboxCgroup) -> Policy:
    """Policy ``name``, every rule confined to ``sandbox`` and acting only when triggered."""
    return load_policy(
        POLICIES / f"{name}.toml", scope=CgroupScope.from_directory(sandbox.directory), when=[]
    )


def _only(policy: Policy, *names: str) -> Policy:
    """The policy with only the rules named (the same plugin instances)."""
    rules = tuple(r for r in policy.rules if r.name in names)
    assert [r.name for r in rules] == list(names)
    return attrs.evolve(policy, rules=rules)


async def _round(
    reaper: Reaper, records: trio.MemoryReceiveChannel[KillRecord]
) -> list[KillRecord]:
    """Trigger once; the round's records: one ``no-candidate`` per rule that found nobody, then
    the record of the rule that signalled (sent once its victim is confirmed gone)."""
    await reaper.trigger("test")
    got: list[KillRecord] = []
    with trio.fail_after(30):
        while len(got) < len(reaper.policy.rules):
            record = await records.receive()
            got.append(record)
            if record.outcome != "no-candidate":
                break
    return got


def _killed(record: KillRecord, rule: str, victim: subprocess.Popen[bytes], sig: int) -> None:
    """``record`` says ``rule`` killed ``victim``, and ``victim`` died of ``sig``."""
    assert record.rule == rule, record
    assert record.outcome == "killed", record
    assert record.victim is not None and record.victim.pid == victim.pid, record
    assert victim.wait(10) == -sig


def _alive(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        assert proc.poll() is None, f"pid {proc.pid} was killed"


def _selectors(record: KillRecord) -> list[str]:
    return [s.selector for s in record.selectors]


def _actions(record: KillRecord) -> list[str]:
    return [a.action for a in record.actions]


# -- every policy loads and passes `reapkit check` -----------------------------------------------


def test_every_example_policy_is_there() -> None:
    assert tuple(sorted(p.stem for p in POLICIES.glob("*.toml"))) == EXPECTED
    assert (POLICIES / "README.md").is_file()


@pytest.mark.parametrize("name", EXPECTED)
def test_the_policy_loads_and_passes_reapkit_check(name: str) -> None:
    path = POLICIES / f"{name}.toml"
    policy = load_policy(path, dry_run=True)
    assert policy.dry_run
    for rule in policy.rules:
        # Shipped for the whole machine, and acting only when its conditions hold.
        assert isinstance(rule.guard.scope, SystemScope), rule.name
        assert rule.when, rule.name
    check = subprocess.run(
        [sys.executable, "-m", "reapkit.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert f"{path}: valid" in check.stdout
    for rule in policy.rules:
        assert f"rule {rule.name!r}" in check.stdout


# -- earlyoom ------------------------------------------------------------------------------------


@pytest.mark.kernel
async def test_earlyoom_kills_the_highest_adjusted_oom_score_with_sigkill_then_sigterm(
    spawn: Spawn, memory_cgroup: SandboxCgroup, other_memory_cgroup: SandboxCgroup
) -> None:
    # oom_score: Web Content 866 (+300 prefer = 1166), worker 1000, Xwayland 1133 (-300 avoid
    # = 833); the bystander has the highest of all (1333) but is out of scope.
    firefox = _start(spawn, "Web Content", memory_cgroup, adj=300)
    worker = _start(spawn, "worker", memory_cgroup, adj=500)
    xwayland = _start(spawn, "Xwayland", memory_cgroup, adj=700)
    bystander = _start(spawn, "worker", other_memory_cgroup, adj=1000)
    policy = _sandboxed("earlyoom", memory_cgroup)

    # The 5 % line (asked first): SIGKILL to the preferred process, then the reap.
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        [record] = await _round(reaper, records)
    _killed(record, "earlyoom-sigkill", firefox, signal.SIGKILL)
    assert _selectors(record) == ["oom-score", "prefer-avoid"]
    assert "prefer: comm 'Web Content' matches" in record.selectors[-1].reason
    assert _actions(record) == ["kill", "reap"]
    assert record.actions[1].detail.startswith(("reaped", "already-freed"))

    # The 10 % line: SIGTERM to the next one. Xwayland's oom_score is higher, but it is avoided.
    sigterm = _only(policy, "earlyoom-sigterm")
    async with open_reaper(sigterm, live_table=False) as reaper, reaper.records() as records:
        [record] = await _round(reaper, records)
    _killed(record, "earlyoom-sigterm", worker, signal.SIGTERM)
    assert record.actions[0].detail == "exited after SIGTERM"
    assert record.actions[1].detail.startswith("skipped: no SIGKILL")
    _alive(xwayland, bystander)


# -- oomd ----------------------------------------------------------------------------------------


@pytest.fixture
def workloads(spawn: Spawn, memory_cgroup: SandboxCgroup) -> dict[str, subprocess.Popen[bytes]]:
    """Three services as systemd lays them out: batch.service is the largest workload,
    web.service can grow on request, and ssh.service (an admin's shell, the largest of all) is
    protected by its cgroup."""
    memory_cgroup.set_memory_limit(512 * MiB)
    batch = _child(memory_cgroup, "workload.slice/batch.service")
    web = _child(memory_cgroup, "workload.slice/web.service")
    ssh = _child(memory_cgroup, "system.slice/ssh.service")
    return {
        "batch": _start(spawn, "batch", batch, mib=48),
        "batch-helper": _start(spawn, "helper", batch),
        "web": _start(spawn, "web", web, grows=True),
        "web-helper": _start(spawn, "helper", web),
        "shell": _start(spawn, "bash", ssh, mib=96),
    }


@pytest.mark.kernel
async def test_oomd_kills_the_whole_cgroup_under_most_pressure_or_the_largest(
    spawn: Spawn,
    memory_cgroup: SandboxCgroup,
    other_memory_cgroup: SandboxCgroup,
    workloads: dict[str, subprocess.Popen[bytes]],
) -> None:
    bystander = _start(spawn, "batch", other_memory_cgroup, mib=64)
    policy = _sandboxed("oomd", memory_cgroup)
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        [record] = await _round(reaper, records)
    # Per-cgroup pressure ties (cgroup v1 has none: counted as 0; on v2 both idle): the largest
    # cgroup goes, both of its processes, by one cgroup-kill.
    _killed(record, "oomd-memory-pressure", workloads["batch"], signal.SIGKILL)
    assert workloads["batch-helper"].wait(10) == -signal.SIGKILL
    assert _selectors(record) == ["protect", "cgroup-victims"]
    assert "/workload.slice/batch.service: usage" in record.selectors[-1].reason
    assert _actions(record) == ["cgroup-kill"]
    assert record.actions[0].detail.endswith("workload.slice/batch.service: sent")
    _alive(workloads["web"], workloads["web-helper"], workloads["shell"], bystander)


@pytest.mark.kernel
async def test_oomd_kills_the_cgroup_of_the_fastest_growing_process(
    spawn: Spawn,
    memory_cgroup: SandboxCgroup,
    other_memory_cgroup: SandboxCgroup,
    workloads: dict[str, subprocess.Popen[bytes]],
) -> None:
    bystander = _start(spawn, "web", other_memory_cgroup, grows=True)
    policy = _only(_sandboxed("oomd", memory_cgroup), "oomd-size-or-growth")
    [rule] = policy.rules

    async def no_records(_record: KillRecord) -> None:
        return None

    # A preview (what `reapkit check --now` does) gives memory-growth its first sample; then
    # web grows by 32 MiB and stays smaller than batch, which does not grow.
    chosen, _ranked, _steps = await Engine(policy.rules, emit=no_records).preview(rule)
    assert chosen is not None and chosen.candidate.pid == workloads["batch"].pid  # the largest
    _grow(workloads["web"], 32)
    _grow(bystander, 64)
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        [record] = await _round(reaper, records)
    _killed(record, "oomd-size-or-growth", workloads["web"], signal.SIGKILL)
    assert workloads["web-helper"].wait(10) == -signal.SIGKILL
    assert _selectors(record) == ["protect", "largest-rss", "memory-growth"]
    assert "growing" in record.selectors[-1].reason
    assert "(fastest of" in record.selectors[-1].reason
    assert record.actions[0].detail.endswith("workload.slice/web.service: sent")
    _alive(workloads["batch"], workloads["batch-helper"], workloads["shell"], bystander)


# -- lmkd ----------------------------------------------------------------------------------------


@pytest.mark.kernel
async def test_lmkd_kills_tier_by_tier_with_pinned_prioritised_reapers(
    spawn: Spawn, memory_cgroup: SandboxCgroup, other_memory_cgroup: SandboxCgroup
) -> None:
    if 1 not in os.sched_getaffinity(0):
        need("CPU 1", "lmkd.toml pins its reaper threads to CPU 1")
    cached_big = _start(spawn, "cached-big", memory_cgroup, adj=900, mib=48)
    cached_small = _start(spawn, "cached-small", memory_cgroup, adj=900)
    perceptible = _start(spawn, "perceptible", memory_cgroup, adj=200, mib=64)  # the largest
    foreground = _start(spawn, "foreground", memory_cgroup, adj=0)
    bystander = _start(spawn, "cached", other_memory_cgroup, adj=900, mib=96)
    policy = _sandboxed("lmkd", memory_cgroup)
    cooldown = max(r.cooldown for r in policy.rules)

    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        threads = reaper._reap_stage.thread_info()
        assert len(threads) == 2
        assert all(t.cpus == {1} and t.nice == -20 and t.policy == "other" for t in threads)

        # Medium pressure: the cached tier only, its largest first.
        [record] = await _round(reaper, records)
        _killed(record, "lmkd-medium", cached_big, signal.SIGKILL)
        assert _selectors(record) == ["oom-score-adj-tiers"]
        assert "oom_score_adj 900" in record.selectors[0].reason
        assert _actions(record) == ["kill", "reap"]
        assert record.actions[1].detail.startswith(("reaped", "already-freed"))
        await trio.sleep(cooldown + 0.1)

        [record] = await _round(reaper, records)
        _killed(record, "lmkd-medium", cached_small, signal.SIGKILL)
        await trio.sleep(cooldown + 0.1)

        # No cached app left: medium finds nobody, critical goes down to perceptible.
        medium, record = await _round(reaper, records)
        assert (medium.rule, medium.outcome) == ("lmkd-medium", "no-candidate")
        _killed(record, "lmkd-critical", perceptible, signal.SIGKILL)
        assert "oom_score_adj 200" in record.selectors[0].reason
        _alive(foreground)
        await trio.sleep(cooldown + 0.1)

        # Critical with no memory left: the foreground app too.
        medium, critical, record = await _round(reaper, records)
        assert [r.outcome for r in (medium, critical)] == ["no-candidate", "no-candidate"]
        _killed(record, "lmkd-critical-no-memory", foreground, signal.SIGKILL)
        assert reaper.statistics().reap.threads == 2
    _alive(bystander)


# -- desktop -------------------------------------------------------------------------------------


class _Warnings(Observer):
    """Keeps the warnings the ``warn`` action sends."""

    name: ClassVar[str] = "test-warnings"

    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[KillWarning] = []

    def on_record(self, record: Any) -> None:
        return None

    def on_warning(self, warning: Any) -> None:
        self.warnings.append(warning)


@pytest.mark.kernel
async def test_desktop_warns_then_ends_renderers_and_spares_the_session(
    spawn: Spawn, memory_cgroup: SandboxCgroup, other_memory_cgroup: SandboxCgroup
) -> None:
    # What the policy protects, each with the highest oom_score (1333) ...
    protected = [
        _start(spawn, comm, memory_cgroup, adj=1000)
        for comm in ("systemd", "Xwayland", "gnome-shell", "pipewire", "wireplumber", "dpkg")
    ]
    # ... renderers with low ones: Firefox's by comm, Chrome's by its command line ...
    firefox = _start(spawn, "Web Content", memory_cgroup, adj=100)  # 733 + 1000
    chrome = _start(spawn, "chrome", memory_cgroup, adj=50, args=("--type=renderer",))  # 700+1000
    # ... and what is neither: Chrome's browser process, an editor.
    browser = _start(spawn, "chrome", memory_cgroup, adj=1000, args=("--enable-crashpad",))
    editor = _start(spawn, "gimp", memory_cgroup, adj=1000)
    bystander = _start(spawn, "Web Content", other_memory_cgroup, adj=1000)
    warnings = _Warnings()
    policy = attrs.evolve(_sandboxed("desktop", memory_cgroup), observers=(warnings,))

    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        [record] = await _round(reaper, records)
    _killed(record, "desktop-low-memory", firefox, signal.SIGTERM)
    # System daemons (root: a system account) by the first protect, the session by the second.
    assert _selectors(record) == ["protect", "protect", "oom-score", "prefer-avoid"]
    assert "protected 2 of 10" in record.selectors[0].reason
    assert "protected 4 of 8" in record.selectors[1].reason
    assert "prefer: comm 'Web Content' matches" in record.selectors[-1].reason
    assert _actions(record) == ["warn", "terminate", "reap"]
    assert record.actions[0].detail.startswith("warned: Memory is low: closing Web Content")
    assert record.actions[1].detail == "exited after SIGTERM"
    # The warning reached the observers before the signal was sent.
    [warning] = warnings.warnings
    assert warning.victim.pid == firefox.pid and not warning.dry_run
    assert record.timeline.signal_sent is not None
    assert warning.timestamp <= record.timeline.signal_sent

    # A fresh reaper (the rule rests 10 s after a kill): the Chrome renderer is next.
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        [record] = await _round(reaper, records)
    _killed(record, "desktop-low-memory", chrome, signal.SIGTERM)
    assert "prefer: cmdline" in record.selectors[-1].reason
    assert "--type=renderer" in record.selectors[-1].reason
    assert [w.victim.pid for w in warnings.warnings] == [firefox.pid, chrome.pid]
    _alive(*protected, browser, editor, bystander)


# -- kubernetes ----------------------------------------------------------------------------------

_POD = "0f3c1a2e-8a4b-4c6d-9e7f-1a2b3c4d5e6f"
_CTR = "4f" * 32  # a container id

#: Where each kind of process lives, for both kubelet cgroup drivers (real-world layouts).
LAYOUTS = {
    "cgroupfs": {
        "besteffort": f"kubepods/besteffort/pod{_POD}/{_CTR}",
        "pause": f"kubepods/besteffort/pod{_POD}/{'9a' * 32}",
        "burstable": f"kubepods/burstable/pod{_POD[::-1]}/{_CTR}",
        "guaranteed": f"kubepods/pod{_POD.upper()}/{_CTR}",
    },
    "systemd": {
        "besteffort": "kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{_POD.replace('-', '_')}.slice/cri-containerd-{_CTR}.scope",
        "pause": "kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{_POD.replace('-', '_')}.slice/cri-containerd-{'9a' * 32}.scope",
        "burstable": "kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{_POD[::-1].replace('-', '_')}.slice/crio-{_CTR}.scope",
        "guaranteed": "kubepods.slice/"
        f"kubepods-pod{_POD.upper().replace('-', '_')}.slice/docker-{_CTR}.scope",
    },
}


@pytest.mark.kernel
@pytest.mark.parametrize("driver", sorted(LAYOUTS))
async def test_kubernetes_kills_besteffort_then_burstable_never_guaranteed(
    spawn: Spawn,
    memory_cgroup: SandboxCgroup,
    other_memory_cgroup: SandboxCgroup,
    driver: str,
) -> None:
    layout = LAYOUTS[driver]
    memory_cgroup.set_memory_limit(512 * MiB)

    def pod(kind: str, comm: str, adj: int) -> subprocess.Popen[bytes]:
        return _start(spawn, comm, _child(memory_cgroup, layout[kind]), adj=adj)

    # oom_score_adj the wrong way round (BestEffort lowest, Guaranteed highest): the QoS order
    # must come from the cgroup paths, not from the kernel's score.
    besteffort = pod("besteffort", "nginx", 500)
    pause = pod("pause", "pause", 1000)
    burstable = pod("burstable", "java", 1000)
    guaranteed = pod("guaranteed", "postgres", 1000)
    kubelet = _start(
        spawn, "kubelet", _child(memory_cgroup, "system.slice/kubelet.service"), adj=1000
    )
    runtime = _start(
        spawn, "containerd", _child(memory_cgroup, "system.slice/containerd.service"), adj=1000
    )
    session = _child(memory_cgroup, "user.slice/user-1000.slice/session-3.scope")
    shell = _start(spawn, "bash", session, adj=1000)  # on the node, not in a pod
    bystander = _start(spawn, "nginx", other_memory_cgroup, adj=1000)
    policy = _sandboxed("kubernetes", memory_cgroup)

    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        # BestEffort first.
        [record] = await _round(reaper, records)
        _killed(record, "besteffort-pods", besteffort, signal.SIGTERM)
        assert record.victim is not None and record.victim.cgroup.endswith(layout["besteffort"])
        assert _selectors(record) == ["scope", "protect", "oom-score"]
        assert _actions(record) == ["terminate", "reap"]

        # No BestEffort process left (the pause sandbox is protected): Burstable. The
        # BestEffort rule has no cooldown, so this is the order whenever the next trigger comes.
        nobody, record = await _round(reaper, records)
        assert (nobody.rule, nobody.outcome) == ("besteffort-pods", "no-candidate")
        _killed(record, "burstable-pods", burstable, signal.SIGTERM)
        assert record.victim is not None and record.victim.cgroup.endswith(layout["burstable"])

    # Then nobody: Guaranteed pods, pause, host services and non-pod processes stay.
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        got = await _round(reaper, records)
    assert [(r.rule, r.outcome) for r in got] == [
        ("besteffort-pods", "no-candidate"),
        ("burstable-pods", "no-candidate"),
    ]
    _alive(pause, guaranteed, kubelet, runtime, shell, bystander)


# -- server --------------------------------------------------------------------------------------


@pytest.mark.kernel
async def test_server_terminates_the_top_score_avoids_databases_spares_the_system(
    spawn: Spawn, memory_cgroup: SandboxCgroup, other_memory_cgroup: SandboxCgroup
) -> None:
    protected = [
        _start(spawn, comm, memory_cgroup, adj=1000)
        for comm in ("sshd", "systemd-journald", "cron", "dpkg")
    ]
    database = _start(spawn, "postgres", memory_cgroup, adj=900)  # 1266 - 1000 (avoid) = 266
    app = _start(spawn, "java", memory_cgroup, adj=300)  # 866
    job = _start(spawn, "rsync", memory_cgroup)  # 666
    bystander = _start(spawn, "java", other_memory_cgroup, adj=1000)
    policy = _sandboxed("server", memory_cgroup)

    # Low memory under pressure: SIGTERM to the top score; the database is avoided.
    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        [record] = await _round(reaper, records)
    _killed(record, "server-low-memory", app, signal.SIGTERM)
    assert _selectors(record) == ["protect", "oom-score", "prefer-avoid"]
    assert "protected 4 of 7" in record.selectors[0].reason
    assert _actions(record) == ["terminate", "reap"]
    assert record.actions[0].detail == "exited after SIGTERM"

    # Memory nearly gone: SIGKILL at once and the reap; the database is still avoided.
    emergency = _only(policy, "server-almost-no-memory")
    async with open_reaper(emergency, live_table=False) as reaper, reaper.records() as records:
        [record] = await _round(reaper, records)
    _killed(record, "server-almost-no-memory", job, signal.SIGKILL)
    assert _actions(record) == ["kill", "reap"]
    assert "avoid: comm 'postgres'" not in record.selectors[-1].reason  # the top is rsync
    _alive(*protected, database, bystander)

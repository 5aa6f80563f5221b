"""The observer in a real reaper on the real kernel: a policy scoped to a sandbox cgroup this
test created, naming ``prometheus`` as it would in a file (found through its entry point),
the reaper starting the endpoint, a kill, and the kill scraped.

Safety: the only process signalled is the ``sleep`` this test started inside the cgroup it
created; the cgroup has a hard memory limit and is removed (its members killed) in
``finally``, as is the child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from reapkit import PluginRegistry, Unsupported, load_policy, open_reaper
from reapkit.builtin import register_builtins
from reapkit.testing import SandboxCgroup

from reapkit_prometheus import OUTCOMES, PrometheusObserver

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def _need(feature: str) -> None:
    """Skip naming ``feature`` — or fail where CI demands the kernel tests run (the
    repository's ``REAPKIT_REQUIRE_KERNEL=1``; the cgroup v2 memory controller may be
    missing even there, as in the repository's own tests)."""
    if os.environ.get("REAPKIT_REQUIRE_KERNEL") == "1" and "cgroup v2 memory" not in feature:
        pytest.fail(f"needs {feature} (REAPKIT_REQUIRE_KERNEL=1)")
    pytest.skip(f"needs {feature}")


@pytest.fixture
def memory_cgroup() -> Iterator[SandboxCgroup]:
    """A memory cgroup of our own with a hard limit; removed, members and all, at the end."""
    if os.geteuid() != 0:
        _need("root: the test creates a cgroup and signals its own child")
    try:
        cgroup = SandboxCgroup.create("memory", prefix="reapkit-test")
    except Unsupported as exc:
        _need(exc.feature)
    try:
        cgroup.set_memory_limit(64 * MiB)
        yield cgroup
    finally:
        cgroup.remove()


@pytest.fixture
def sleeper(memory_cgroup: SandboxCgroup) -> Iterator[subprocess.Popen[bytes]]:
    """``sleep 600`` inside ``memory_cgroup``: it joins the cgroup before it execs."""
    trampoline = (
        "import os, sys\n"
        "open(os.path.join(sys.argv[1], 'cgroup.procs'), 'w').write(str(os.getpid()))\n"
        "os.execvp('sleep', ['sleep', '600'])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", trampoline, memory_cgroup.directory])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in memory_cgroup.pids():
            assert child.poll() is None, f"the child exited with {child.returncode}"
            assert time.monotonic() < deadline, "the child never joined the cgroup"
            time.sleep(0.001)
        yield child
    finally:
        if child.poll() is None:
            child.kill()  # our own child, by its Popen
        child.wait(10)


def _policy(cgroup: SandboxCgroup) -> str:
    return f"""
[[rule]]
name = "sandbox"
cgroup = "{cgroup.directory}"
when = []
scope = {{ cgroup = "{cgroup.directory}" }}
select = ["largest-rss"]
actions = ["kill"]
victim_timeout = "3s"
cooldown = "1s"

[[observer]]
name = "prometheus"
port = 0
"""


async def test_a_kill_in_a_sandbox_is_scraped_from_the_reapers_endpoint(
    memory_cgroup: SandboxCgroup, sleeper: subprocess.Popen[bytes], scrape: Any
) -> None:
    registry = PluginRegistry()
    register_builtins(registry)
    registry.load_entry_points()  # as a policy file names it: through the entry point
    policy = load_policy(text=_policy(memory_cgroup), registry=registry)
    (observer,) = policy.observers
    assert isinstance(observer, PrometheusObserver)

    async with open_reaper(policy, live_table=False) as reaper, reaper.records() as records:
        # The reaper started the endpoint before it reported itself started.
        port = observer.port
        assert port is not None
        before = await scrape(port)
        assert before("reapkit_memory_available_bytes")
        # The reaper attaches itself: every rule's series exists from the start, at 0, and
        # the reaper's own counters are there.
        for outcome in OUTCOMES:
            assert before("reapkit_kills_total", rule="sandbox", outcome=outcome) == 0
        assert before("reapkit_decisions_total") == 0

        await reaper.trigger("test: prometheus")
        with trio.fail_after(10):
            record = await records.receive()
        assert record.outcome == "killed", record
        assert record.victim is not None
        assert record.victim.pid == sleeper.pid

        # The observer gets the record after the subscribers, from the observers' own task
        # (on_record on a worker thread): a scrape at once may come before it, or in the
        # middle of it. The last series on_record sets says it is done.
        with trio.fail_after(10):
            m = await scrape(port)
            while not m("reapkit_last_record_timestamp_seconds", rule="sandbox"):
                await trio.sleep(0.01)
                m = await scrape(port)
    assert m("reapkit_kills_total", rule="sandbox", outcome="killed") == 1
    assert m("reapkit_kills_total", rule="sandbox", outcome="refused") == 0
    assert m("reapkit_trigger_to_signal_seconds_count", rule="sandbox") == 1
    t = record.timeline
    assert t.signal_sent is not None
    assert m("reapkit_trigger_to_signal_seconds_sum", rule="sandbox") == pytest.approx(
        t.signal_sent - t.trigger_seen
    )
    if t.exit_seen is not None:
        assert m("reapkit_signal_to_exit_seconds_count", rule="sandbox") == 1
    if t.memory_back is not None:
        assert m("reapkit_signal_to_memory_back_seconds_count", rule="sandbox") == 1
    assert m("reapkit_last_decision_candidates", rule="sandbox") == 1  # the sleep alone
    assert m("reapkit_decisions_total") == 1
    assert m("reapkit_events_total") == 1

    # The reaper stopped: so did the endpoint, and its port is free again.
    assert observer.port is None
    with pytest.raises(OSError, match=r"refused|connect"):
        await trio.open_tcp_stream("127.0.0.1", port)
    assert sleeper.wait(10) == -signal.SIGKILL

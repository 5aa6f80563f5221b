"""``serve_reaper(records=..., output=...)``: channels subscribed before the first decision and
closed after the stop, and the caller's output counters in ``statistics()`` (issue 11)."""

from __future__ import annotations

import trio

from reapkit import OutputCounters, load_policy, open_reaper
from reapkit._records import KillRecord
from reapkit.testing import SandboxCgroup

from ..conftest import Spawn

POLICY = """
[[rule]]
name = "first"
cgroup = "{cgroup}"
when = ["cgroup_usage > 0%"]
scope = {{ cgroup = "{cgroup}" }}
select = [{{ name = "protect", comm = ["^sleep$"] }}, "largest-rss"]
actions = ["kill"]
cooldown = "1h"
"""


async def test_a_channel_given_at_the_start_gets_the_first_record_and_ends_with_the_reaper(
    spawn: Spawn, memory_cgroup: SandboxCgroup
) -> None:
    spawn(cgroups=[memory_cgroup])  # protected: the first decision finds no candidate
    policy = load_policy(text=POLICY.format(cgroup=memory_cgroup.directory), dry_run=True)
    send, receive = trio.open_memory_channel[KillRecord](10)
    counters = OutputCounters(records_write_errors=2, log_lines_dropped=3)
    async with open_reaper(policy, live_table=False, records=[send], output=counters) as reaper:
        with trio.fail_after(10):
            first = await receive.receive()
        stats = reaper.statistics()
    assert first.rule == "first" and first.outcome == "no-candidate"
    assert (stats.records_write_errors, stats.log_lines_dropped, stats.records_lost) == (2, 3, 0)
    assert [r async for r in receive] == []  # closed by the reaper once it stopped

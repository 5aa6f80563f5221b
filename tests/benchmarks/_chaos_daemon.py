"""``reapkit run`` with three fault-injecting plugins registered: the chaos soak's daemon.

Run as ``python -m tests.benchmarks._chaos_daemon run POLICY ...``. Each plugin call draws a
fault at random (seeded by ``CHAOS_SEED``): raise, ``SystemExit`` (0 and non-zero), overrun its
deadline by blocking, return junk, or — the selector — try to smuggle the protected bystander
(``CHAOS_BYSTANDER``, a PID) back in, ranked first. Only public names are used, as a
third-party plugin would.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import reapkit
from reapkit.cli import main

_random = random.Random(int(os.environ.get("CHAOS_SEED", "0")))
#: How long a blocking fault blocks: past every deadline the soak's policies set.
HANG = float(os.environ.get("CHAOS_HANG", "3"))


def _fault(*faults: tuple[str, float]) -> str:
    """One of ``faults`` by its probability, else ``"ok"``."""
    x = _random.random()
    for name, p in faults:
        if x < p:
            return name
        x -= p
    return "ok"


def _common(fault: str) -> None:
    if fault == "raise":
        raise RuntimeError("chaos: injected failure")
    if fault == "exit0":
        raise SystemExit(0)
    if fault == "exit3":
        raise SystemExit(3)
    if fault == "hang":
        time.sleep(HANG)


class ChaosSelector(reapkit.Selector):
    name: ClassVar[str] = "chaos-select"

    def select(
        self, situation: reapkit.Situation, candidates: Sequence[reapkit.Ranked]
    ) -> list[reapkit.Ranked]:
        fault = _fault(
            ("raise", 0.04), ("exit3", 0.03), ("hang", 0.03), ("junk", 0.03), ("smuggle", 0.05)
        )
        _common(fault)
        if fault == "junk":
            return [object()]  # type: ignore[list-item]
        ranked = list(candidates)
        if fault == "smuggle":
            pid = int(os.environ["CHAOS_BYSTANDER"])
            info = situation.procfs.process_info(pid)
            if isinstance(candidates, list):  # the old engine passed its own list: mutate it
                candidates.append(reapkit.Ranked(reapkit.Candidate.from_info(info)))
            ranked.insert(0, reapkit.Ranked(reapkit.Candidate.from_info(info), 1e9, "smuggled"))
        return ranked


class ChaosAction(reapkit.Action):
    name: ClassVar[str] = "chaos-act"

    async def act(self, context: Any) -> str:
        fault = _fault(("raise", 0.06), ("exit0", 0.02), ("exit3", 0.02))
        _common(fault)
        return "chaos: nothing done"


class ChaosObserver(reapkit.Observer):
    name: ClassVar[str] = "chaos-observer"

    def on_record(self, record: Any) -> None:
        _common(_fault(("raise", 0.05), ("exit0", 0.03), ("exit3", 0.02), ("hang", 0.03)))


for _plugin in (ChaosSelector, ChaosAction, ChaosObserver):
    reapkit.register(_plugin)

if __name__ == "__main__":
    sys.exit(main())

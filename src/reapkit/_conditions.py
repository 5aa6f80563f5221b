"""A rule's ``when``: conditions that must all hold for the rule to act.

* :class:`PressureCondition` — a PSI trigger fired within its window (pressure is a rate over a
  window, so "holds" means "fired recently"). A manual trigger counts as pressure: the caller
  says there is some.
* :class:`MemoryCondition` — a memory threshold is beyond its line *now*: it is evaluated from
  a fresh sample every time it is asked, so the engine can re-check after choosing and abandon
  a kill if memory recovered meanwhile (earlyoom does the same).

Policies write them as strings: ``"memory some 150ms/2s"``, ``"mem_available < 5%"``,
``"swap_free < 10%"``, ``"cgroup_usage > 90%"`` (with the rule's cgroup).
"""

from __future__ import annotations

import os
import re

import attrs

from ._errors import InvalidValue
from ._procfs import MemInfo
from ._sources.memory import CgroupMemoryFiles, MemoryThreshold
from ._units import PsiSpec, parse_psi, parse_size

_MEMORY = re.compile(r"^\s*(mem_available|swap_free|cgroup_usage)\s*([<>])\s*(\S.*?)\s*$")


@attrs.frozen
class PressureCondition:
    spec: PsiSpec

    def __str__(self) -> str:
        return f"{self.spec.resource} {self.spec.kind} pressure"


@attrs.frozen
class MemoryCondition:
    threshold: MemoryThreshold

    def holds(self, meminfo: MemInfo) -> tuple[bool, str]:
        """Whether the threshold is beyond its line now, and a sentence with the numbers."""
        t = self.threshold
        if t.metric == "cgroup_usage":
            assert t.cgroup is not None
            try:
                sample = CgroupMemoryFiles(t.cgroup).sample(meminfo.total)
            except OSError:
                return False, f"{t.cgroup} cannot be read"
            line = t.line.resolve(sample.total)
            return sample.value >= line, f"usage {_mib(sample.value)} vs line {_mib(line)}"
        value, total = (
            (meminfo.available, meminfo.total)
            if t.metric == "mem_available"
            else (meminfo.swap_free, meminfo.swap_total)
        )
        line = t.line.resolve(total)
        if total == 0:
            return True, "no swap (counts as below the line, as in earlyoom)"
        return value < line, f"{t.metric} {_mib(value)} vs line {_mib(line)}"

    def __str__(self) -> str:
        return str(self.threshold)


Condition = PressureCondition | MemoryCondition


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def parse_condition(
    text: str, *, cgroup: str | None = None, pressure_cgroup: str | None = None
) -> Condition:
    """``"memory some 150ms/2s"`` or ``"mem_available < 5%"`` (``<`` for mem_available and
    swap_free, ``>`` for cgroup_usage). ``cgroup`` is the rule's memory cgroup directory
    (for ``cgroup_usage``); ``pressure_cgroup`` a cgroup v2 directory whose pressure files the
    PSI specs watch instead of the system's."""
    match = _MEMORY.match(text)
    if match is None:
        return PressureCondition(parse_psi(text, cgroup=pressure_cgroup))
    metric, op, line = match.groups()
    expected = ">" if metric == "cgroup_usage" else "<"
    if op != expected:
        raise InvalidValue(f"{text!r}: write '{metric} {expected} <size>'")
    if metric == "cgroup_usage" and cgroup is None:
        raise InvalidValue(f"{text!r}: cgroup_usage needs the rule's 'cgroup'")
    return MemoryCondition(
        MemoryThreshold(
            metric,  # type: ignore[arg-type]
            parse_size(line),
            cgroup if metric == "cgroup_usage" else None,
        )
    )


def check_on_host(condition: Condition, *, unprivileged_psi: bool) -> None:
    """Raise :class:`InvalidValue` unless this host can watch ``condition``: a PSI window the
    kernel takes (``unprivileged_psi``: without CAP_SYS_RESOURCE), the cgroup files it reads.
    :func:`parse_condition` looks at nothing on the host; this does."""
    if isinstance(condition, PressureCondition):
        spec = condition.spec
        spec.check_window(unprivileged_only=unprivileged_psi)
        # A cgroup's <resource>.pressure; the system's is looked at when the trigger is armed.
        if spec.path.endswith(".pressure") and not os.path.exists(spec.path):
            raise InvalidValue(
                f"PSI trigger '{spec}': {spec.path} does not exist (pressure files are cgroup v2"
                " only)"
            )
    elif condition.threshold.cgroup is not None and not os.path.isdir(condition.threshold.cgroup):
        raise InvalidValue(f"cgroup_usage: the cgroup {condition.threshold.cgroup} does not exist")

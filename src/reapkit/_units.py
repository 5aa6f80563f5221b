"""The value syntax of policies: durations (``"150ms"``), sizes (``"512MiB"``, ``"5%"``) and PSI
trigger specs (``"memory some 150ms/2s"``)."""

from __future__ import annotations

import math
import re
from typing import Final, Literal

import attrs

from ._errors import InvalidValue

_DURATION_UNITS: Final = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 1000**4,
}
_MAX = re.compile(r"\s*max\(([^,()]*),([^,()]*)\)\s*", re.IGNORECASE)
_NUMBER_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Zµ%]*)\s*")

PSI_RESOURCES: Final = ("memory", "io", "cpu")
#: Trigger windows the kernel accepts: 500 ms to 10 s (kernel/sched/psi.c).
PSI_WINDOW_MIN_US: Final = 500_000
PSI_WINDOW_MAX_US: Final = 10_000_000
#: Without CAP_SYS_RESOURCE the window must be a multiple of 2 s (Linux 6.5+).
PSI_UNPRIVILEGED_WINDOW_US: Final = 2_000_000


def parse_duration(text: str | float) -> float:
    """``"150ms"``, ``"2s"``, ``"1.5s"``, ``"500us"``, ``"1m"`` → seconds (a bare number too).
    Always finite and not negative: ``nan``, ``inf`` and ``-5`` are :class:`InvalidValue`."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = (float(text) if abs(text) < 1e300 else math.inf), "s"
    else:
        match = _NUMBER_UNIT.fullmatch(str(text))
        if not match or match.group(2).lower() not in (*_DURATION_UNITS, ""):
            raise InvalidValue(
                f"{text!r} is not a duration: expected a number and a unit of us, ms, s, m, h"
                " (e.g. '150ms', '2s')"
            )
        value, unit = float(match.group(1)), match.group(2).lower() or "s"
    seconds = value * _DURATION_UNITS[unit]
    if not 0 <= seconds < math.inf:  # nan fails both
        raise InvalidValue(f"{text!r} is not a usable duration: it must be finite and not negative")
    return seconds


@attrs.frozen
class Size:
    """An amount of memory: absolute bytes, or a percent of a total known later, or with both
    (``"max(2%, 100MiB)"``) the larger of the two: a percent that never falls below a floor."""

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, total: int) -> int:
        """Bytes, given the total that a percent refers to."""
        if self.percent is None:
            assert self.bytes is not None
            return self.bytes
        share = int(total * self.percent / 100)
        return share if self.bytes is None else max(share, self.bytes)

    def __str__(self) -> str:
        if self.percent is None:
            return f"{self.bytes} bytes"
        if self.bytes is None:
            return f"{self.percent:g}%"
        mib, rest = divmod(self.bytes, 1 << 20)
        floor = f"{mib}MiB" if not rest else f"{self.bytes} bytes"
        return f"max({self.percent:g}%, {floor})"


def parse_size(text: str | int | Size) -> Size:
    """``"512MiB"``, ``"1G"``, ``"1.5GiB"``, ``"5%"``, ``4096`` → :class:`Size`. ``k/M/G``
    without ``i`` are binary, like ``free`` and earlyoom; ``kB/MB/GB`` are decimal.
    ``"max(2%, 100MiB)"`` (a percent and a size, either order) is the larger of the two. A
    :class:`Size` is returned as it is (an attrs converter must take its own output)."""
    if isinstance(text, Size):
        return text
    both = _MAX.fullmatch(text) if isinstance(text, str) else None
    if both:
        try:
            first, second = parse_size(both.group(1)), parse_size(both.group(2))
        except InvalidValue as e:
            raise InvalidValue(f"{text!r}: {e}") from None
        percent = first.percent if first.percent is not None else second.percent
        floor = first.bytes if first.bytes is not None else second.bytes
        if percent is None or floor is None:
            raise InvalidValue(
                f"{text!r} is not a size: max() takes a percent and a size, e.g. 'max(2%, 100MiB)'"
            )
        return Size(bytes=floor, percent=percent)
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidValue(f"{text} is not a size: it must not be negative")
        return Size(bytes=text)
    match = _NUMBER_UNIT.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or (unit != "%" and unit not in _SIZE_UNITS):
        raise InvalidValue(
            f"{text!r} is not a size: expected e.g. '512MiB', '2GiB', '4096' (bytes) or '5%'"
        )
    value = float(match.group(1))
    if unit == "%":
        if not 0 <= value <= 100:
            raise InvalidValue(f"{text!r} is not a percentage within 0..100")
        return Size(percent=value)
    size = value * _SIZE_UNITS[unit]
    if not size < math.inf:
        raise InvalidValue(f"{text!r} is not a size: too large")
    return Size(bytes=int(size))


def parse_bytes(text: str | int) -> int:
    """An absolute size (``"512MiB"``, ``"1G"``, ``4096``) → bytes; a percentage is
    :class:`InvalidValue` (use :func:`parse_size` where one makes sense)."""
    size = parse_size(text)
    if size.bytes is None:
        raise InvalidValue(f"{text!r} is not an absolute size: expected e.g. '512MiB' or '2GiB'")
    return size.bytes


@attrs.frozen
class PsiSpec:
    """A PSI trigger: stall of ``threshold`` within ``window`` (seconds) on a resource."""

    resource: Literal["memory", "io", "cpu"]
    kind: Literal["some", "full"]
    threshold: float
    window: float
    #: The pressure file: ``/proc/pressure/<resource>`` or a cgroup v2 ``<resource>.pressure``.
    path: str

    @property
    def threshold_us(self) -> int:
        return round(self.threshold * 1e6)

    @property
    def window_us(self) -> int:
        return round(self.window * 1e6)

    def trigger_string(self) -> bytes:
        """What to write to the pressure file, with the trailing NUL the kernel needs (it
        overwrites the last byte written with NUL)."""
        return f"{self.kind} {self.threshold_us} {self.window_us}".encode() + b"\0"

    def __str__(self) -> str:
        return (
            f"{self.resource} {self.kind} {_fmt(self.threshold)}/{_fmt(self.window)} ({self.path})"
        )

    def check_window(self, *, unprivileged_only: bool) -> None:
        """Raise :class:`InvalidValue` if the kernel would refuse this window. No rounding."""
        if not PSI_WINDOW_MIN_US <= self.window_us <= PSI_WINDOW_MAX_US:
            raise InvalidValue(f"PSI trigger '{self}': the window must be within 500ms..10s")
        if unprivileged_only and self.window_us % PSI_UNPRIVILEGED_WINDOW_US:
            raise InvalidValue(
                f"PSI trigger '{self}': without CAP_SYS_RESOURCE the window must be a multiple"
                " of 2s (allowed: 2s, 4s, 6s, 8s, 10s)"
            )


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def parse_psi(text: str, *, cgroup: str | None = None) -> PsiSpec:
    """``"memory some 150ms/2s"`` (resource, some|full, threshold/window). With ``cgroup`` (a
    cgroup v2 directory) the trigger watches that cgroup's ``<resource>.pressure``."""
    parts = text.split()
    if len(parts) != 3 or "/" not in parts[2]:
        raise InvalidValue(
            f"{text!r} is not a PSI trigger: expected '<memory|io|cpu> <some|full>"
            " <threshold>/<window>', e.g. 'memory some 150ms/2s'"
        )
    resource, kind, limits = parts
    if resource not in PSI_RESOURCES:
        raise InvalidValue(f"{text!r}: the resource must be memory, io or cpu, not {resource!r}")
    if kind not in ("some", "full"):
        raise InvalidValue(f"{text!r}: the kind must be 'some' or 'full', not {kind!r}")
    threshold_text, _, window_text = limits.partition("/")
    threshold, window = parse_duration(threshold_text), parse_duration(window_text)
    if not 0 < threshold <= window:
        raise InvalidValue(f"{text!r}: the threshold must be above 0 and at most the window")
    path = f"{cgroup.rstrip('/')}/{resource}.pressure" if cgroup else f"/proc/pressure/{resource}"
    spec = PsiSpec(resource, kind, threshold, window, path)  # type: ignore[arg-type]
    if not PSI_WINDOW_MIN_US <= spec.window_us <= PSI_WINDOW_MAX_US:
        raise InvalidValue(f"{text!r}: the window must be within 500ms..10s")
    return spec

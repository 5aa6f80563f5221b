"""Durations, sizes and PSI specs as policies write them."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reapkit import InvalidValue
from reapkit._units import Size, parse_duration, parse_psi, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("150ms", 0.15),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("500us", 0.0005),
        ("1m", 60.0),
        (3, 3.0),
        ("2", 2.0),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ms", "2 parsecs", "-1s", "1.2.3s", "2x"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(InvalidValue, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", Size(bytes=512 << 20)),
        ("1G", Size(bytes=1 << 30)),
        ("1GB", Size(bytes=10**9)),
        ("1.5GiB", Size(bytes=3 << 29)),
        ("5%", Size(percent=5.0)),
        (4096, Size(bytes=4096)),
    ],
)
def test_sizes(text: str | int, size: Size) -> None:
    assert parse_size(text) == size


def test_percent_resolves_against_a_total() -> None:
    assert parse_size("10%").resolve(1000) == 100
    assert parse_size("1KiB").resolve(5) == 1024


@pytest.mark.parametrize("text", ["", "lots", "101%", "5 parsecs", -1])
def test_bad_sizes(text: str | int) -> None:
    with pytest.raises(InvalidValue):
        parse_size(text)


def test_psi_spec_and_its_trigger_string() -> None:
    spec = parse_psi("memory some 150ms/2s")
    assert (spec.resource, spec.kind, spec.threshold_us, spec.window_us) == (
        "memory",
        "some",
        150_000,
        2_000_000,
    )
    assert spec.path == "/proc/pressure/memory"
    assert spec.trigger_string() == b"some 150000 2000000\0"  # the NUL is not optional
    cg = parse_psi("io full 1s/10s", cgroup="/sys/fs/cgroup/app/")
    assert cg.path == "/sys/fs/cgroup/app/io.pressure"
    assert str(spec) == "memory some 150ms/2s (/proc/pressure/memory)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory some", "expected '<memory|io|cpu>"),
        ("disk some 1s/2s", "memory, io or cpu"),
        ("memory most 1s/2s", "'some' or 'full'"),
        ("memory some 3s/2s", "at most the window"),
        ("memory some 100ms/20s", "500ms..10s"),
        ("memory some 10ms/100ms", "500ms..10s"),
    ],
)
def test_bad_psi_specs(text: str, message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        parse_psi(text)


def test_unprivileged_windows_are_checked_without_rounding() -> None:
    parse_psi("memory some 150ms/4s").check_window(unprivileged_only=True)
    with pytest.raises(InvalidValue, match="multiple of 2s"):
        parse_psi("memory some 150ms/3s").check_window(unprivileged_only=True)
    parse_psi("memory some 150ms/3s").check_window(unprivileged_only=False)


@given(st.text(max_size=30))
def test_parsers_raise_only_invalid_value(text: str) -> None:
    for parse in (parse_duration, parse_size, parse_psi):
        with contextlib.suppress(InvalidValue):
            parse(text)  # type: ignore[operator]

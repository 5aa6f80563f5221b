"""``reapkit.units``: sizes and durations for plugin options, as ``docs/plugins.md#units``
shows them (its snippet runs with the page's others, in ``tests/test_docs_snippets.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

import reapkit
from reapkit.units import Size, parse_bytes, parse_duration, parse_size

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _units_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("{#units}")
    return text[start : text.index("\n### ", start)]


def test_the_documented_error_is_the_one_a_policy_gives() -> None:
    match = re.search(r"naming the option:\s*`([^`]*)`", _units_section())
    assert match, "the section must quote the error"
    expected = " ".join(match.group(1).split())

    @attrs.frozen
    class SizeOptions:
        rss: Size = attrs.field(default="5%", converter=parse_size)

    class AtLeast(reapkit.Selector):
        """A selector with a size option."""

        name = "rss-at-least"
        Options = SizeOptions

        def select(self, situation: object, candidates: object) -> list[reapkit.Ranked]:
            return []

    registry = reapkit.PluginRegistry()
    registry.register(AtLeast)
    with pytest.raises(reapkit.PolicyError) as info:
        reapkit.load_policy(
            text='[[rule]]\nname = "r"\nscope = "system"\nactions = ["kill"]\n'
            'select = [{ name = "rss-at-least", rss = "lots" }]\n',
            registry=registry,
        )
    assert str(info.value).endswith(expected), (str(info.value), expected)


@pytest.mark.parametrize(
    ("convert", "value", "expected"),
    [
        (parse_size, "512MiB", Size(bytes=512 << 20)),
        (parse_size, "5%", Size(percent=5.0)),
        (parse_size, 4096, Size(bytes=4096)),
        (parse_size, "max(2%, 100MiB)", Size(bytes=100 << 20, percent=2.0)),
        (parse_size, "MAX( 100MiB ,2% )", Size(bytes=100 << 20, percent=2.0)),
        (parse_bytes, "1G", 1 << 30),
        (parse_bytes, "1GB", 1000**3),
        (parse_bytes, 0, 0),
        (parse_duration, "150ms", 0.15),
        (parse_duration, 2, 2.0),
    ],
)
def test_converters_take_their_own_output(convert: object, value: object, expected: object) -> None:
    # attrs.evolve runs the converters again on converted values: they must hold.
    assert callable(convert)
    once = convert(value)
    assert once == expected
    assert convert(once) == expected


@pytest.mark.parametrize(
    ("convert", "value", "message"),
    [
        (parse_bytes, "5%", "not an absolute size"),
        (parse_bytes, "lots", "not a size"),
        (parse_size, True, "not a size"),
        (parse_size, [1], "not a size"),
        (parse_size, "max(2%, 3%)", "takes a percent and a size"),
        (parse_size, "max(1G, 2G)", "takes a percent and a size"),
        (parse_size, "max(lots, 2%)", "'lots' is not a size"),
        (parse_duration, "-1s", "not a duration"),
        (parse_duration, float("nan"), "not a usable duration"),
    ],
)
def test_bad_values_are_invalid_value_naming_the_value(
    convert: object, value: object, message: str
) -> None:
    assert callable(convert)
    with pytest.raises(reapkit.InvalidValue, match=message) as info:
        convert(value)
    assert isinstance(info.value, ValueError)  # what attrs and make_options expect
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_options_built_with_converters_evolve() -> None:
    @attrs.frozen
    class Options:
        limit: Size = attrs.field(default="5%", converter=parse_size)
        floor: int = attrs.field(default="64MiB", converter=parse_bytes)
        grace: float = attrs.field(default="2s", converter=parse_duration)

    options = Options()
    assert (options.limit, options.floor, options.grace) == (Size(percent=5.0), 64 << 20, 2.0)
    assert attrs.evolve(options, grace="150ms") == Options(grace=0.15)


def test_a_size_with_a_floor_is_the_larger_of_its_two_parts() -> None:
    line = parse_size("max(2%, 100MiB)")
    assert line.resolve(2 << 30) == 100 << 20  # 2 % of 2 GiB is 41 MiB: the floor wins
    assert line.resolve(64 << 30) == int((64 << 30) * 0.02)  # 1.3 GiB: the percent wins
    assert str(line) == "max(2%, 100MiB)"
    assert parse_size(str(line)) == line

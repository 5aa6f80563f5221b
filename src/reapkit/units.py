"""Sizes and durations as policies write them (``"512MiB"``, ``"5%"``, ``"150ms"``), for
plugin options.

Each parser is an attrs converter: a policy's value, or a default written the same way,
becomes the option's value when the policy loads, and a bad one is an
:class:`~reapkit.InvalidValue` (a ``ValueError``) naming the value, which the policy's error
turns into the rule, plugin and option at fault. Each also takes its own output unchanged,
as ``attrs.evolve`` requires::

    @attrs.frozen
    class Options:
        grace: float = attrs.field(default="2s", converter=reapkit.units.parse_duration)
        floor: int = attrs.field(default="64MiB", converter=reapkit.units.parse_bytes)
        limit: Size = attrs.field(default="5%", converter=reapkit.units.parse_size)

A :class:`Size` may be a percentage: ``limit.resolve(situation.meminfo.total)`` gives bytes.
"""

from ._units import Size as Size
from ._units import parse_bytes as parse_bytes
from ._units import parse_duration as parse_duration
from ._units import parse_size as parse_size

"""The public surface (trio's test_exports idea): public modules only re-export, nothing
private leaks, and every public name is documented."""

from __future__ import annotations

import types

import pytest

import reapkit
import reapkit.lowlevel
import reapkit.units

PUBLIC = [reapkit, reapkit.lowlevel, reapkit.units]


@pytest.mark.parametrize("module", PUBLIC, ids=lambda m: m.__name__)
def test_public_modules_only_reexport(module: types.ModuleType) -> None:
    names = [n for n in vars(module) if not n.startswith("_")]
    assert names, f"{module.__name__} exports nothing"
    for name in names:
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            assert obj.__name__.startswith("reapkit."), f"{module.__name__}.{name}"
            continue
        if isinstance(obj, str | int | float):  # constants such as DEFAULT_POLICY
            continue
        home = getattr(obj, "__module__", "")
        assert home.startswith("reapkit._"), f"{module.__name__}.{name} is defined in {home}"
        assert obj.__doc__, f"{module.__name__}.{name} has no docstring"


def test_the_kill_guard_is_the_public_way_to_signal() -> None:
    # Signals go through KillGuard; the raw syscalls live only in reapkit.lowlevel.
    assert not hasattr(reapkit, "pidfd_send_signal")
    assert hasattr(reapkit.lowlevel, "pidfd_send_signal")

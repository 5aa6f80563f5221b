"""A short chaos soak in the test suite (the long one is in ``make bench``): the real daemon
under injected plugin faults, broken reloads and a full records disk never exits, never
signals what its policy protects or what lies outside its scope, and ends every victim."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_chaos import soak

from .conftest import require_root

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_chaos_soak_keeps_guarding() -> None:
    require_root()
    result = soak(40, seed=7)
    assert result.cycles == 40, result
    assert result.daemon_exits == 0 and result.exit_status == 0, result
    assert result.protected_killed == 0 and result.outsider_killed == 0, result
    assert result.missed == 0 and result.ended == 40, result
    assert result.torn_records == 0, result
    assert result.kills_without_record == 0, result
    assert result.fds[-1] - result.fds[1] <= 2, result  # after warming up

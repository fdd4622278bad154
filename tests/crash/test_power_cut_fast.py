"""A cut after any storage write leaves pyimago.fast's images with at most leaks."""

from __future__ import annotations

import pytest

from .conftest import campaign


@pytest.mark.clause("crash.power-cut")
def test_power_cut_campaign() -> None:
    campaign("pyimago.fast", seed=2000)

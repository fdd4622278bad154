"""A cut after any storage write leaves pyimago.reference's images with at most leaks."""

from __future__ import annotations

import pytest

from .conftest import campaign


@pytest.mark.clause("crash.power-cut")
def test_power_cut_campaign() -> None:
    campaign("pyimago.reference", seed=1000)

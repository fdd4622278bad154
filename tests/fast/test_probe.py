"""pyimago.fast's probe recognisers agree with the reference's on any first sector."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyimago.fast._probe import claimed_by
from pyimago.oracle.conformance._sectors import HAND_MADE, HARMLESS
from pyimago.reference.probe import probe_sector

SEEDS = sorted({**HAND_MADE, **HARMLESS}.values())


@st.composite
def sectors(draw: st.DrawFn) -> bytes:
    """A known sector with a few bytes changed (near the magics, where it matters)."""
    base = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, 95))
        base[at] = draw(st.sampled_from([0, 1, 2, 3, 10, 13, 32, 35, base[at] ^ 1]))
    return bytes(base)


@pytest.mark.clause("raw.probed.block0")
@given(sectors())
def test_fast_and_reference_probe_alike(sector: bytes) -> None:
    assert (claimed_by(sector) or "raw") == probe_sector(sector)


@pytest.mark.clause("raw.probed.block0")
@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_each_qemu_format_is_recognised(name: str) -> None:
    assert claimed_by(HAND_MADE[name]) == name.split("-")[0]

"""Probed raw images: random block-0 requests give the same outcome in fast and reference.

The sectors start from QEMU formats' first bytes and near misses (oracle.conformance._sectors),
so that random writes and zeroing land near the edge between "raw" and "another format".
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyimago import fast, reference
from pyimago.oracle.conformance._sectors import HAND_MADE, HARMLESS
from pyimago.reference import MemoryStorage, ProbedRawWriteError

SEEDS = sorted({**HAND_MADE, **HARMLESS}.values())
#: Starting sectors pyimago opens as raw: not another format's header (raw.probe.other-formats),
#: and not the qcow2 magic (any version of it goes to the qcow2 driver).
STARTS = [s for s in HARMLESS.values() if not s.startswith(b"QFI\xfb")]
OPS = ("write", "write_zeroes", "discard_to_zero", "discard_to_any", "discard_to_backing")


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, int, bytes | int]:
    op = draw(st.sampled_from(OPS))
    offset = draw(st.integers(0, 600))
    if op == "write":
        data = draw(st.one_of(
            st.binary(min_size=1, max_size=40),
            st.sampled_from(SEEDS).map(lambda s: s[: 512 - offset] if offset < 512 else s[:8]),
        ))
        return op, offset, data or b"\0"
    return op, offset, draw(st.integers(1, 16))


def _run(module: object, start: bytes, ops: list[tuple[str, int, bytes | int]]
         ) -> tuple[list[str], bytes]:
    store = MemoryStorage(start + bytes(4096 - len(start)))
    outcomes: list[str] = []
    with module.open_image(store, writable=True) as disk:  # type: ignore[attr-defined]
        for op, offset, arg in ops:
            try:
                if op == "write":
                    assert isinstance(arg, bytes)
                    disk.write(arg, offset)
                else:
                    assert isinstance(arg, int)
                    getattr(disk, op)(offset, arg)
            except ProbedRawWriteError as exc:
                outcomes.append(f"refused as {exc.probed_as}")
            else:
                outcomes.append("done")
    return outcomes, store.snapshot()[:512]


@pytest.mark.clause("raw.probed.block0")
@given(st.sampled_from(STARTS), st.lists(requests(), min_size=1, max_size=6))
def test_fast_and_reference_guard_block0_alike(start: bytes,
                                               ops: list[tuple[str, int, bytes | int]]) -> None:
    ref_outcomes, ref_bytes = _run(reference, start, ops)
    fast_outcomes, fast_bytes = _run(fast, start, ops)
    assert fast_outcomes == ref_outcomes
    if "discard_to_any" not in {op for op, _, _ in ops}:
        assert fast_bytes == ref_bytes
    # Whatever happened, block 0 never probes as a format it did not start as.
    before = reference.probe.probe_sector(start)
    assert reference.probe.probe_sector(ref_bytes) in ("raw", before)

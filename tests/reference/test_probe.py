"""Format probing and the probed-raw block-0 guard (reference/probe.py)."""

from __future__ import annotations

import pytest
from pyimago.oracle.conformance._sectors import HAND_MADE, HARMLESS
from pyimago.reference import MemoryStorage, ProbedRawWriteError
from pyimago.reference.probe import PROBE_BYTES, ProbedRawGuard, probe_sector


@pytest.mark.clause("raw.probed.block0")
@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_each_qemu_format_is_recognised(name: str) -> None:
    assert probe_sector(HAND_MADE[name]) == name.split("-")[0]


@pytest.mark.clause("raw.probed.block0")
@pytest.mark.parametrize("name", sorted(HARMLESS))
def test_near_misses_probe_raw(name: str) -> None:
    assert probe_sector(HARMLESS[name]) == "raw"


@pytest.mark.clause("raw.probed.block0")
def test_qcow2_needs_version_two_or_more() -> None:
    for version, expected in ((0, "raw"), (1, "qcow"), (2, "qcow2"), (3, "qcow2"), (7, "qcow2")):
        assert probe_sector(b"QFI\xfb" + version.to_bytes(4, "big")) == expected


@pytest.mark.clause("raw.probed.block0")
def test_guard_judges_the_sector_after_the_change() -> None:
    store = MemoryStorage(b"QEDX" + bytes(1020))
    guard = ProbedRawGuard(store)
    with pytest.raises(ProbedRawWriteError) as info:
        guard.write_zeroes(3, 1)
    assert info.value.probed_as == "qed"
    with pytest.raises(ProbedRawWriteError):
        guard.write(b"\0" + b"more", 3)
    assert store.read(0, 4) == b"QEDX"
    guard.write(b"conectiX", PROBE_BYTES - 4)  # outside block 0 is not judged
    guard.write(b"QEDY", 0)
    guard.discard(0, PROBE_BYTES)
    assert store.read(0, 8) == bytes(8)

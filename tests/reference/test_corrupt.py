"""QEMU's damaged-image cases (iotests 060, 080) against pyimago.reference.

The images come from ``tests/fixtures/damaged.py`` (qemu-img made, then poked).  A write that
would land on metadata is refused with CorruptImageError naming what it overlaps, nothing is
written but the corrupt bit, later writes are refused and reads keep working
(qcow2.corrupt.overlap-check, qcow2.corrupt.mark).
"""

from __future__ import annotations

from pathlib import Path

import pyimago_tests_damaged as damaged
import pytest
from pyimago.reference import (
    CorruptImageError,
    MemoryStorage,
    UnsupportedFeatureError,
    create_image,
    open_image,
)
from pyimago_tests_reference_helpers import (
    header_of,
    l2_entry_pos,
    put_u64,
    qemu_img,
    require_qemu,
)

pytestmark = pytest.mark.qemu

CASES = {c.name: c for c in damaged.DAMAGED_CASES}
_CORRUPT_BIT = 1 << 1


def _qemu_finds_corruption(path: Path) -> bool:
    proc = qemu_img("check", "--output=json", path, ok=(0, 1, 2, 3))
    return proc.returncode in (1, 2)


@pytest.mark.clause("qcow2.corrupt.overlap-check", "qcow2.corrupt.mark")
@pytest.mark.parametrize(
    "name", [n for n, c in CASES.items() if c.expect == "write-corrupt"]
)
def test_write_onto_metadata_marks_the_image_corrupt(tmp_path: Path, name: str) -> None:
    require_qemu()
    case = CASES[name]
    path = damaged.build_case(name, tmp_path)
    assert _qemu_finds_corruption(path)
    before = path.read_bytes()
    offset, length = case.probe
    with open_image(path, writable=True, backing=None) as img:
        with pytest.raises(CorruptImageError, match="overlaps") as caught:
            img.write(b"\x2a" * length, offset)
        assert "0x" in str(caught.value)
        # Reads keep working; every later modifying operation is refused.
        if name == "060-l2-into-l1":
            # qcow2.metadata.overlap: an L2 table over other metadata is refused on reads too
            # (QEMU reads the L1 table as if it were an L2 table).
            with pytest.raises(CorruptImageError, match="overlaps the active L1 table"):
                img.read(offset, length)
        else:
            img.read(offset, length)
        for op in (lambda: img.write(b"\x01", 0), lambda: img.write_zeroes(0, 512),
                   lambda: img.discard_to_any(0, 512), lambda: img.resize(img.size + 512)):
            with pytest.raises(CorruptImageError, match="corrupt"):
                op()
    after = path.read_bytes()
    assert header_of(after).incompatible_features & _CORRUPT_BIT
    # Nothing was written but the corrupt bit (header bytes 72-79).
    assert after[:72] == before[:72] and after[80:] == before[80:]
    # QEMU refuses to open it read/write as well; read-only it opens and reads.
    with pytest.raises(UnsupportedFeatureError, match="corrupt"):
        open_image(path, writable=True, backing=None)
    with open_image(path, backing=None) as img:
        if name != "060-l2-into-l1":
            img.read(0, 4096)
    proc = qemu_img("info", path)
    assert "corrupt: true" in proc.stdout


@pytest.mark.clause("qcow2.snapshots.table", "qcow2.header.backing-name",
                    "qcow2.extensions.layout")
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.expect == "open-error"])
def test_damaged_header_is_refused_at_open(tmp_path: Path, name: str) -> None:
    require_qemu()
    path = damaged.build_case(name, tmp_path)
    for writable in (False, True):
        with pytest.raises(CorruptImageError):
            open_image(path, writable=writable, backing=None)


@pytest.mark.clause("qcow2.corrupt.overlap-check", "qcow2.corrupt.mark")
def test_v2_image_refuses_writes_after_an_overlap_without_a_corrupt_bit() -> None:
    # v2 has no incompatible features: the open image refuses writes all the same.
    storage = MemoryStorage()
    create_image(storage, 64 * 1024, cluster_size=512, compat="0.10")
    with open_image(storage, writable=True, backing=None) as img:
        img.write(b"\x01" * 512, 0)
    data = bytearray(storage.snapshot())
    h = header_of(data)
    # Guest cluster 0 now maps onto the refcount table.
    put_u64(data, l2_entry_pos(data, 0), h.refcount_table_offset | 1 << 63)
    with open_image(MemoryStorage(bytes(data)), writable=True, backing=None) as img:
        with pytest.raises(CorruptImageError, match="refcount table"):
            img.write(b"\x02" * 512, 0)
        with pytest.raises(CorruptImageError, match="corrupt"):
            img.write(b"\x02" * 512, 4096)
        assert img.read(4096, 512) == bytes(512)
        assert header_of(img.driver.storage.read(0, 512)).incompatible_features == 0

"""pyimago.fast's safety net: overlap checks, the corrupt bit, and hostile headers refused
(qcow2.corrupt.*; the damaged images of QEMU's iotests 060 and 080, rebuilt here).

A refcount that says "free" for a metadata cluster would make the allocator hand that
cluster out as data; every allocation and write is checked against all metadata instead.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pyimago import fast
from pyimago.fast import CorruptImageError, MemoryStorage
from pyimago.fast._header import Span
from pyimago.fast._snapshots import read_snapshot_table
from pyimago.reference import ImageNotFoundError

from .conftest import damaged_fixtures, qemu_img, require_qemu

CS = 512


def _image(size: int = 64 * 1024, **opts: object) -> MemoryStorage:
    store = MemoryStorage()
    fast.create_image(store, size, cluster_size=CS, **opts)
    with fast.open_image(store, writable=True) as img:
        img.write(b"\x5a" * 1024, 0)
    return store


def _u64(raw: bytes | bytearray, at: int) -> int:
    return int(struct.unpack_from(">Q", raw, at)[0])


def _set_refcount(raw: bytearray, cluster: int, value: int) -> None:
    """Set a 16-bit refcount (the first refcount block covers every cluster used here)."""
    block = _u64(raw, _u64(raw, 48)) & ~0x1FF
    struct.pack_into(">H", raw, block + 2 * cluster, value)


def _corrupt_bit(raw: bytes) -> bool:
    return bool(_u64(raw, 72) & 2)


def _refused_allocation(raw: bytearray, what: str) -> None:
    """Writing a fresh guest cluster must be refused with ``what`` named; the image gets the
    corrupt bit, later writes fail, reads keep working."""
    store = MemoryStorage(raw)
    with fast.open_image(store, writable=True) as img:
        before = img.read(0, img.size)
        with pytest.raises(CorruptImageError, match=f"would overwrite the {what}"):
            img.write(b"\xee" * 512, 40 * 1024)
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            img.write(b"\xee" * 512, 0)
        assert img.read(0, img.size) == before
    after = store.snapshot()
    assert _corrupt_bit(after)
    # Only the header changed (the corrupt bit).
    assert after[CS:] == bytes(raw[CS:])
    with pytest.raises(fast.PyimagoError, match="corrupt"):
        fast.open_image(MemoryStorage(after), writable=True)
    with fast.open_image(MemoryStorage(after)) as img:
        assert img.read(0, img.size) == before


@pytest.mark.clause("qcow2.corrupt.overlap-check", "qcow2.corrupt.mark")
@pytest.mark.parametrize("target", ["active L1 table", "refcount table",
                                    "refcount block", "active L2 table"])
def test_an_allocation_onto_metadata_is_refused(target: str) -> None:
    # iotest 060: a refcount of 0 on a metadata cluster.
    raw = bytearray(_image().snapshot())
    cluster = {
        "active L1 table": _u64(raw, 40) // CS,
        "refcount table": _u64(raw, 48) // CS,
        "refcount block": _u64(raw, _u64(raw, 48)) // CS,
        "active L2 table": (_u64(raw, _u64(raw, 40)) & 0x00FFFFFFFFFFFE00) // CS,
    }[target]
    _set_refcount(raw, cluster, 0)
    _refused_allocation(raw, target)


@pytest.mark.clause("qcow2.corrupt.overlap-check")
@pytest.mark.parametrize("target",
                         ["snapshot table", "L1 table of snapshot", "L2 table of snapshot"])
def test_an_allocation_onto_snapshot_metadata_is_refused(tmp_path: Path, target: str) -> None:
    require_qemu()
    path = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", path, "64K")
    qemu_img("snapshot", "-c", "s1", path)
    with fast.open_image(path, writable=True) as img:
        img.write(b"\x5a" * 1024, 0)  # the active L2 table is no longer the snapshot's
    qemu_img("snapshot", "-c", "s2", path)
    with fast.open_image(path, writable=True) as img:
        img.write(b"\x5b" * 512, 0)  # copy the shared table: the snapshot keeps its own
    raw = bytearray(path.read_bytes())
    snaps = _u64(raw, 64)
    table, _ = read_snapshot_table(lambda at, n: bytes(raw[at : at + n]),
                                   Span(snaps, 2), len(raw))
    sn_l1 = table[1].l1.at  # s2's: s1 was taken before any table existed
    cluster = {
        "snapshot table": snaps // CS,
        "L1 table of snapshot": sn_l1 // CS,
        "L2 table of snapshot": (_u64(raw, sn_l1) & 0x00FFFFFFFFFFFE00) // CS,
    }[target]
    assert cluster
    _set_refcount(raw, cluster, 0)
    _refused_allocation(raw, target)


@pytest.mark.clause("qcow2.corrupt.mark")
def test_v2_images_refuse_writes_after_a_hit_without_a_corrupt_bit() -> None:
    raw = bytearray(_image(compat="0.10").snapshot())
    _set_refcount(raw, _u64(raw, 40) // CS, 0)
    store = MemoryStorage(raw)
    with fast.open_image(store, writable=True) as img:
        with pytest.raises(CorruptImageError, match="L1 table"):
            img.write(b"\xee" * 512, 40 * 1024)
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            img.resize(128 * 1024)
    assert store.snapshot() == bytes(raw)


def _header_with_backing(name: bytes, ext_len: int = 0) -> bytearray:
    store = MemoryStorage()
    fast.create_image(store, 64 * 1024, cluster_size=CS, backing_file="b.raw", backing_fmt="raw")
    raw = bytearray(store.snapshot())
    at = _u64(raw, 8)
    raw[at : at + len(name)] = name
    struct.pack_into(">I", raw, 16, len(name))
    if ext_len:
        # The first extension (the backing format) now claims to run into the name.
        hdr_len = int(struct.unpack_from(">I", raw, 100)[0])
        struct.pack_into(">I", raw, hdr_len + 4, ext_len)
    return raw


def test_a_nul_in_the_backing_name_is_corruption() -> None:
    raw = _header_with_backing(b"b\0.raw")
    with pytest.raises(CorruptImageError, match="NUL"):
        fast.open_image(MemoryStorage(raw), backing=None)


def test_a_header_extension_crossing_the_backing_name_is_refused() -> None:
    # iotest 080: "Header extension too large".
    raw = _header_with_backing(b"b.raw", ext_len=512)
    with pytest.raises(CorruptImageError, match="header extension"):
        fast.open_image(MemoryStorage(raw), backing=None)


def test_an_unaligned_snapshot_offset_is_refused_with_no_snapshots() -> None:
    # iotest 080: QEMU validates snapshots_offset whatever nb_snapshots says.
    raw = bytearray(_image().snapshot())
    struct.pack_into(">Q", raw, 64, 0x10001)
    with pytest.raises(CorruptImageError, match="snapshots_offset"):
        fast.open_image(MemoryStorage(raw))


def test_a_missing_backing_file_is_a_pyimago_error(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    fast.create_image(top, 65536, backing_file="gone.raw", backing_fmt="raw", unsafe=True)
    with pytest.raises(ImageNotFoundError, match=r"gone\.raw") as info:
        fast.open_image(top)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.filename == str(tmp_path / "gone.raw")
    with pytest.raises(ImageNotFoundError, match="nothere"):
        fast.open_image(tmp_path / "nothere.qcow2")


# -- QEMU's damaged-image cases (tests/fixtures/damaged.py) --------------------------------------


damaged = damaged_fixtures()
CASES = {c.name: c for c in damaged["DAMAGED_CASES"]}


@pytest.mark.clause("qcow2.corrupt.overlap-check", "qcow2.corrupt.mark")
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.expect == "write-corrupt"])
def test_qemu_damaged_write_is_refused_and_marks_the_image_corrupt(
    tmp_path: Path, name: str
) -> None:
    require_qemu()
    path = damaged["build_case"](name, tmp_path)
    before = path.read_bytes()
    offset, length = CASES[name].probe
    with fast.open_image(path, writable=True, backing=None) as img:
        with pytest.raises(CorruptImageError, match=r"0x[0-9a-f]+ .*(overwrite|overlaps)"):
            img.write(b"\x2a" * length, offset)
        if name != "060-l2-into-l1":  # an L2 table over the L1 table is refused on reads too
            assert img.read(offset, length) == fast.open_image(
                MemoryStorage(before), backing=None).read(offset, length)
        for op in (lambda: img.write(b"\x01", 0), lambda: img.write_zeroes(0, 512),
                   lambda: img.discard_to_any(0, 512), lambda: img.resize(img.size + 512)):
            with pytest.raises(CorruptImageError):
                op()
    after = path.read_bytes()
    assert _corrupt_bit(after)
    assert after[:72] == before[:72] and after[80:] == before[80:]
    assert "corrupt: true" in qemu_img("info", path).stdout


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.expect == "open-error"])
def test_qemu_damaged_header_is_refused_at_open(tmp_path: Path, name: str) -> None:
    require_qemu()
    path = damaged["build_case"](name, tmp_path)
    for writable in (False, True):
        with pytest.raises(CorruptImageError):
            fast.open_image(path, writable=writable, backing=None)

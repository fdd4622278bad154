"""Hostile and edge-case images with snapshots, extended L2 entries or an external data file.

Crafted from images pyimago makes in memory, opened by both implementations: each must refuse
malformed tables with a pyimago error naming the value, and honour the offset-0 rule of data
files.  (The QEMU-made images are in tests/interop/test_qcow2_read_features.py.)
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from pyimago import fast, reference
from pyimago.reference import (
    CorruptImageError,
    InvalidRequestError,
    MemoryStorage,
    SnapshotInfo,
)
from pyimago.reference.qcow2.constants import QCOW2_EXT_MAGIC_DATA_FILE
from pyimago.reference.qcow2.extensions import HeaderExtension
from pyimago_tests_reference_helpers import (
    KiB,
    get_u64,
    header_of,
    l2_entry_pos,
    make_image,
    patch_header,
    put_u64,
    set_extensions,
)

Opener = Callable[..., Any]
COPIED = 1 << 63


@pytest.fixture(params=["reference", "fast"])
def open_image(request: pytest.FixtureRequest) -> Opener:
    opener: Opener = reference.open_image if request.param == "reference" else fast.open_image
    return opener


def _open(opener: Opener, data: bytes | bytearray, **kwargs: Any) -> Any:
    return opener(MemoryStorage(bytes(data)), backing=None, **kwargs)


# -- snapshot table --------------------------------------------------------------------------------


def _entry(l1_offset: int, l1_size: int, sid: bytes, name: bytes, extra: bytes,
           *, date: tuple[int, int] = (1700000000, 5), clock: int = 7, vm32: int = 0) -> bytes:
    head = struct.pack(">QIHHIIQII", l1_offset, l1_size, len(sid), len(name), *date, clock,
                       vm32, len(extra))
    raw = head + extra + sid + name
    return raw + bytes(-len(raw) % 8)


def _base() -> bytearray:
    return make_image(64 * KiB, cluster_size=4 * KiB, writes=[(0, b"\x11" * 5000)])


def _with_snapshots(
    data: bytearray, entries: list[bytes], count: int | None = None
) -> bytearray:
    """``data`` with a snapshot table holding ``entries`` appended (refcounts are not
    updated: only reads happen)."""
    table_at = len(data)
    blob = b"".join(entries)
    data += blob + bytes(-len(blob) % 4096)
    patch_header(data, nb_snapshots=len(entries) if count is None else count,
                 snapshots_offset=table_at)
    return data


def _l1(data: bytearray) -> tuple[int, int]:
    h = header_of(data)
    return h.l1_table_offset, h.l1_size


@pytest.mark.clause("qcow2.snapshots.list")
def test_snapshot_fields_decode(open_image: Opener) -> None:
    data = _base()
    l1 = _l1(data)
    extra_v3 = struct.pack(">QQq", 1 << 33, 123 * KiB, 99)
    entries = [
        _entry(*l1, b"1", b"old", b"", vm32=4096),  # v2-style: no extra data
        _entry(*l1, b"7", "ünï".encode(), extra_v3, vm32=5),
        _entry(*l1, b"8", b"no icount", struct.pack(">QQq", 0, 64 * KiB, -1) + b"future"),
    ]
    data = _with_snapshots(data, entries)
    size = header_of(data).size
    with _open(open_image, data) as img:
        assert img.driver.snapshots == (
            SnapshotInfo("1", "old", 4096, 1700000000, 5, 7, size, None),
            SnapshotInfo("7", "ünï", 1 << 33, 1700000000, 5, 7, 123 * KiB, 99),
            SnapshotInfo("8", "no icount", 0, 1700000000, 5, 7, 64 * KiB, None),
        )


@pytest.mark.clause("qcow2.snapshots.open")
def test_snapshot_lookup_prefers_ids(open_image: Opener) -> None:
    data = _base()
    l1_at, l1_n = _l1(data)
    # snapshot "2" is named "1": key "1" is the ID of the first, which has no L1 table
    data = _with_snapshots(
        data, [_entry(0, 0, b"1", b"empty", b""), _entry(l1_at, l1_n, b"2", b"1", b"")]
    )
    with _open(open_image, data, snapshot="1") as snap:
        assert snap.read(0, 4096) == bytes(4096)
    with _open(open_image, data, snapshot="2") as snap:
        assert snap.read(0, 4096) == b"\x11" * 4096
    with pytest.raises(InvalidRequestError, match="'3'"):
        _open(open_image, data, snapshot="3")


@pytest.mark.clause("qcow2.snapshots.list", "errors.corrupt-not-stdlib")
@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("extra-too-big", "2000"),
        ("truncated", "runs past"),
        ("count-too-high", "runs past"),
    ],
)
def test_hostile_snapshot_tables(open_image: Opener, case: str, match: str) -> None:
    data = _base()
    l1 = _l1(data)
    if case == "extra-too-big":
        image = _with_snapshots(_base(), [_entry(*l1, b"1", b"x", bytes(2000))])
    elif case == "truncated":
        image = _with_snapshots(_base(), [_entry(*l1, b"1", b"x" * 5000, b"")])
        del image[-4096:]
    else:
        image = _with_snapshots(_base(), [_entry(*l1, b"1", b"x", b"")], count=200)
    with pytest.raises(CorruptImageError, match=match), _open(open_image, image) as img:
        img.driver.snapshots  # noqa: B018 -- listing reads the table


@pytest.mark.clause("qcow2.snapshots.open", "errors.corrupt-not-stdlib")
def test_snapshot_l1_table_size_is_bounded(open_image: Opener) -> None:
    data = _base()
    data = _with_snapshots(data, [_entry(_l1(data)[0], 1 << 23, b"1", b"x", b"")])
    with _open(open_image, data) as img:  # listed (check() reports it) ...
        assert img.driver.snapshots[0].id == "1"
    with pytest.raises(CorruptImageError, match="L1 table"):  # ... but not opened
        _open(open_image, data, snapshot="1")


@pytest.mark.clause("qcow2.snapshots.open", "errors.corrupt-not-stdlib")
@pytest.mark.parametrize("l1_offset", [4096 + 8, 0x7FFF0000, 0])
def test_snapshot_l1_table_must_be_a_cluster_of_the_file(
    open_image: Opener, l1_offset: int
) -> None:
    data = _with_snapshots(_base(), [_entry(l1_offset, 1, b"1", b"x", b"")])
    with pytest.raises(CorruptImageError, match=f"0x{l1_offset:x}"):
        _open(open_image, data, snapshot="1")


# -- extended L2 entries ---------------------------------------------------------------------------


@pytest.mark.clause("qcow2.extended-l2.min-cluster", "errors.corrupt-not-stdlib")
def test_extended_l2_needs_16k_clusters(open_image: Opener) -> None:
    data = make_image(4 * KiB * 64, cluster_size=8 * KiB)
    patch_header(data, incompatible_features=1 << 4, l1_size=4)
    with pytest.raises(CorruptImageError, match="8192"):
        _open(open_image, data)


# -- external data files ---------------------------------------------------------------------------


def _data_file_image() -> tuple[bytearray, int]:
    """An image whose guest cluster 0 is mapped, with bit 2 set; and where its L2 entry is."""
    data = make_image(64 * KiB, cluster_size=4 * KiB, writes=[(0, b"\x33" * 4096)])
    pos = l2_entry_pos(data, 0)
    patch_header(data, incompatible_features=1 << 2)
    return data, pos


@pytest.mark.clause("qcow2.data-file.offsets")
def test_data_file_offsets_and_offset_zero(open_image: Opener) -> None:
    data, pos = _data_file_image()
    host = get_u64(data, pos) & 0x00FFFFFFFFFFFE00
    external = bytearray(64 * KiB)
    external[:4096] = b"\xd0" * 4096
    external[host : host + 4096] = b"\xd1" * 4096
    with _open(open_image, data, data_file=MemoryStorage(bytes(external))) as img:
        assert img.read(0, 4096) == b"\xd1" * 4096, "host offsets are data file offsets"
        assert img.read(4096, 4096) == bytes(4096)
    put_u64(data, pos, COPIED)  # host offset 0, COPIED: the data file's first cluster
    with _open(open_image, data, data_file=MemoryStorage(bytes(external))) as img:
        assert img.read(0, 4096) == b"\xd0" * 4096
    put_u64(data, pos, 0)  # no COPIED: unallocated
    with _open(open_image, data, data_file=MemoryStorage(bytes(external))) as img:
        assert img.read(0, 4096) == bytes(4096)


@pytest.mark.clause("qcow2.data-file.offsets", "errors.corrupt-not-stdlib")
def test_data_file_images_have_no_compressed_clusters(open_image: Opener) -> None:
    data, pos = _data_file_image()
    put_u64(data, pos, (1 << 62) | 0x5000)
    with _open(open_image, data, data_file=MemoryStorage(bytes(64 * KiB))) as img, \
            pytest.raises(CorruptImageError, match="compressed"):
        img.read(0, 4096)


@pytest.mark.clause("qcow2.data-file.open")
def test_data_file_must_be_named_or_given(open_image: Opener) -> None:
    data, _ = _data_file_image()
    with pytest.raises(InvalidRequestError, match="data_file="):
        _open(open_image, data)
    # named relatively, but the image is in memory: there is no folder to resolve it in
    set_extensions(data, [HeaderExtension(QCOW2_EXT_MAGIC_DATA_FILE, b"data.bin")])
    with pytest.raises(InvalidRequestError, match=r"data\.bin"):
        _open(open_image, data)
    with _open(open_image, data, data_file=MemoryStorage(bytes(64 * KiB))) as img:
        assert img.driver.data_file == "data.bin"
        assert img.read(0, 4096) == bytes(4096)

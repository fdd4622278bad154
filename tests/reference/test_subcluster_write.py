"""reference/qcow2/subcluster_write.py: copy-on-write ranges and bitmaps of extended L2 writes,
and the driver's subcluster write paths seen through their raw L2 entries."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyimago.reference import (
    CorruptImageError,
    InvalidRequestError,
    MemoryStorage,
    create_image,
    open_image,
)
from pyimago.reference.qcow2.subcluster_write import (
    QCOW_L2_BITMAP_ALL_ZEROES,
    encode_extended_entry,
    sub_alloc_range,
    sub_zero_range,
    subcluster_cow_range,
    written_bitmap,
    zeroed_bitmap,
)
from pyimago.reference.qcow2.tables import ClusterType, L2Entry

KiB = 1 << 10
SC_BITS = 11  # 64 KiB clusters: 2 KiB subclusters
NORMAL = L2Entry(ClusterType.NORMAL, 0x50000, True)
SHARED = L2Entry(ClusterType.NORMAL, 0x50000, False)


@pytest.mark.clause("qcow2.extended-l2.write")
def test_ranges() -> None:
    assert sub_alloc_range(0, 32) == 0xFFFFFFFF
    assert sub_alloc_range(3, 5) == 0b11000
    assert sub_zero_range(3, 5) == 0b11000 << 32
    assert sub_alloc_range(4, 4) == 0


@pytest.mark.clause("qcow2.extended-l2.write")
@given(st.integers(0, (1 << 64) - 1), st.integers(0, 31), st.integers(1, 32))
def test_written_bitmap_allocates_and_unzeroes_only_the_range(bitmap: int, first: int,
                                                              n: int) -> None:
    end = min(32, first + n)
    new = written_bitmap(bitmap, first, end)
    for sc in range(32):
        alloc, zero = new >> sc & 1, new >> (32 + sc) & 1
        if first <= sc < end:
            assert (alloc, zero) == (1, 0)
        else:
            assert (alloc, zero) == (bitmap >> sc & 1, bitmap >> (32 + sc) & 1)


@pytest.mark.clause("qcow2.extended-l2.clear")
@given(st.integers(0, (1 << 64) - 1), st.integers(0, 31), st.integers(1, 32))
def test_zeroed_bitmap_zeroes_only_the_range(bitmap: int, first: int, n: int) -> None:
    end = min(32, first + n)
    new = zeroed_bitmap(bitmap, first, end)
    for sc in range(32):
        want = (0, 1) if first <= sc < end else (bitmap >> sc & 1, bitmap >> (32 + sc) & 1)
        assert (new >> sc & 1, new >> (32 + sc) & 1) == want


@pytest.mark.clause("qcow2.extended-l2.write")
@pytest.mark.parametrize(
    ("cluster", "bitmap", "start", "end", "keep_old", "want"),
    [
        # unallocated cluster: only the subclusters the write touches
        (L2Entry(ClusterType.UNALLOCATED), 0, 2 * KiB + 100, 2 * KiB + 200, False,
         (2 * KiB, 4 * KiB)),
        # own cluster: the partial subclusters at both ends
        (NORMAL, 0b1, 5 * KiB, 9 * KiB, True, (4 * KiB, 10 * KiB)),
        # a shared cluster copied to a new one: back to the first allocated subcluster and on
        # to the last one (calculate_l2_meta's ctz32/clz32 of the allocation bitmap)
        (SHARED, 0b100 | 1 << 20, 10 * KiB, 11 * KiB, False, (4 * KiB, 42 * KiB)),
        (SHARED, 1 << 5, 1 * KiB, 2 * KiB, False, (0, 12 * KiB)),
        (SHARED, 0, 7 * KiB, 8 * KiB, False, (6 * KiB, 8 * KiB)),
        # compressed: the whole cluster
        (L2Entry(ClusterType.COMPRESSED, 0x50000, False, 2), 0, 7 * KiB, 8 * KiB, False,
         (0, 64 * KiB)),
    ],
)
def test_cow_range(cluster: L2Entry, bitmap: int, start: int, end: int, keep_old: bool,
                   want: tuple[int, int]) -> None:
    assert subcluster_cow_range(cluster, bitmap, start, end, SC_BITS, keep_old=keep_old) == want


@pytest.mark.clause("qcow2.extended-l2.clear")
def test_encode_extended_entry_never_sets_the_zero_flag() -> None:
    assert encode_extended_entry(L2Entry(ClusterType.ZERO_PLAIN), None) == (
        0, QCOW_L2_BITMAP_ALL_ZEROES)
    assert encode_extended_entry(L2Entry(ClusterType.ZERO_ALLOC, 0x50000, True), None) == (
        0x50000 | 1 << 63, QCOW_L2_BITMAP_ALL_ZEROES)
    # preallocated: a host cluster, no subcluster allocated (as QEMU leaves it)
    assert encode_extended_entry(NORMAL, None) == (0x50000 | 1 << 63, 0)
    assert encode_extended_entry(L2Entry(ClusterType.UNALLOCATED), None) == (0, 0)


def _first_entries(storage: MemoryStorage, n: int) -> list[tuple[int, int]]:
    data = storage.snapshot()
    l1 = struct.unpack(">Q", data[40:48])[0]
    l2 = struct.unpack(">Q", data[l1 : l1 + 8])[0] & 0x00FFFFFFFFFFFE00
    return [struct.unpack(">QQ", data[l2 + 16 * i : l2 + 16 * i + 16]) for i in range(n)]


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.extended-l2.clear")
def test_driver_paths_leave_the_bitmaps_qemu_leaves() -> None:
    storage = MemoryStorage()
    create_image(storage, 256 * KiB, extended_l2=True)
    with open_image(storage, writable=True) as img:
        img.write(b"a" * 1024, 2 * KiB + 512)          # sc 1 of cluster 0
        img.write_zeroes(40 * KiB, 4 * KiB)            # sc 20-21 zero
        img.write(b"b" * 64 * KiB, 64 * KiB)           # all of cluster 1
        img.write_zeroes(64 * KiB, 8 * KiB)            # sc 0-3 of cluster 1 zero
        img.write_zeroes(128 * KiB, 64 * KiB)          # cluster 2: all zero, no host
        img.discard_to_backing(192 * KiB, 64 * KiB)    # cluster 3: nothing
        assert img.read(2 * KiB, 2 * KiB) == bytes(512) + b"a" * 1024 + bytes(512)
    (e0, b0), (e1, b1), (e2, b2), (e3, b3) = _first_entries(storage, 4)
    assert b0 == 0b10 | 0b11 << 52 and e0 & 1 << 63
    assert b1 == 0xFFFFFFF0 | 0xF << 32 and e1 & 1 << 63
    assert (e2, b2) == (0, QCOW_L2_BITMAP_ALL_ZEROES)
    assert (e3, b3) == (0, 0)


@pytest.mark.clause("qcow2.extended-l2.invalid-write")
def test_invalid_bitmap_on_write_marks_the_image_corrupt() -> None:
    storage = MemoryStorage()
    create_image(storage, 128 * KiB, extended_l2=True)
    with open_image(storage, writable=True) as img:
        img.write(b"x", 0)
    data = bytearray(storage.snapshot())
    l1 = struct.unpack(">Q", data[40:48])[0]
    l2 = struct.unpack(">Q", data[l1 : l1 + 8])[0] & 0x00FFFFFFFFFFFE00
    data[l2 : l2 + 8] = bytes(8)  # allocated subcluster 0 but no host cluster
    damaged = MemoryStorage(bytes(data))
    with open_image(damaged, writable=True) as img, pytest.raises(CorruptImageError,
                                                                  match="bitmap"):
        img.write(b"y", 100)
    assert struct.unpack(">Q", damaged.snapshot()[72:80])[0] & 0b10  # the corrupt bit


@pytest.mark.clause("create.qcow2.data-file")
def test_relative_data_file_for_a_storage_object_is_refused() -> None:
    storage = MemoryStorage()
    with pytest.raises(InvalidRequestError, match=r"d\.raw"):
        create_image(storage, 64 * KiB, data_file="d.raw")
    assert storage.size() == 0

"""The flat model against hand-computed expectations (no implementation involved)."""

from __future__ import annotations

import pytest
from pyimago.oracle.model import (
    ANY_ALLOC,
    Alloc,
    BackingView,
    FlatModel,
    LayerTraits,
    first_mismatch,
)
from pyimago.oracle.ops import decode_word, pattern
from pyimago.reference import PreallocateMode

D, Z, B = Alloc.DATA, Alloc.ZERO, Alloc.BACKING
C = 512  # cluster size used throughout: small numbers are easy to check by eye
V3 = LayerTraits.qcow2(C, "1.1")
V2 = LayerTraits.qcow2(C, "0.10")


def backing(data: bytes) -> BackingView:
    return BackingView(data, b"\x01" * len(data))


def allocs(model: FlatModel) -> list[frozenset[Alloc]]:
    return [model.allowed(u) for u in range(len(model.alloc))]


def expected(model: FlatModel, offset: int, length: int) -> bytes:
    data, known = model.read(offset, length)
    assert known == b"\x01" * length, "range unexpectedly unknown"
    return data


# -- fresh images ---------------------------------------------------------------------------


def test_fresh_qcow2_without_backing_is_unallocated_zero() -> None:
    m = FlatModel(3 * C, V3)
    assert allocs(m) == [{B}] * 3
    assert expected(m, 0, 3 * C) == bytes(3 * C)


@pytest.mark.clause("backing.shorter")
def test_fresh_overlay_over_shorter_backing_reads_backing_then_zero() -> None:
    m = FlatModel(3 * C, V3, backing(b"\xaa" * C))
    assert expected(m, 0, 3 * C) == b"\xaa" * C + bytes(2 * C)
    assert allocs(m) == [{B}] * 3


@pytest.mark.clause("backing.longer")
def test_fresh_overlay_shorter_than_backing_cuts_it_off() -> None:
    m = FlatModel(C, V3, backing(b"\xbb" * 3 * C))
    assert m.size == C
    assert expected(m, 0, C) == b"\xbb" * C


@pytest.mark.clause("raw.passthrough")
def test_fresh_raw_is_zero_data() -> None:
    m = FlatModel(2 * C, LayerTraits.raw())
    assert allocs(m) == [{D}] * 2
    assert expected(m, 0, 2 * C) == bytes(2 * C)


@pytest.mark.clause("create.preallocation", "access.resize.grow-format-allocate")
def test_preallocated_image_reads_zero_and_is_mapped() -> None:
    m = FlatModel(2 * C, V3, prealloc=PreallocateMode.FORMAT_ALLOCATE)
    assert allocs(m) == [{D, Z}] * 2
    assert expected(m, 0, 2 * C) == bytes(2 * C)
    v2 = FlatModel(2 * C, V2, prealloc=PreallocateMode.FORMAT_ALLOCATE)
    assert allocs(v2) == [{D}] * 2


@pytest.mark.clause("access.resize.grow-full-allocate", "access.resize.grow-write-data")
def test_grow_full_allocate_and_write_data_map_data() -> None:
    for mode in (PreallocateMode.FULL_ALLOCATE, PreallocateMode.WRITE_DATA):
        m = FlatModel(C, V3, backing(b"\x01" * 3 * C))
        m.resize(3 * C, mode)
        assert allocs(m) == [{B}, {D}, {D}]
        assert expected(m, 0, 3 * C) == b"\x01" * C + bytes(2 * C)


# -- reads ----------------------------------------------------------------------------------


@pytest.mark.clause("access.read.past-end-zero")
def test_read_past_end_is_known_zero() -> None:
    m = FlatModel(C, V3, backing(b"\xcc" * 2 * C))
    data, known = m.read(C - 2, 6)
    assert data == b"\xcc\xcc" + bytes(4)
    assert known == b"\x01" * 6


def test_in_range() -> None:
    m = FlatModel(2 * C, V3)
    assert m.in_range(0, 2 * C)
    assert m.in_range(2 * C, 0)
    assert not m.in_range(2 * C - 1, 2)
    assert not m.in_range(-1, 1)


# -- writes ---------------------------------------------------------------------------------


@pytest.mark.clause("access.cow.partial-cluster")
def test_partial_write_allocates_and_keeps_backing_around_it() -> None:
    m = FlatModel(2 * C, V3, backing(b"\x11" * 2 * C))
    m.write(C + 10, b"\x99" * 20)
    assert allocs(m) == [{B}, {D}]
    assert expected(m, C, C) == b"\x11" * 10 + b"\x99" * 20 + b"\x11" * (C - 30)


def test_write_across_cluster_boundary_allocates_both() -> None:
    m = FlatModel(3 * C, V3)
    m.write(C - 1, b"\x01\x02")
    assert allocs(m) == [{D}, {D}, {B}]
    assert expected(m, C - 2, 4) == b"\x00\x01\x02\x00"


# -- write_zeroes ---------------------------------------------------------------------------


@pytest.mark.clause("access.write-zeroes.no-free", "qcow2.zero.flag")
def test_write_zeroes_v3_whole_cluster_is_explicit_zero() -> None:
    m = FlatModel(3 * C, V3, backing(b"\x22" * 3 * C))
    m.write(0, b"\x33" * 3 * C)
    m.write_zeroes(0, 2 * C + 100)
    # Two whole clusters: explicit zero; the partial third: zeroes written into data (or the
    # whole cluster zeroed, had the rest been zero).
    assert allocs(m) == [{Z}, {Z}, {D, Z}]
    assert expected(m, 0, 3 * C) == bytes(2 * C + 100) + b"\x33" * (C - 100)


@pytest.mark.clause("access.write-zeroes.no-free")
def test_write_zeroes_over_unallocated_zero_backing_may_stay_unallocated() -> None:
    m = FlatModel(2 * C, V3, backing(bytes(2 * C)))
    m.write_zeroes(0, C)
    assert allocs(m) == [{Z, B}, {B}]


def test_write_zeroes_over_unallocated_nonzero_backing_must_hide_it() -> None:
    m = FlatModel(C, V3, backing(b"\x44" * C))
    m.write_zeroes(0, C)
    assert allocs(m) == [{Z}]
    assert expected(m, 0, C) == bytes(C)


@pytest.mark.clause("access.write-zeroes.no-free", "qcow2.zero.v2-none")
def test_write_zeroes_v2_never_frees_data() -> None:
    m = FlatModel(2 * C, V2)
    m.write(0, b"\x55" * C)
    m.write_zeroes(0, 2 * C)
    # Cluster 0 was data: zeroes are written into it.  Cluster 1 was unallocated over no
    # backing, so it may stay so (or be allocated and zeroed).
    assert allocs(m) == [{D}, {D, B}]
    assert expected(m, 0, 2 * C) == bytes(2 * C)


def test_write_zeroes_v2_over_nonzero_backing_writes_data() -> None:
    m = FlatModel(C, V2, backing(b"\x66" * C))
    m.write_zeroes(0, C)
    assert allocs(m) == [{D}]


def test_write_zeroes_partial_over_zero_backing() -> None:
    m = FlatModel(C, V3, backing(bytes(C)))
    m.write_zeroes(10, 10)
    assert allocs(m) == [{D, Z, B}]


# -- discard_to_zero ------------------------------------------------------------------------


@pytest.mark.clause("access.discard-to-zero.frees", "access.discard-to-zero.reads-zero")
def test_discard_to_zero_v3_makes_explicit_zero() -> None:
    m = FlatModel(2 * C, V3, backing(b"\x77" * 2 * C))
    m.write(0, b"\x88" * 2 * C)
    m.discard_to_zero(0, C + 1)
    assert allocs(m) == [{Z}, {D, Z}]
    assert expected(m, 0, C + 2) == bytes(C + 1) + b"\x88"


@pytest.mark.clause("access.discard-to-zero.frees")
def test_discard_to_zero_v3_without_backing_may_unallocate() -> None:
    m = FlatModel(C, V3)
    m.write(0, b"\x01" * C)
    m.discard_to_zero(0, C)
    assert allocs(m) == [{Z, B}]


@pytest.mark.clause("access.discard-to-zero.frees", "qcow2.zero.v2-none")
def test_discard_to_zero_v2_without_backing_unallocates() -> None:
    m = FlatModel(C, V2)
    m.write(0, b"\x01" * C)
    m.discard_to_zero(0, C)
    assert allocs(m) == [{B}]


@pytest.mark.clause("qcow2.zero.v2-none")
def test_discard_to_zero_v2_over_nonzero_backing_writes_zeroes() -> None:
    m = FlatModel(C, V2, backing(b"\x02" * C))
    m.discard_to_zero(0, C)
    assert allocs(m) == [{D}]
    assert expected(m, 0, C) == bytes(C)


# -- discard_to_any -------------------------------------------------------------------------


@pytest.mark.clause("access.discard-to-any.unspecified")
def test_discard_to_any_makes_range_unknown() -> None:
    m = FlatModel(2 * C, V3)
    m.write(0, b"\x03" * 2 * C)
    m.discard_to_any(100, C)
    data, known = m.read(0, 2 * C)
    assert known == b"\x01" * 100 + bytes(C) + b"\x01" * (C - 100)
    assert data[:100] == b"\x03" * 100
    assert allocs(m) == [ANY_ALLOC, ANY_ALLOC]
    # A later write makes its bytes known again and the cluster data.
    m.write(200, b"\x04" * 4)
    assert m.read(200, 4) == (b"\x04" * 4, b"\x01" * 4)
    assert m.allowed(0) == {D}


# -- discard_to_backing ---------------------------------------------------------------------


@pytest.mark.clause("access.discard-to-backing.visible", "access.discard-to-backing.partial-kept")
def test_discard_to_backing_whole_clusters_only() -> None:
    m = FlatModel(4 * C, V3, backing(b"\x05" * 4 * C))
    m.write(0, b"\x06" * 4 * C)
    m.discard_to_backing(C - 1, 2 * C + 2)  # clusters 1 and 2 whole; 0 and 3 touched
    assert allocs(m) == [{D}, {B}, {B}, {D}]
    assert expected(m, 0, 4 * C) == b"\x06" * C + b"\x05" * 2 * C + b"\x06" * C


@pytest.mark.clause("access.discard-to-backing.visible")
def test_discard_to_backing_without_backing_reads_zero() -> None:
    m = FlatModel(2 * C, V3)
    m.write(0, b"\x07" * 2 * C)
    m.discard_to_backing(0, 2 * C)
    assert allocs(m) == [{B}, {B}]
    assert expected(m, 0, 2 * C) == bytes(2 * C)


@pytest.mark.clause("access.discard-to-backing.visible")
def test_discard_to_backing_beyond_backing_end_reads_zero() -> None:
    m = FlatModel(2 * C, V3, backing(b"\x08" * C))
    m.write(0, b"\x09" * 2 * C)
    m.discard_to_backing(0, 2 * C)
    assert expected(m, 0, 2 * C) == b"\x08" * C + bytes(C)


def test_discard_to_backing_cut_short_last_cluster_may_go_either_way() -> None:
    traits = LayerTraits.qcow2(1024)
    m = FlatModel(1536, traits, backing(b"\x0a" * 1536))
    m.write(0, b"\x0a" * 100 + b"\x0b" * 1436)
    m.discard_to_backing(0, 1536)
    # Cluster 0 is whole; cluster 1 ([1024, 1536)) is cut short by the disk end: kept or
    # discarded.  Bytes where old and backing agree stay known.
    assert allocs(m) == [{B}, {D, B}]
    _data, known = m.read(1024, 512)
    assert known == bytes(512)
    assert expected(m, 0, 1024) == b"\x0a" * 1024


@pytest.mark.clause("raw.no-backing")
def test_raw_discard_to_backing_reads_zero() -> None:
    m = FlatModel(2 * C, LayerTraits.raw())
    m.write(0, b"\x0c" * 2 * C)
    m.discard_to_backing(10, 20)
    assert expected(m, 0, 40) == b"\x0c" * 10 + bytes(20) + b"\x0c" * 10
    assert allocs(m) == [{D}, {D}]


# -- resize ---------------------------------------------------------------------------------


@pytest.mark.clause("access.resize.shrink-discards", "access.resize.grow-none")
def test_shrink_then_grow_none_is_unknown() -> None:
    m = FlatModel(4 * C, V3)
    m.write(0, b"\x0d" * 4 * C)
    m.resize(2 * C)
    assert m.size == 2 * C
    assert allocs(m) == [{D}, {D}]
    m.resize(3 * C, PreallocateMode.NONE)
    _data, known = m.read(0, 3 * C)
    assert known == b"\x01" * 2 * C + bytes(C)
    assert allocs(m) == [{D}, {D}, ANY_ALLOC]


@pytest.mark.clause("access.resize.grow-zero")
def test_shrink_mid_cluster_then_grow_zero() -> None:
    traits = LayerTraits.qcow2(1024)
    m = FlatModel(4096, traits, backing(b"\x0e" * 4096))
    m.write(0, b"\x0f" * 4096)
    m.resize(1536)  # cluster 1 is cut short, its tail must not come back
    assert allocs(m) == [{D}, {D}]
    m.resize(3072, PreallocateMode.ZERO)
    assert expected(m, 0, 3072) == b"\x0f" * 1536 + bytes(1536)
    # Cluster 1 straddles the old end: data (tail zeroed) or zero; cluster 2 is new and the
    # backing is non-zero there, so it must hide it.
    assert allocs(m) == [{D}, {D, Z}, {D, Z}]


@pytest.mark.clause("access.resize.grow-zero")
def test_grow_zero_without_backing_may_leave_unallocated() -> None:
    m = FlatModel(C, V2)
    m.resize(3 * C, PreallocateMode.ZERO)
    assert allocs(m) == [{B}, {D, B}, {D, B}]
    assert expected(m, 0, 3 * C) == bytes(3 * C)


@pytest.mark.clause("raw.resize")
def test_raw_grow_and_shrink() -> None:
    m = FlatModel(C, LayerTraits.raw())
    m.write(0, b"\x10" * C)
    m.resize(2 * C, PreallocateMode.WRITE_DATA)
    assert expected(m, 0, 2 * C) == b"\x10" * C + bytes(C)
    m.resize(C // 2)
    m.resize(C, PreallocateMode.NONE)
    assert m.read(0, C)[1] == b"\x01" * (C // 2) + bytes(C // 2)
    assert allocs(m) == [{D}]


def test_snapshot_freezes_the_view() -> None:
    m = FlatModel(C, V3, backing(b"\x12" * C))
    m.write(0, b"\x13" * 4)
    snap = m.snapshot()
    m.write(0, b"\x14" * 4)
    assert snap.data[:5] == b"\x13" * 4 + b"\x12"


# -- helpers --------------------------------------------------------------------------------


def test_first_mismatch_ignores_unknown_bytes() -> None:
    exp = b"abcdef"
    assert first_mismatch(b"abcdef", exp, b"\x01" * 6) is None
    assert first_mismatch(b"abXdef", exp, b"\x01\x01\x00\x01\x01\x01") is None
    assert first_mismatch(b"abXdeY", exp, b"\x01\x01\x00\x01\x01\x01") == 5


def test_pattern_names_its_origin() -> None:
    data = pattern(7, 4096, 8)
    assert decode_word(data[:4]) == (7, 4096)
    assert decode_word(data[4:]) == (7, 4100)
    # Unaligned writes lay down the same bytes as an aligned one would.
    assert pattern(7, 4097, 6) == data[1:7]
    assert pattern(8, 4096, 8) != data
    assert b"\x00\x00\x00\x00" not in pattern(254, 0, 1 << 16)

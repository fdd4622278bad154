"""L1/L2 tables: index arithmetic and entry encoding (qcow2.txt, "Cluster mapping")."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyimago.reference import CorruptImageError, MemoryStorage, open_image
from pyimago.reference.qcow2.tables import (
    ClusterType,
    L1Entry,
    L2Entry,
    decode_l1_entry,
    decode_l2_entry,
    encode_l1_entry,
    encode_l2_entry,
    l1_index,
    l2_index,
    offset_in_cluster,
)
from pyimago_tests_reference_helpers import (
    KiB,
    MiB,
    get_u64,
    l2_entry_pos,
    make_image,
    put_u64,
    qemu_img,
)

cluster_bits = st.integers(9, 21)


@pytest.mark.clause("qcow2.l1.entry-layout", "qcow2.l2.entry-layout")
@given(cluster_bits, st.integers(0, (1 << 62) - 1))
def test_index_math(cb: int, offset: int) -> None:
    cluster_size = 1 << cb
    l2_entries = cluster_size // 8
    assert l2_index(offset, cb) == (offset // cluster_size) % l2_entries
    assert l1_index(offset, cb) == (offset // cluster_size) // l2_entries
    assert offset_in_cluster(offset, cb) == offset % cluster_size
    # Recompose the offset from its three parts.
    assert (
        (l1_index(offset, cb) * l2_entries + l2_index(offset, cb)) * cluster_size
        + offset_in_cluster(offset, cb)
    ) == offset


def test_index_examples() -> None:
    assert (l1_index(0, 16), l2_index(0, 16)) == (0, 0)
    assert (l1_index(512 * MiB - 1, 16), l2_index(512 * MiB - 1, 16)) == (0, 8191)
    assert (l1_index(512 * MiB, 16), l2_index(512 * MiB, 16)) == (1, 0)
    assert (l1_index(32 * KiB, 9), l2_index(32 * KiB, 9)) == (1, 0)


@st.composite
def l2_entries(draw: st.DrawFn) -> tuple[int, L2Entry]:
    cb = draw(cluster_bits)
    kind = draw(st.sampled_from(list(ClusterType)))
    if kind in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN):
        return cb, L2Entry(kind)
    if kind is ClusterType.COMPRESSED:
        shift = 62 - (cb - 8)
        host = draw(st.integers(0, (1 << shift) - 1))
        sectors = draw(st.integers(1, 1 << (62 - shift)))
        return cb, L2Entry(kind, host, False, sectors)
    host = draw(st.integers(1, (1 << (56 - cb)) - 1)) << cb
    return cb, L2Entry(kind, host, draw(st.booleans()))


@pytest.mark.clause("qcow2.l2.entry-layout", "qcow2.compressed.layout", "qcow2.zero.flag")
@given(l2_entries())
def test_l2_round_trip(case: tuple[int, L2Entry]) -> None:
    cb, entry = case
    raw = encode_l2_entry(entry, cb)
    assert 0 <= raw < 1 << 64
    assert decode_l2_entry(raw, cb) == entry


@pytest.mark.clause("qcow2.l2.entry-layout", "qcow2.zero.flag", "qcow2.l2.copied-flag")
@pytest.mark.parametrize("cb", range(9, 22))
def test_l2_bits(cb: int) -> None:
    host = 5 << cb
    assert encode_l2_entry(L2Entry(ClusterType.UNALLOCATED), cb) == 0
    assert encode_l2_entry(L2Entry(ClusterType.ZERO_PLAIN), cb) == 1
    assert encode_l2_entry(L2Entry(ClusterType.NORMAL, host, True), cb) == host | 1 << 63
    assert encode_l2_entry(L2Entry(ClusterType.NORMAL, host, False), cb) == host
    assert encode_l2_entry(L2Entry(ClusterType.ZERO_ALLOC, host, True), cb) == host | 1 << 63 | 1
    # The COPIED flag without a host offset still decodes as unallocated / plain zero.
    assert decode_l2_entry(1 << 63, cb).type is ClusterType.UNALLOCATED
    assert decode_l2_entry(1 << 63 | 1, cb).type is ClusterType.ZERO_PLAIN


@pytest.mark.clause("qcow2.compressed.layout")
@pytest.mark.parametrize("cb", range(9, 22))
def test_compressed_bit_layout(cb: int) -> None:
    """qcow2.txt: "x = 62 - (cluster_bits - 8)"; bits 0..x-1 host offset, x..61 the number
    of additional 512-byte sectors; bit 62 compressed; bit 63 always 0 for compressed."""
    x = 62 - (cb - 8)
    host = (1 << x) - 7  # the top bit of the offset field set, not sector-aligned
    extra = (1 << (62 - x)) - 1  # every bit of the sector-count field set
    raw = 1 << 62 | extra << x | host
    entry = decode_l2_entry(raw, cb)
    assert entry.type is ClusterType.COMPRESSED
    assert entry.host_offset == host
    assert entry.compressed_sectors == extra + 1
    assert entry.compressed_length == (extra + 1) * 512 - host % 512
    assert encode_l2_entry(entry, cb) == raw
    assert decode_l2_entry(1 << 62 | 1 << x | 1024, cb).compressed_sectors == 2
    # Bit 63 is not part of the descriptor.
    assert decode_l2_entry(1 << 63 | raw, cb) == entry


@pytest.mark.clause("qcow2.metadata.alignment", "qcow2.l2.entry-layout")
@pytest.mark.parametrize("cb", range(10, 22))
@pytest.mark.parametrize("zero", [0, 1])
def test_l2_misaligned_host_offset(cb: int, zero: int) -> None:
    raw = (3 << cb) + 512 | zero | 1 << 63
    with pytest.raises(CorruptImageError) as info:
        decode_l2_entry(raw, cb)
    assert hex((3 << cb) + 512) in str(info.value)


@pytest.mark.clause("qcow2.l1.entry-layout", "qcow2.metadata.alignment")
@given(cluster_bits, st.integers(0, (1 << 47) - 1), st.booleans())
def test_l1_round_trip(cb: int, cluster: int, copied: bool) -> None:
    host = (cluster << cb) & 0x00FFFFFFFFFFFE00
    entry = L1Entry(host, copied and host != 0)
    raw = encode_l1_entry(entry)
    assert decode_l1_entry(raw, 1 << cb) == entry
    if host:
        assert raw == host | (1 << 63 if copied else 0)
    else:
        assert raw == 0


@pytest.mark.clause("qcow2.metadata.alignment")
def test_l1_misaligned() -> None:
    with pytest.raises(CorruptImageError, match="0x10200"):
        decode_l1_entry(0x10200 | 1 << 63, 1 << 16)
    # Bits below 9 are reserved, not part of the offset: set, they are corruption.
    with pytest.raises(CorruptImageError, match="reserved"):
        decode_l1_entry(0x10000 | 0x1FF, 1 << 16)


@pytest.mark.clause("qcow2.metadata.alignment")
def test_misaligned_l2_entry_in_image() -> None:
    data = make_image(cluster_size=4 * KiB, writes=[(0, b"x" * 4096)])
    pos = l2_entry_pos(data, 0)
    put_u64(data, pos, get_u64(data, pos) + 512)
    with open_image(MemoryStorage(data), backing=None) as img:
        with pytest.raises(CorruptImageError, match="not aligned"):
            img.read(0, 1)
        with pytest.raises(CorruptImageError, match="not aligned"):
            img.get_mapping(0, 4096)


@pytest.mark.qemu
@pytest.mark.clause("qcow2.compressed.layout", "interop.qemu-read")
@pytest.mark.parametrize("cluster_size", [512, 64 * KiB, 2 * MiB])
def test_qemu_compressed_entries_decode(tmp_path: Path, cluster_size: int) -> None:
    """Entries QEMU writes for compressed clusters point at its compressed data."""
    raw = tmp_path / "in.raw"
    pattern = bytes(range(256)) * (cluster_size // 256) + b"\x00" * cluster_size
    raw.write_bytes(pattern * 2)
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size={cluster_size}", raw, path)
    data = path.read_bytes()
    cb = cluster_size.bit_length() - 1
    entry = decode_l2_entry(get_u64(data, l2_entry_pos(data, 0)), cb)
    assert entry.type is ClusterType.COMPRESSED
    assert entry.host_offset + entry.compressed_length <= len(data) + 511
    with open_image(path) as img:
        assert img.read(0, len(pattern) * 2) == pattern * 2

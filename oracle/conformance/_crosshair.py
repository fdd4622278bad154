"""CrossHair harnesses: reference and fast versions of each pure helper must agree.

Each ``check_*`` function is an assert harness (``crosshair check --analysis_kind=asserts``):
its leading ``assert`` lines are preconditions, the rest must hold for every input that meets
them.  Inputs are bounded (a few bytes of table data, realistic cluster sizes) so that each
condition is decided within CrossHair's per-condition budget.  ``CLAUSES`` names the spec
clauses each harness covers (the conformance report lists them).
"""

from __future__ import annotations

from pyimago.fast._codec import decode_refblock, decode_u64_table, encode_refblock
from pyimago.fast._header import parse_header as fast_parse_header
from pyimago.reference._errors import CorruptImageError, PyimagoError
from pyimago.reference.qcow2.header import QCowHeader, pack_header, parse_header
from pyimago.reference.qcow2.refcounts import get_block_entry, set_block_entry
from pyimago.reference.qcow2.tables import (
    ClusterType,
    decode_l2_entry,
    encode_l2_entry,
    l1_index,
    l2_index,
    offset_in_cluster,
    whole_clusters,
)

__all__ = ["CLAUSES"]

CLAUSES: dict[str, tuple[str, ...]] = {
    "check_index_math": ("qcow2.l1.index", "qcow2.l2.index"),
    "check_l2_entry_round_trip": ("qcow2.l2.entry-layout", "qcow2.compressed.layout"),
    "check_refblock_sub_byte": ("qcow2.refcount.sub-byte-order", "qcow2.refcount.entry-width"),
    "check_refblock_wide": ("qcow2.refcount.entry-width",),
    "check_u64_table": ("qcow2.l1.entry-layout", "qcow2.refcount.table-layout"),
    "check_header_round_trip": ("qcow2.header.magic", "qcow2.header.version",
                                "qcow2.header.cluster-bits"),
    "check_whole_clusters": ("access.discard-to-backing.partial-kept",),
}


def check_index_math(offset: int, cluster_bits: int) -> None:
    """l1_index / l2_index / offset_in_cluster recompose the offset."""
    assert 9 <= cluster_bits <= 21
    assert 0 <= offset < 2**64
    entries = (1 << cluster_bits) // 8
    recomposed = (
        (l1_index(offset, cluster_bits) * entries + l2_index(offset, cluster_bits))
        << cluster_bits
    ) + offset_in_cluster(offset, cluster_bits)
    assert recomposed == offset


def check_l2_entry_round_trip(raw: int, cluster_bits: int) -> None:
    """Decoding then encoding an L2 entry keeps its meaning."""
    assert 9 <= cluster_bits <= 21
    assert 0 <= raw < 2**64
    try:
        entry = decode_l2_entry(raw, cluster_bits)
    except CorruptImageError:
        return
    again = decode_l2_entry(encode_l2_entry(entry, cluster_bits), cluster_bits)
    assert again == entry
    if entry.type is ClusterType.NORMAL:
        assert entry.host_offset % (1 << cluster_bits) == 0


def check_refblock_sub_byte(data: bytes, order: int, index: int) -> None:
    """Sub-byte refcounts: reference entry access equals fast's bulk decode."""
    assert 0 <= order <= 2
    assert 1 <= len(data) <= 2
    assert 0 <= index < len(data) * (8 >> order)
    assert get_block_entry(data, index, order) == decode_refblock(data, 1 << order)[index]


def check_refblock_wide(data: bytes, order: int, index: int, value: int) -> None:
    """8..64-bit refcounts: a reference write is what fast decodes and re-encodes."""
    assert 3 <= order <= 6
    assert len(data) == 2 * (1 << order) // 8
    assert 0 <= index < 2
    assert 0 <= value < (1 << (1 << order))
    bits = 1 << order
    block = bytearray(data)
    set_block_entry(block, index, order, value)
    decoded = decode_refblock(bytes(block), bits)
    assert decoded[index] == value
    assert encode_refblock(decoded, bits) == bytes(block)


def check_u64_table(data: bytes) -> None:
    """Big-endian u64 tables: fast's array decode equals int.from_bytes per entry."""
    assert len(data) in (8, 16)
    table = decode_u64_table(data)
    for i in range(len(data) // 8):
        assert table[i] == int.from_bytes(data[8 * i : 8 * i + 8], "big")


def check_header_round_trip(cluster_bits: int, size_sectors: int, version: int) -> None:
    """A header the reference packs parses to the same fields in both implementations."""
    assert 9 <= cluster_bits <= 21
    assert 0 <= size_sectors < 2**20
    assert version in (2, 3)
    cs = 1 << cluster_bits
    size = size_sectors * 512
    per_l2 = (cs // 8) * cs
    l1_size = -(-size // per_l2)
    header = QCowHeader(
        version=version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=cluster_bits, size=size, crypt_method=0, l1_size=l1_size,
        l1_table_offset=3 * cs, refcount_table_offset=cs, refcount_table_clusters=1,
        nb_snapshots=0, snapshots_offset=0,
        header_length=112 if version == 3 else 72,
    )
    packed = pack_header(header).ljust(cs, b"\0")
    try:
        ours = parse_header(packed)
        theirs = fast_parse_header(packed, 4 * cs)
    except PyimagoError:
        raise AssertionError("a valid header was refused") from None
    assert ours == header
    assert (theirs.version, theirs.cluster_bits, theirs.size, theirs.l1_size) == (
        version, cluster_bits, size, l1_size)


def check_whole_clusters(offset: int, length: int, cluster_bits: int, disk_size: int) -> None:
    """The whole clusters of a range lie inside it (or end at the disk end) and are aligned."""
    assert 9 <= cluster_bits <= 12
    assert 0 <= offset <= disk_size < 2**20
    assert 0 <= length <= disk_size - offset
    cs = 1 << cluster_bits
    clusters = whole_clusters(offset, length, cluster_bits, disk_size)
    for start in clusters:
        assert start % cs == 0
        assert offset <= start
        assert start + cs <= offset + length or offset + length == disk_size

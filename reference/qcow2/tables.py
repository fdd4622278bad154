"""L1 and L2 tables: address arithmetic and entry encoding (qcow2.txt, "Cluster mapping").

"Given an offset into the virtual disk, the offset into the image file can be obtained as
follows:
    l2_entries = (cluster_size / sizeof(uint64_t))
    l2_index = (offset / cluster_size) % l2_entries
    l1_index = (offset / cluster_size) / l2_entries"
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .._errors import CorruptImageError
from .constants import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_COMPRESSED_OFFSET_SIZE_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    QCOW2_COMPRESSED_SECTOR_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
)

__all__ = [
    "UNALLOCATED",
    "ZERO_PLAIN",
    "ClusterType",
    "L1Entry",
    "L2Entry",
    "decode_l1_entry",
    "decode_l2_entry",
    "encode_l1_entry",
    "encode_l2_entry",
    "l1_index",
    "l2_index",
    "offset_in_cluster",
    "unpack_table",
    "whole_clusters",
]


def l1_index(offset: int, cluster_bits: int, entry_bytes: int = 8) -> int:
    """Index into the L1 table of the L2 table that maps guest ``offset`` (L2 entries of
    ``entry_bytes``: 16 with extended L2 entries).

    pre: 9 <= cluster_bits <= 21
    pre: entry_bytes in (8, 16)
    pre: 0 <= offset < 2 ** 64
    post: __return__ * ((1 << cluster_bits) // entry_bytes << cluster_bits) <= offset
    post: offset < (__return__ + 1) * ((1 << cluster_bits) // entry_bytes << cluster_bits)
    """
    return (offset >> cluster_bits) // ((1 << cluster_bits) // entry_bytes)


def l2_index(offset: int, cluster_bits: int, entry_bytes: int = 8) -> int:
    """Index into that L2 table of the entry that maps guest ``offset``.

    pre: 9 <= cluster_bits <= 21
    pre: entry_bytes in (8, 16)
    pre: 0 <= offset < 2 ** 64
    post: 0 <= __return__ < (1 << cluster_bits) // entry_bytes
    post: ((offset >> cluster_bits) - __return__) % ((1 << cluster_bits) // entry_bytes) == 0
    """
    return (offset >> cluster_bits) % ((1 << cluster_bits) // entry_bytes)


def offset_in_cluster(offset: int, cluster_bits: int) -> int:
    """Byte offset of guest ``offset`` inside its cluster.

    pre: 9 <= cluster_bits <= 21
    pre: 0 <= offset
    post: 0 <= __return__ < (1 << cluster_bits)
    post: (offset - __return__) % (1 << cluster_bits) == 0
    """
    return offset & ((1 << cluster_bits) - 1)


def whole_clusters(offset: int, length: int, cluster_bits: int, disk_size: int) -> range:
    """Guest offsets of the clusters wholly inside ``[offset, offset + length)``.

    The disk's last cluster, cut short by the disk end, counts as whole when the range
    reaches the disk end (nothing of it lies outside the range that the guest can see).

    pre: 9 <= cluster_bits <= 21
    pre: 0 <= offset <= disk_size
    pre: 0 <= length <= disk_size - offset
    post: all(c % (1 << cluster_bits) == 0 and c >= offset for c in __return__)
    post: offset+length == disk_size or all(c+2**cluster_bits <= offset+length for c in __return__)
    """
    cs = 1 << cluster_bits
    end = offset + length
    first = -(-offset // cs) * cs
    last = end if end == disk_size else end - end % cs
    return range(first, max(first, last), cs)


@dataclass(frozen=True, slots=True)
class L1Entry:
    """An L1 entry: where the L2 table is (0: none) and whether its refcount is exactly 1."""

    l2_offset: int
    copied: bool


def unpack_table(raw: bytes) -> list[int]:
    """The big-endian 64-bit words of an on-disk table (L1, L2, refcount table): "all
    numbers in qcow2 are stored in Big Endian byte order".  (One ``struct.unpack`` call: a
    2 MiB-cluster L2 table holds 262,144 words, and tables are read on every cache miss.)"""
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


def decode_l1_entry(raw: int, cluster_size: int) -> L1Entry:
    """qcow2.txt, "L1 table entry": bits 9-55 "Bits 9-55 of the offset into the image file at
    which the L2 table starts. Must be aligned to a cluster boundary."; bit 63 COPIED."""
    l2_offset = raw & L1E_OFFSET_MASK
    if raw & L1E_RESERVED_MASK:
        # qcow2.l2.reserved-bits: "Bits 0-8: Reserved (set to 0)"; "Bits 56-62: Reserved".
        raise CorruptImageError(f"qcow2 L1 entry 0x{raw:016x} has reserved bits set")
    if l2_offset % cluster_size:
        raise CorruptImageError(f"qcow2 L2 table offset 0x{l2_offset:x} is not cluster-aligned")
    return L1Entry(l2_offset, bool(raw & QCOW_OFLAG_COPIED))


def encode_l1_entry(entry: L1Entry) -> int:
    if not entry.l2_offset:
        return 0
    return entry.l2_offset | (QCOW_OFLAG_COPIED if entry.copied else 0)


class ClusterType(enum.Enum):
    """What an L2 entry says about its guest cluster (QEMU's QCow2ClusterType)."""

    UNALLOCATED = "unallocated"
    NORMAL = "normal"
    ZERO_PLAIN = "zero-plain"
    ZERO_ALLOC = "zero-alloc"
    COMPRESSED = "compressed"


@dataclass(frozen=True, slots=True)
class L2Entry:
    """A decoded L2 entry.

    ``host_offset`` is the host cluster for NORMAL/ZERO_ALLOC (0 otherwise), or the byte offset
    of the compressed data for COMPRESSED, whose length in 512-byte sectors (counting from the
    sector that holds ``host_offset``) is ``compressed_sectors``.
    """

    type: ClusterType
    host_offset: int = 0
    copied: bool = False
    compressed_sectors: int = 0

    @property
    def compressed_length(self) -> int:
        """Bytes of compressed data that may be read from ``host_offset``."""
        return (
            self.compressed_sectors * QCOW2_COMPRESSED_SECTOR_SIZE
            - self.host_offset % QCOW2_COMPRESSED_SECTOR_SIZE
        )


UNALLOCATED = L2Entry(ClusterType.UNALLOCATED)
ZERO_PLAIN = L2Entry(ClusterType.ZERO_PLAIN)


def _compressed_shift(cluster_bits: int) -> int:
    # qcow2.txt: "x = 62 - (cluster_bits - 8)"; bits 0..x-1 host offset, x..61 sector count.
    return 62 - (cluster_bits - 8)


def decode_l2_entry(
    raw: int, cluster_bits: int, *, extended: bool = False, data_file: bool = False
) -> L2Entry:
    """Decode an L2 entry; a standard cluster's misaligned host offset is corruption.

    ``extended``: the image has extended L2 entries, whose bit 0 is not a zero flag ("With
    version 2 or with extended L2 entries ... this is always 0"; QEMU ignores it).
    ``data_file``: the image has an external data file, where host offset 0 is a real
    cluster when COPIED is set (QEMU: "all clusters in external data files always have
    refcount 1, so we can rely on QCOW_OFLAG_COPIED to disambiguate").
    """
    if raw & QCOW_OFLAG_COMPRESSED:
        shift = _compressed_shift(cluster_bits)
        body = raw & L2E_COMPRESSED_OFFSET_SIZE_MASK
        host = body & ((1 << shift) - 1)
        # "Number of additional 512-byte sectors used for the compressed data, beyond the
        # sector containing the offset in the previous field."
        sectors = (body >> shift) + 1
        return L2Entry(ClusterType.COMPRESSED, host, False, sectors)
    host = raw & L2E_OFFSET_MASK
    copied = bool(raw & QCOW_OFLAG_COPIED)
    if raw & L2E_STD_RESERVED_MASK:
        # qcow2.l2.reserved-bits: bits 1-8 and 56-61 of a standard entry are reserved.
        raise CorruptImageError(f"qcow2 L2 entry 0x{raw:016x} has reserved bits set")
    if host % (1 << cluster_bits):
        raise CorruptImageError(
            f"qcow2 data cluster offset 0x{host:x} is not aligned to the cluster size"
        )
    if raw & QCOW_OFLAG_ZERO and not extended:
        if host:
            return L2Entry(ClusterType.ZERO_ALLOC, host, copied)
        return L2Entry(ClusterType.ZERO_PLAIN)
    if host or (data_file and copied):
        return L2Entry(ClusterType.NORMAL, host, copied)
    return UNALLOCATED


def encode_l2_entry(entry: L2Entry, cluster_bits: int) -> int:
    t = entry.type
    if t is ClusterType.UNALLOCATED:
        return 0
    if t is ClusterType.ZERO_PLAIN:
        return QCOW_OFLAG_ZERO
    if t is ClusterType.COMPRESSED:
        shift = _compressed_shift(cluster_bits)
        return QCOW_OFLAG_COMPRESSED | ((entry.compressed_sectors - 1) << shift) | entry.host_offset
    flags = QCOW_OFLAG_COPIED if entry.copied else 0
    if t is ClusterType.ZERO_ALLOC:
        flags |= QCOW_OFLAG_ZERO
    return entry.host_offset | flags

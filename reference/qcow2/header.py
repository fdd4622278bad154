"""The qcow2 header: parsing, validation and packing.

qcow2.txt, "Header": "The first cluster of a qcow2 image contains the file header".  All
numbers are big endian.  Field offsets are in :data:`FIELD_OFFSETS` so that updates can
rewrite one field in place, leaving header extensions exactly as they are.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from .._errors import CorruptImageError, UnsupportedFeatureError
from .constants import (
    BACKING_FILE_NAME_MAX,
    COMPRESSION_TYPES,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_EXTL2,
    QCOW_MAGIC,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    QCOW_MAX_SNAPSHOTS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
)

__all__ = [
    "FIELD_OFFSETS",
    "QCowHeader",
    "l2_entries",
    "pack_header",
    "parse_header",
    "required_l1_size",
]

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3_EXTRA = struct.Struct(">QQQII")

#: Byte offsets of the fields pyimago rewrites in place.
FIELD_OFFSETS = {
    "size": 24,
    "l1_size": 36,
    "l1_table_offset": 40,
    "refcount_table_offset": 48,
    "refcount_table_clusters": 56,
    "nb_snapshots": 60,
    "snapshots_offset": 64,
    "incompatible_features": 72,
    "compatible_features": 80,
    "autoclear_features": 88,
}


@dataclass(frozen=True, slots=True)
class QCowHeader:
    """A decoded qcow2 header (v2 headers read as v3 with the v3 fields' defaults)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        """Incompatible bit 4: L2 entries carry a subcluster bitmap."""
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        """Incompatible bit 2: guest data lives in an external data file."""
        return bool(self.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)

    @property
    def l2_entry_bytes(self) -> int:
        """qcow2.txt: "An extended L2 entry has 128 bits"; a standard one 64."""
        return 16 if self.extended_l2 else 8


def l2_entries(cluster_bits: int, entry_bytes: int = 8) -> int:
    """Entries per L2 table: one cluster of 8-byte entries (16 with extended L2 entries)."""
    return (1 << cluster_bits) // entry_bytes


def required_l1_size(size: int, cluster_bits: int, entry_bytes: int = 8) -> int:
    """L1 entries needed to map a disk of ``size`` bytes."""
    bytes_per_l2 = l2_entries(cluster_bits, entry_bytes) << cluster_bits
    return -(-size // bytes_per_l2)


def parse_header(data: bytes) -> QCowHeader:
    """Decode and validate the header in ``data`` (the image's first bytes).

    Raises CorruptImageError naming the offending field for malformed or hostile values,
    UnsupportedFeatureError for versions this implementation does not handle.
    """
    if len(data) < V2_HEADER_LENGTH:
        raise CorruptImageError(f"qcow2 header truncated: {len(data)} bytes < 72")
    fields = _V2.unpack_from(data, 0)
    magic, version = fields[0], fields[1]
    if magic != QCOW_MAGIC:
        raise CorruptImageError(f"not a qcow2 image: magic 0x{magic:08x} != 0x{QCOW_MAGIC:08x}")
    if version not in (2, 3):
        raise UnsupportedFeatureError(
            f"qcow2 version {version} is not supported (only 2 and 3)", feature=f"version {version}"
        )
    header = QCowHeader(version, *fields[2:])
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise CorruptImageError(f"qcow2 v3 header truncated: {len(data)} bytes < 104")
        incompat, compat, autoclear, refcount_order, header_length = _V3_EXTRA.unpack_from(
            data, V2_HEADER_LENGTH
        )
        # qcow2.txt: "header_length ... Length of the header structure in bytes. For version 2
        # images, the length is always assumed to be 72 bytes. For version 3 it's at least 104
        # bytes and must be a multiple of 8."
        if header_length < V3_HEADER_LENGTH or header_length % 8:
            raise CorruptImageError(
                f"qcow2 v3 header_length {header_length} is not a multiple of 8 >= 104"
            )
        compression_type = 0
        if header_length > V3_HEADER_LENGTH:
            if len(data) <= V3_HEADER_LENGTH:
                raise CorruptImageError("qcow2 header truncated before compression_type")
            compression_type = data[V3_HEADER_LENGTH]
        header = replace(
            header,
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
            compression_type=compression_type,
        )
    _validate(header)
    return header


def _validate(h: QCowHeader) -> None:
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImageError(
            f"qcow2 cluster_bits {h.cluster_bits} outside [{MIN_CLUSTER_BITS}, {MAX_CLUSTER_BITS}]"
        )
    cs = h.cluster_size
    if h.header_length > cs:
        raise CorruptImageError(f"qcow2 header_length {h.header_length} exceeds the cluster size")
    # qcow2.txt: "refcount_order ... Must not exceed 6 (i.e. refcount_bits = 64)."
    if h.refcount_order > 6:
        raise CorruptImageError(f"qcow2 refcount_order {h.refcount_order} > 6")
    if h.compression_type not in COMPRESSION_TYPES:
        raise UnsupportedFeatureError(
            f"qcow2 compression type {h.compression_type} is not supported",
            feature=f"compression type {h.compression_type}",
        )
    if h.backing_file_offset:
        if h.backing_file_size > BACKING_FILE_NAME_MAX:
            raise CorruptImageError(
                f"qcow2 backing file name length {h.backing_file_size} > {BACKING_FILE_NAME_MAX}"
            )
        if h.backing_file_offset + h.backing_file_size > cs:
            raise CorruptImageError(
                f"qcow2 backing file name at {h.backing_file_offset}+{h.backing_file_size} "
                "lies outside the header cluster"
            )
    if h.l1_size * 8 > QCOW_MAX_L1_SIZE:
        raise CorruptImageError(f"qcow2 l1_size {h.l1_size} exceeds QEMU's limit (32 MiB)")
    if h.l1_size < required_l1_size(h.size, h.cluster_bits, h.l2_entry_bytes):
        raise CorruptImageError(
            f"qcow2 l1_size {h.l1_size} too small for disk size {h.size}"
        )
    if h.l1_size and h.l1_table_offset % cs:
        raise CorruptImageError(
            f"qcow2 l1_table_offset 0x{h.l1_table_offset:x} is not cluster-aligned"
        )
    if h.refcount_table_offset % cs or h.refcount_table_offset == 0:
        raise CorruptImageError(
            f"qcow2 refcount_table_offset 0x{h.refcount_table_offset:x} is not a valid cluster"
        )
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > QCOW_MAX_REFTABLE_SIZE:
        raise CorruptImageError(
            f"qcow2 refcount_table_clusters {h.refcount_table_clusters} outside (0, 8 MiB]"
        )
    if h.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise CorruptImageError(f"qcow2 nb_snapshots {h.nb_snapshots} > {QCOW_MAX_SNAPSHOTS}")
    # qcow2.snapshots.table: "Offset into the image file at which the snapshot table
    # starts. Must be aligned to a cluster boundary."  QEMU validates it
    # even when nb_snapshots is 0 (qcow2_validate_table: "Snapshot table offset invalid").
    if h.snapshots_offset % cs:
        raise CorruptImageError(
            f"qcow2 snapshots_offset 0x{h.snapshots_offset:x} is not cluster-aligned"
        )


def pack_header(h: QCowHeader) -> bytes:
    """Encode ``h`` (without header extensions or the backing file name)."""
    out = _V2.pack(
        QCOW_MAGIC,
        h.version,
        h.backing_file_offset,
        h.backing_file_size,
        h.cluster_bits,
        h.size,
        h.crypt_method,
        h.l1_size,
        h.l1_table_offset,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.nb_snapshots,
        h.snapshots_offset,
    )
    if h.version == 2:
        return out
    out += _V3_EXTRA.pack(
        h.incompatible_features,
        h.compatible_features,
        h.autoclear_features,
        h.refcount_order,
        h.header_length,
    )
    if h.header_length > V3_HEADER_LENGTH:
        out += bytes([h.compression_type]) + bytes(h.header_length - V3_HEADER_LENGTH - 1)
    return out

"""What a qcow2 image's refcount structures look like, read straight from its bytes.

The machines count refcount blocks added and refcount tables moved over a session (how else
would a run show it reached refcount-table growth?); they read the header fields QEMU's
docs/interop/qcow2.txt names, independently of any implementation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["RefcountLayout", "refcount_layout"]

QCOW_MAGIC = b"QFI\xfb"
#: Header offsets (docs/interop/qcow2.txt, "Header").
CLUSTER_BITS_OFFSET = 20
REFCOUNT_TABLE_OFFSET_OFFSET = 48
REFCOUNT_TABLE_CLUSTERS_OFFSET = 56
#: A refcount table entry's offset bits (bits 9-63; 0-8 are reserved).
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00


@dataclass(frozen=True, slots=True)
class RefcountLayout:
    """Where the refcount table is and how many refcount blocks it points to."""

    table_offset: int
    table_clusters: int
    blocks: int


def refcount_layout(data: bytes) -> RefcountLayout | None:
    """The refcount layout of a qcow2 image's bytes (None: not qcow2, or a table that does
    not fit in the bytes)."""
    if len(data) < 64 or data[:4] != QCOW_MAGIC:
        return None
    (cluster_bits,) = struct.unpack_from(">I", data, CLUSTER_BITS_OFFSET)
    (table_offset,) = struct.unpack_from(">Q", data, REFCOUNT_TABLE_OFFSET_OFFSET)
    (clusters,) = struct.unpack_from(">I", data, REFCOUNT_TABLE_CLUSTERS_OFFSET)
    if not 9 <= cluster_bits <= 21:
        return None
    end = table_offset + (clusters << cluster_bits)
    if end > len(data):
        return None
    entries = struct.unpack_from(f">{(end - table_offset) // 8}Q", data, table_offset)
    blocks = sum(1 for e in entries if e & REFT_OFFSET_MASK)
    return RefcountLayout(table_offset, clusters, blocks)

"""Where the metadata of a qcow2 image lies, so that no write ever lands on it.

qcow2.corrupt.overlap-check: "Before any data or metadata write, the target range is checked
against every metadata structure: the header, the active L1 table, the refcount table and
blocks, active and inactive (snapshot) L2 tables, the snapshot table and snapshot L1 tables."

The structure names are QEMU's (block/qcow2.c, ``metadata_ol_names``), so that messages read
like ``qemu-io``'s "Preventing invalid write on metadata (overlaps with active L1 table)".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .._storage import Storage
from .constants import L1E_OFFSET_MASK, QCOW_MAX_L1_SIZE
from .snapshots import SnapshotEntry

__all__ = [
    "MetadataRegion",
    "first_overlap",
    "snapshot_regions",
]

HEADER = "qcow2_header"
ACTIVE_L1 = "active L1 table"
ACTIVE_L2 = "active L2 table"
REFCOUNT_TABLE = "refcount table"
REFCOUNT_BLOCK = "refcount block"
SNAPSHOT_TABLE = "snapshot table"
INACTIVE_L1 = "inactive L1 table"
INACTIVE_L2 = "inactive L2 table"


@dataclass(frozen=True, slots=True)
class MetadataRegion:
    """One metadata structure: its QEMU name and its byte range in the image file."""

    name: str
    offset: int
    length: int

    def overlaps(self, offset: int, length: int) -> bool:
        return self.offset < offset + length and offset < self.offset + self.length

    def __str__(self) -> str:
        return f"{self.name} at 0x{self.offset:x}+{self.length}"


def first_overlap(
    regions: Iterable[MetadataRegion], offset: int, length: int
) -> MetadataRegion | None:
    """The first region that ``[offset, offset + length)`` overlaps, if any."""
    for region in regions:
        if region.length and region.overlaps(offset, length):
            return region
    return None


def snapshot_regions(
    storage: Storage,
    cluster_size: int,
    snapshots_offset: int,
    table_length: int,
    snapshots: list[SnapshotEntry],
) -> Iterator[MetadataRegion]:
    """The snapshot table, the snapshots' L1 tables and their (inactive) L2 tables.

    Snapshot tables that are malformed (misaligned, oversized, outside the file) are left out
    here: QEMU opens such images, and check() reports them.
    """
    if table_length:
        yield MetadataRegion(SNAPSHOT_TABLE, snapshots_offset, table_length)
    file_size = storage.size()
    seen: set[int] = set()
    for sn in snapshots:
        length = sn.l1_size * 8
        if (
            not length
            or length > QCOW_MAX_L1_SIZE
            or sn.l1_table_offset % cluster_size
            or sn.l1_table_offset >= file_size
        ):
            continue
        yield MetadataRegion(INACTIVE_L1, sn.l1_table_offset, length)
        raw = storage.read(sn.l1_table_offset, length)
        for (entry,) in struct.iter_unpack(">Q", raw):
            l2 = entry & L1E_OFFSET_MASK
            if l2 and l2 not in seen and not l2 % cluster_size:
                seen.add(l2)
                yield MetadataRegion(INACTIVE_L2, l2, cluster_size)

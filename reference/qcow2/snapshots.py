"""The snapshot table (qcow2.txt, "Snapshots").

The reference implementation reads and writes only the active L1 table
(qcow2.snapshots.read-active), but the snapshots' tables are metadata all the same: writes
must never land on them (qcow2.corrupt.overlap-check) and check() counts their references.

"Snapshot table entry:
    Byte 0 -  7:    Offset into the image file at which the L1 table for the snapshot starts.
                    Must be aligned to a cluster boundary.
         8 - 11:    Number of entries in the L1 table of the snapshots
        12 - 13:    Length of the unique ID string describing the snapshot
        14 - 15:    Length of the name of the snapshot
        [...]
        36 - 39:    Size of extra data in the table entry [...]
        variable:   Extra data [...] Unique ID string [...] Name of the snapshot
        variable:   Padding to round up the snapshot table entry size to the next multiple
                    of 8."
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .._errors import CorruptImageError
from .._storage import Storage
from .constants import QCOW_MAX_SNAPSHOTS

__all__ = [
    "QCOW_MAX_SNAPSHOTS_SIZE",
    "QCOW_MAX_SNAPSHOT_EXTRA_DATA",
    "SnapshotEntry",
    "read_snapshot_table",
]

#: QEMU's limits (block/qcow2.h): extra data per entry, and the whole table.
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS

_ENTRY = struct.Struct(">QIHHIIQII")


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """What the driver and check() need of one snapshot: its name and its L1 table."""

    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int


def read_snapshot_table(
    storage: Storage, offset: int, count: int
) -> tuple[list[SnapshotEntry], int]:
    """The ``count`` entries of the table at ``offset``, and the table's length in bytes."""
    if not count:
        return [], 0
    entries: list[SnapshotEntry] = []
    pos = offset
    for i in range(count):
        head = storage.read(pos, _ENTRY.size)
        l1_offset, l1_size, id_len, name_len, _, _, _, _, extra = _ENTRY.unpack(head)
        if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise CorruptImageError(
                f"qcow2 snapshot {i} has {extra} bytes of extra data, more than QEMU's "
                f"limit of {QCOW_MAX_SNAPSHOT_EXTRA_DATA}"
            )
        strings = storage.read(pos + _ENTRY.size + extra, id_len + name_len)
        pos += _ENTRY.size + extra + id_len + name_len
        pos += -(pos - offset) % 8
        if pos - offset > QCOW_MAX_SNAPSHOTS_SIZE:
            raise CorruptImageError(
                f"qcow2 snapshot table at 0x{offset:x} is longer than QEMU's limit of "
                f"{QCOW_MAX_SNAPSHOTS_SIZE} bytes"
            )
        entries.append(SnapshotEntry(
            strings[:id_len].decode("utf-8", "replace"),
            strings[id_len:].decode("utf-8", "replace"),
            l1_offset,
            l1_size,
        ))
    return entries, pos - offset

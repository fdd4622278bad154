"""The snapshot table (qcow2.txt, "Snapshots").

The reference implementation writes only through the active L1 table
(qcow2.snapshots.read-active), but the snapshots' tables are metadata all the same: writes
must never land on them (qcow2.corrupt.overlap-check) and check() counts their references.
Snapshots are listed (qcow2.snapshots.list) and opened read-only (qcow2.snapshots.open).

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

from .._errors import CorruptImageError, InvalidRequestError
from .._snapshot import SnapshotInfo
from .._storage import Storage
from .constants import QCOW_MAX_SNAPSHOTS

__all__ = [
    "QCOW_MAX_SNAPSHOTS_SIZE",
    "QCOW_MAX_SNAPSHOT_EXTRA_DATA",
    "SnapshotEntry",
    "find_snapshot",
    "pack_snapshot_table",
    "read_snapshot_table",
]

#: QEMU's limits (block/qcow2.h): extra data per entry, and the whole table.
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS

_ENTRY = struct.Struct(">QIHHIIQII")
_EXTRA = struct.Struct(">QQq")  # entry bytes 40-47, 48-55, 56-63


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """What the driver and check() need of one snapshot: its name, its L1 table, and what
    ``qemu-img snapshot -l`` lists."""

    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int
    info: SnapshotInfo
    #: The entry's extra data as stored (qcow2.snapshots.extra-data: kept when the table
    #: is rewritten, the fields QEMU knows updated).
    extra_data: bytes = b""
    #: ID and name as stored, so that a rewrite keeps bytes that are not UTF-8.
    raw_id: bytes | None = None
    raw_name: bytes | None = None


def _info(sid: str, name: str, fixed: tuple[int, ...], extra: bytes, image_size: int
          ) -> SnapshotInfo:
    """The listed fields: "Byte 40 - 47: Size of the VM state in bytes. [...] If this field
    is present, the 32-bit value in bytes 32-35 is ignored."; "Byte 48 - 55: Virtual disk
    size of the snapshot in bytes" (older entries: the image's, as QEMU takes it); bytes
    56-63 the icount, -1 when it was disabled."""
    date_sec, date_nsec, vm_clock, vm_state = fixed
    padded = extra[: _EXTRA.size].ljust(_EXTRA.size, b"\0")
    vm_state64, disk_size, icount = _EXTRA.unpack(padded)
    return SnapshotInfo(
        sid,
        name,
        vm_state64 if len(extra) >= 8 else vm_state,
        date_sec,
        date_nsec,
        vm_clock,
        disk_size if len(extra) >= 16 else image_size,
        icount if len(extra) >= 24 and icount != -1 else None,
    )


def read_snapshot_table(
    storage: Storage, offset: int, count: int, *, image_size: int = 0
) -> tuple[list[SnapshotEntry], int]:
    """The ``count`` entries of the table at ``offset``, and the table's length in bytes."""
    if not count:
        return [], 0
    entries: list[SnapshotEntry] = []
    pos = offset
    for i in range(count):
        # "offset = ROUND_UP(offset, 8)" before each entry: the table's length (QEMU's
        # snapshots_size) has no padding after the last one.
        pos += -(pos - offset) % 8
        head = storage.read(pos, _ENTRY.size)
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra) = _ENTRY.unpack(head)
        if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise CorruptImageError(
                f"qcow2 snapshot {i} has {extra} bytes of extra data, more than QEMU's "
                f"limit of {QCOW_MAX_SNAPSHOT_EXTRA_DATA}"
            )
        extra_data = storage.read(pos + _ENTRY.size, extra)
        strings = storage.read(pos + _ENTRY.size + extra, id_len + name_len)
        pos += _ENTRY.size + extra + id_len + name_len
        if pos - offset > QCOW_MAX_SNAPSHOTS_SIZE:
            raise CorruptImageError(
                f"qcow2 snapshot table at 0x{offset:x} is longer than QEMU's limit of "
                f"{QCOW_MAX_SNAPSHOTS_SIZE} bytes"
            )
        sid = strings[:id_len].decode("utf-8", "replace")
        name = strings[id_len:].decode("utf-8", "replace")
        info = _info(sid, name, (date_sec, date_nsec, vm_clock, vm_state), extra_data,
                     image_size)
        entries.append(SnapshotEntry(sid, name, l1_offset, l1_size, info, extra_data,
                                     strings[:id_len], strings[id_len:]))
    return entries, pos - offset


def pack_snapshot_table(entries: list[SnapshotEntry]) -> bytes:
    """The snapshot table for ``entries``, as QEMU's qcow2_write_snapshots writes it.

    Every entry gets at least the 24 bytes of extra data QEMU knows (VM state size, disk
    size, icount: -1 where unknown); longer extra data keeps its unknown tail.  "If it
    doesn't fit in 32 bit, older implementations should treat it as a disk-only snapshot
    rather than truncate the VM state": the 32-bit VM state size is 0 then.
    """
    out = bytearray()
    for e in entries:
        info = e.info
        out += bytes(-len(out) % 8)
        sid = e.id_str.encode() if e.raw_id is None else e.raw_id
        name = e.name.encode() if e.raw_name is None else e.raw_name
        extra = _EXTRA.pack(info.vm_state_size, info.disk_size,
                            -1 if info.icount is None else info.icount)
        extra += e.extra_data[_EXTRA.size:]
        vm_state32 = info.vm_state_size if info.vm_state_size <= 0xFFFFFFFF else 0
        out += _ENTRY.pack(e.l1_table_offset, e.l1_size, len(sid), len(name), info.date_sec,
                           info.date_nsec, info.vm_clock_nsec, vm_state32, len(extra))
        out += extra + sid + name
    return bytes(out)


def find_snapshot(entries: list[SnapshotEntry], key: str) -> SnapshotEntry:
    """The snapshot whose ID is ``key``, else the first whose name is (QEMU's order for
    ``qemu-img convert -l``)."""
    for entry in entries:
        if entry.id_str == key:
            return entry
    for entry in entries:
        if entry.name == key:
            return entry
    names = ", ".join(f"{e.id_str}:{e.name}" for e in entries) or "none"
    raise InvalidRequestError(f"no snapshot with ID or name {key!r} (snapshots: {names})")

"""The qcow2 snapshot table (qcow2.txt, "Snapshots").

"Each snapshot is described by a header in the snapshot table ... The snapshot table
consists of entries of the following structure":  a 40-byte fixed part, extra data, the
unique ID string, the name, and padding to a multiple of 8.  pyimago reads the table; it
never rewrites it, so extra data it does not know is kept as it is on disk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .._errors import CorruptImageError, InvalidRequestError
from .._snapshot import SnapshotInfo
from .._storage import Storage
from .constants import QCOW_MAX_L1_SIZE

__all__ = [
    "QCOW_MAX_SNAPSHOTS_SIZE",
    "QCOW_MAX_SNAPSHOT_EXTRA_DATA",
    "SnapshotEntry",
    "find_snapshot",
    "parse_snapshot_table",
]

#: QEMU's limits (block/qcow2.h): they keep a hostile table from making us allocate without
#: bound.
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_SNAPSHOTS_SIZE = 64 << 20

_FIXED = struct.Struct(">QIHHIIQII")
_EXTRA_VM_STATE = struct.Struct(">Q")  # extra bytes 0-7 (entry bytes 40-47)
_EXTRA_DISK_SIZE = struct.Struct(">Q")  # extra bytes 8-15 (entry bytes 48-55)
_EXTRA_ICOUNT = struct.Struct(">q")  # extra bytes 16-23 (entry bytes 56-63)


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """A decoded snapshot table entry: the public info and where its L1 table is."""

    info: SnapshotInfo
    l1_table_offset: int
    l1_size: int


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


class _NeedMore(Exception):
    """The entry runs past the bytes read so far."""


def _decode_entry(
    raw: bytes, pos: int, index: int, image_size: int
) -> tuple[SnapshotEntry, int]:
    """The entry at ``raw[pos:]`` and the offset of the next one."""
    if pos + _FIXED.size > len(raw):
        raise _NeedMore
    (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock,
     vm_state_32, extra_len) = _FIXED.unpack_from(raw, pos)
    if extra_len > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
        raise CorruptImageError(
            f"qcow2 snapshot {index}: extra data size {extra_len} > "
            f"{QCOW_MAX_SNAPSHOT_EXTRA_DATA}"
        )
    extra_at = pos + _FIXED.size
    strings_at = extra_at + extra_len
    end = strings_at + id_len + name_len
    if end > len(raw):
        raise _NeedMore
    extra = raw[extra_at:strings_at]
    # "Byte 40 - 47: Size of the VM state in bytes. ... If this field is present, the 32-bit
    # value in bytes 32-35 is ignored."
    vm_state = (_EXTRA_VM_STATE.unpack_from(extra, 0)[0] if extra_len >= 8 else vm_state_32)
    # "Byte 48 - 55: Virtual disk size of the snapshot in bytes"; older entries take the
    # image's size, as QEMU does.
    disk_size = _EXTRA_DISK_SIZE.unpack_from(extra, 8)[0] if extra_len >= 16 else image_size
    # "Byte 56 - 63: icount value ... Set to -1 if icount was disabled"
    icount: int | None = None
    if extra_len >= 24:
        value = _EXTRA_ICOUNT.unpack_from(extra, 16)[0]
        icount = None if value == -1 else value
    sid = raw[strings_at : strings_at + id_len].decode("utf-8", "replace")
    name = raw[strings_at + id_len : end].decode("utf-8", "replace")
    if l1_size * 8 > QCOW_MAX_L1_SIZE:
        raise CorruptImageError(f"qcow2 snapshot {sid!r}: L1 table size {l1_size} too large")
    info = SnapshotInfo(sid, name, vm_state, date_sec, date_nsec, vm_clock, disk_size, icount)
    return SnapshotEntry(info, l1_offset, l1_size), pos + _pad8(end - pos)


def parse_snapshot_table(
    storage: Storage, offset: int, count: int, image_size: int
) -> list[SnapshotEntry]:
    """Read the ``count`` entries of the snapshot table at ``offset``.

    The table is read in growing pieces, so a hostile ``count`` costs no more memory than
    the file holds (and QEMU's 64 MiB cap on the table).
    """
    entries: list[SnapshotEntry] = []
    raw = b""
    pos = 0
    file_size = storage.size()
    for index in range(count):
        while True:
            try:
                entry, nxt = _decode_entry(raw, pos, index, image_size)
                break
            except _NeedMore:
                grow = max(4096, len(raw))
                if len(raw) >= QCOW_MAX_SNAPSHOTS_SIZE or offset + len(raw) >= file_size:
                    raise CorruptImageError(
                        f"qcow2 snapshot table entry {index} runs past the end of the "
                        f"{'file' if len(raw) < QCOW_MAX_SNAPSHOTS_SIZE else 'table (64 MiB)'}"
                    ) from None
                raw += storage.read(
                    offset + len(raw),
                    min(grow, QCOW_MAX_SNAPSHOTS_SIZE - len(raw), file_size - offset - len(raw)),
                )
        entries.append(entry)
        pos = nxt
    return entries


def find_snapshot(entries: list[SnapshotEntry], key: str) -> SnapshotEntry:
    """The snapshot whose ID is ``key``, else the first whose name is (QEMU's order for
    ``qemu-img convert -l``)."""
    for entry in entries:
        if entry.info.id == key:
            return entry
    for entry in entries:
        if entry.info.name == key:
            return entry
    names = ", ".join(f"{e.info.id}:{e.info.name}" for e in entries) or "none"
    raise InvalidRequestError(f"no snapshot with ID or name {key!r} (snapshots: {names})")

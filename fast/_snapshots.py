"""The qcow2 snapshot table, as far as pyimago.fast needs it: where each internal snapshot's
L1 table lies (for overlap checks, check() and opening a snapshot), what ``qemu-img snapshot
-l`` lists of it, and how long the table is.

Entry layout (qcow2.txt, "Snapshots"): l1_table_offset (8), l1_size (4), id_str_size (2),
name_size (2), date_sec (4), date_nsec (4), vm_clock_nsec (8), vm_state_size (4),
extra_data_size (4), extra data (vm_state_size 64-bit, disk size, icount), id string, name,
padding to a multiple of 8.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyimago.reference._errors import CorruptImageError, InvalidRequestError
from pyimago.reference._snapshot import SnapshotInfo

from ._header import Span

__all__ = ["SNAPSHOT_HEADER", "Snapshot", "pick", "read_snapshot_table"]

#: The fixed part of an entry, up to and including extra_data_size.
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
#: QEMU's bounds (QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE).
_MAX_EXTRA = 1024
_MAX_TABLE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One snapshot table entry: its L1 table (offset, entries), its names, and the rest of
    what is listed."""

    l1: Span
    id: str
    name: str
    info: SnapshotInfo


def _u(buf: bytes, at: int, width: int) -> int:
    return int.from_bytes(buf[at : at + width], "big")


def read_snapshot_table(
    read: Callable[[int, int], bytes], table: Span, file_size: int, disk_size: int = 0
) -> tuple[list[Snapshot], int]:
    """The ``table.n`` entries from ``table.at`` and the table's length in bytes;
    ``disk_size`` is the size of entries without that field (the image's)."""
    found: list[Snapshot] = []
    pos = table.at
    for i in range(table.n):
        raw = read(pos, SNAPSHOT_HEADER.size)
        if len(raw) < SNAPSHOT_HEADER.size or pos + SNAPSHOT_HEADER.size > file_size:
            raise CorruptImageError(
                f"qcow2: snapshot table entry {i} at 0x{pos:x} runs past the file end"
            )
        l1_at, l1_n, id_n, name_n, sec, nsec, clock, vm32, extra = SNAPSHOT_HEADER.unpack(raw)
        if extra > _MAX_EXTRA:
            raise CorruptImageError(
                f"qcow2: snapshot table entry {i} at 0x{pos:x} has {extra} bytes of extra data "
                f"(more than {_MAX_EXTRA})"
            )
        body = pos + SNAPSHOT_HEADER.size + extra
        more = read(pos + SNAPSHOT_HEADER.size, extra) if extra else b""
        names = read(body, id_n + name_n)
        end = body + id_n + name_n
        if len(names) < id_n + name_n or end > file_size:
            raise CorruptImageError(
                f"qcow2: snapshot table entry {i} at 0x{pos:x} runs past the file end"
            )
        sid = names[:id_n].decode("utf-8", "replace")
        name = names[id_n:].decode("utf-8", "replace")
        icount: int | None = None
        if extra >= 24:
            icount = int.from_bytes(more[16:24], "big", signed=True)
            icount = None if icount == -1 else icount  # -1: icount was disabled
        info = SnapshotInfo(
            sid, name, _u(more, 0, 8) if extra >= 8 else vm32, sec, nsec, clock,
            _u(more, 8, 8) if extra >= 16 else disk_size, icount,
        )
        found.append(Snapshot(Span(l1_at, l1_n), sid, name, info))
        pos = end + (-end % 8)
        if pos - table.at > _MAX_TABLE_BYTES:
            raise CorruptImageError(
                f"qcow2: the snapshot table at 0x{table.at:x} is larger than "
                f"{_MAX_TABLE_BYTES >> 20} MiB"
            )
    return found, pos - table.at


def pick(snapshots: list[Snapshot], key: str) -> Snapshot:
    """By ID first, then by name (the first that matches), as qemu-img does."""
    for s in snapshots:
        if s.id == key:
            return s
    for s in snapshots:
        if s.name == key:
            return s
    known = ", ".join(f"{s.id}:{s.name}" for s in snapshots) or "none"
    raise InvalidRequestError(f"qcow2: no snapshot with ID or name {key!r} (snapshots: {known})")

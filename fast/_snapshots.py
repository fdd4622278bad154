"""The qcow2 snapshot table, as far as pyimago.fast needs it: where each internal snapshot's
L1 table lies (for overlap checks and for check()), and how long the table is.

Entry layout (qcow2.txt, "Snapshots"): l1_table_offset (8), l1_size (4), id_str_size (2),
name_size (2), date_sec (4), date_nsec (4), vm_clock_nsec (8), vm_state_size (4),
extra_data_size (4), extra data, id string, name, padding to a multiple of 8.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyimago.reference._errors import CorruptImageError

from ._header import Span

__all__ = ["SNAPSHOT_HEADER", "Snapshot", "read_snapshot_table"]

#: The fixed part of an entry, up to and including extra_data_size.
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
#: QEMU's bounds (QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE).
_MAX_EXTRA = 1024
_MAX_TABLE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One snapshot table entry: its L1 table (offset, entries) and its names."""

    l1: Span
    id: str
    name: str


def read_snapshot_table(
    read: Callable[[int, int], bytes], table: Span, file_size: int
) -> tuple[list[Snapshot], int]:
    """The ``table.n`` entries from ``table.at`` and the table's length in bytes."""
    found: list[Snapshot] = []
    pos = table.at
    for i in range(table.n):
        raw = read(pos, SNAPSHOT_HEADER.size)
        if len(raw) < SNAPSHOT_HEADER.size or pos + SNAPSHOT_HEADER.size > file_size:
            raise CorruptImageError(
                f"qcow2: snapshot table entry {i} at 0x{pos:x} runs past the file end"
            )
        l1_at, l1_n, id_n, name_n, _, _, _, _, extra = SNAPSHOT_HEADER.unpack(raw)
        if extra > _MAX_EXTRA:
            raise CorruptImageError(
                f"qcow2: snapshot table entry {i} at 0x{pos:x} has {extra} bytes of extra data "
                f"(more than {_MAX_EXTRA})"
            )
        body = pos + SNAPSHOT_HEADER.size + extra
        names = read(body, id_n + name_n)
        end = body + id_n + name_n
        if len(names) < id_n + name_n or end > file_size:
            raise CorruptImageError(
                f"qcow2: snapshot table entry {i} at 0x{pos:x} runs past the file end"
            )
        found.append(Snapshot(
            Span(l1_at, l1_n),
            names[:id_n].decode("utf-8", "replace"),
            names[id_n:].decode("utf-8", "replace"),
        ))
        pos = end + (-end % 8)
        if pos - table.at > _MAX_TABLE_BYTES:
            raise CorruptImageError(
                f"qcow2: the snapshot table at 0x{table.at:x} is larger than "
                f"{_MAX_TABLE_BYTES >> 20} MiB"
            )
    return found, pos - table.at

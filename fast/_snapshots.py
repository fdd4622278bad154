"""Internal snapshots for pyimago.fast: the snapshot table, read once, and lookups in it.

Each table entry is a 40-byte head (L1 offset and size, ID and name lengths, date, guest
clock, 32-bit VM state size, extra data length), the extra data (64-bit VM state size, disk
size, icount), the ID, the name, and padding to 8 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyimago.reference._errors import CorruptImageError, InvalidRequestError
from pyimago.reference._snapshot import SnapshotInfo

__all__ = ["Snapshot", "pick", "read_table"]

#: QEMU's caps: extra data per entry, and the whole table.
_MAX_EXTRA = 1024
_MAX_TABLE = 64 << 20
_MAX_L1_ENTRIES = (32 << 20) // 8


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot and where its L1 table lies (``l1_at``, ``l1_n`` entries)."""

    info: SnapshotInfo
    l1_at: int
    l1_n: int


def _u(buf: bytes, at: int, width: int) -> int:
    return int.from_bytes(buf[at : at + width], "big")


def read_table(
    pread: Callable[[int, int], bytes], at: int, count: int, file_size: int, disk_size: int
) -> list[Snapshot]:
    """Decode ``count`` entries from ``at``; ``pread(offset, n)`` reads the file.

    The table is fetched in doubling windows, never past the file or QEMU's 64 MiB cap.
    """
    buf = b""
    out: list[Snapshot] = []
    pos = 0

    def need(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            room = min(file_size - at, _MAX_TABLE) - len(buf)
            if room <= 0:
                raise CorruptImageError(
                    f"qcow2: snapshot table entry {len(out)} runs past the end of the "
                    f"{'file' if file_size - at <= _MAX_TABLE else '64 MiB table cap'}"
                )
            buf += pread(at + len(buf), min(room, max(n - len(buf), len(buf), 4096)))

    for _ in range(count):
        need(pos + 40)
        extra_n = _u(buf, pos + 36, 4)
        if extra_n > _MAX_EXTRA:
            raise CorruptImageError(
                f"qcow2: snapshot entry {len(out)} has {extra_n} bytes of extra data "
                f"(at most {_MAX_EXTRA})"
            )
        id_n, name_n = _u(buf, pos + 12, 2), _u(buf, pos + 14, 2)
        stop = pos + 40 + extra_n + id_n + name_n
        need(stop)
        x = pos + 40
        vm_state = _u(buf, x, 8) if extra_n >= 8 else _u(buf, pos + 32, 4)
        size = _u(buf, x + 8, 8) if extra_n >= 16 else disk_size
        icount: int | None = None
        if extra_n >= 24:
            raw = int.from_bytes(buf[x + 16 : x + 24], "big", signed=True)
            icount = None if raw == -1 else raw  # -1: icount was disabled
        sid = buf[x + extra_n : x + extra_n + id_n].decode("utf-8", "replace")
        name = buf[x + extra_n + id_n : stop].decode("utf-8", "replace")
        l1_n = _u(buf, pos + 8, 4)
        if l1_n > _MAX_L1_ENTRIES:
            raise CorruptImageError(f"qcow2: snapshot {sid!r} has an L1 table of {l1_n} entries")
        info = SnapshotInfo(
            sid, name, vm_state, _u(buf, pos + 16, 4), _u(buf, pos + 20, 4),
            _u(buf, pos + 24, 8), size, icount,
        )
        out.append(Snapshot(info, _u(buf, pos, 8), l1_n))
        pos = (stop + 7) & ~7
    return out


def pick(snapshots: list[Snapshot], key: str) -> Snapshot:
    """By ID first, then by name (the first that matches), as qemu-img does."""
    by_id = {s.info.id: s for s in reversed(snapshots)}
    if key in by_id:
        return by_id[key]
    for s in snapshots:
        if s.info.name == key:
            return s
    known = ", ".join(f"{s.info.id}:{s.info.name}" for s in snapshots) or "none"
    raise InvalidRequestError(f"qcow2: no snapshot with ID or name {key!r} (snapshots: {known})")

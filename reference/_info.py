"""What ``FormatAccess.info()`` reports: the contract types of image information.

Both implementations return an :class:`ImageInfo` for one layer (the image itself, not its
backing chain); the fields mean what ``qemu-img info`` means by them (QEMU's ``ImageInfo``
and ``ImageInfoSpecificQCow2`` in qapi/block-core.json), so the image tools can print
qemu-img's JSON from either implementation alike.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ._errors import CorruptImageError

__all__ = ["ImageInfo", "Qcow2Info", "SnapshotInfo", "parse_snapshot_table"]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One internal snapshot, as ``qemu-img info`` lists it (``SnapshotInfo`` in QAPI)."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    #: None when the snapshot table entry has no icount (extra data shorter than 24 bytes).
    icount: int | None = None


@dataclass(frozen=True, slots=True)
class Qcow2Info:
    """qcow2 header facts (``format-specific`` data of ``qemu-img info``)."""

    compat: str
    refcount_bits: int
    lazy_refcounts: bool
    corrupt: bool
    extended_l2: bool
    compression_type: str


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """One image layer: format, virtual size and, for qcow2, its header facts."""

    format: str
    virtual_size: int
    cluster_size: int | None = None
    backing_file: str | None = None
    backing_format: str | None = None
    dirty: bool = False
    qcow2: Qcow2Info | None = None
    snapshots: tuple[SnapshotInfo, ...] = field(default=())


# -- qcow2 snapshot table (qcow2.txt, "Snapshots") ---------------------------------------------

_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
#: qcow2.txt: "Size of extra data in the table entry (used for future extensions)"; QEMU
#: refuses more than this (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
_MAX_EXTRA = 1024
_ICOUNT_END = 24
_VM_STATE_LARGE_END = 8


def parse_snapshot_table(
    read: Callable[[int, int], bytes], offset: int, count: int, file_size: int
) -> tuple[SnapshotInfo, ...]:
    """Decode ``count`` snapshot table entries starting at host ``offset``.

    ``read(offset, length)`` reads the image file.  Every entry must lie inside the file
    (``file_size``): a hostile table cannot make us read or allocate past it.
    """
    out: list[SnapshotInfo] = []
    pos = offset
    for index in range(count):
        if pos + _SNAPSHOT_HEADER.size > file_size:
            raise CorruptImageError(
                f"qcow2 snapshot table entry {index} at 0x{pos:x} runs past the file end"
            )
        (_l1, _l1n, id_len, name_len, date_sec, date_nsec, clock, vm_state, extra_len) = (
            _SNAPSHOT_HEADER.unpack(read(pos, _SNAPSHOT_HEADER.size))
        )
        if extra_len > _MAX_EXTRA:
            raise CorruptImageError(
                f"qcow2 snapshot {index}: extra data size {extra_len} > {_MAX_EXTRA}"
            )
        body = pos + _SNAPSHOT_HEADER.size
        end = body + extra_len + id_len + name_len
        if end > file_size:
            raise CorruptImageError(
                f"qcow2 snapshot table entry {index} at 0x{pos:x} runs past the file end"
            )
        blob = read(body, end - body)
        extra = blob[:extra_len]
        if extra_len >= _VM_STATE_LARGE_END:
            vm_state = int.from_bytes(extra[:8], "big")
        icount = int.from_bytes(extra[16:24], "big") if extra_len >= _ICOUNT_END else None
        if icount == (1 << 64) - 1:
            icount = None
        ident = blob[extra_len : extra_len + id_len].decode("utf-8", "replace")
        name = blob[extra_len + id_len :].decode("utf-8", "replace")
        out.append(SnapshotInfo(ident, name, vm_state, date_sec, date_nsec, clock, icount))
        # qcow2.txt: entries are "aligned to a multiple of 8 bytes".
        pos = end + (-end % 8)
    return tuple(out)

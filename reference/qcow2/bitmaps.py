"""The bitmaps extension on a writable open (specs/qcow2-extensions.toml,
qcow2.bitmaps.*).

pyimago keeps no dirty bitmaps.  A writable open does what QEMU's does before the first
write (qcow2_load_dirty_bitmaps): every bitmap of a consistent bitmaps extension is flagged
in use in its directory entry, written in place, and the autoclear bit stays -- the
extension stays consistent, each bitmap says it "may be inconsistent", and qemu-img check
keeps counting the bitmaps' clusters.  Unknown autoclear bits are cleared.

"Bitmaps extension: [...] Byte 0 - 3: nb_bitmaps [...] 8 - 15: bitmap_directory_size [...]
16 - 23: bitmap_directory_offset"; "Bitmap directory entry: Byte 0 - 7: bitmap_table_offset
[...] 8 - 11: bitmap_table_size [...] 12 - 15: flags: Bit 0: in_use [...] 18 - 19: name_size
[...] 20 - 23: extra_data_size [...] Padding to round up the bitmap directory entry size to
the next multiple of 8."
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .._errors import CorruptImageError
from .._storage import Storage
from .constants import (
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_EXT_MAGIC_BITMAPS,
)
from .extensions import HeaderExtension
from .header import QCowHeader

__all__ = [
    "BME_FLAG_IN_USE",
    "autoclear_for_writing",
    "bitmap_extension",
    "bitmap_flag_offsets",
    "bitmap_regions",
]

#: "Bit 0: in_use. The bitmap was not saved correctly and may be inconsistent."
BME_FLAG_IN_USE = 1 << 0
#: The autoclear bits QEMU knows (QCOW2_AUTOCLEAR_MASK): the rest is cleared.
QCOW2_AUTOCLEAR_MASK = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW
#: QEMU's limits (block/qcow2.h): QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS

#: "Bits 9 - 55: Host cluster offset" of a bitmap table entry.
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00

_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")


def bitmap_extension(header: QCowHeader, extensions: Sequence[HeaderExtension]
                     ) -> bytes | None:
    """The bitmaps extension's data where the autoclear bit says it is consistent."""
    if not header.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
        return None
    return next((e.data for e in extensions if e.type == QCOW2_EXT_MAGIC_BITMAPS), None)


def _directory(storage: Storage, cluster_size: int, ext: bytes
               ) -> tuple[int, bytes, list[tuple[int, int, int]]]:
    """The directory's offset, bytes, and ``(entry position, table offset, table size)``
    of each entry."""
    if len(ext) < _EXT.size:
        raise CorruptImageError(f"qcow2 bitmaps extension of {len(ext)} bytes is too short")
    nb, _, dir_size, dir_offset = _EXT.unpack_from(ext)
    if not 0 < nb <= QCOW2_MAX_BITMAPS or dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise CorruptImageError(
            f"qcow2 bitmaps extension: {nb} bitmaps in a directory of {dir_size} bytes "
            "exceed QEMU's limits"
        )
    if dir_offset % cluster_size or dir_offset + dir_size > storage.size():
        raise CorruptImageError(
            f"qcow2 bitmap directory at 0x{dir_offset:x} ({dir_size} bytes) is misaligned or "
            "runs past the end of the file"
        )
    directory = storage.read(dir_offset, dir_size)
    found: list[tuple[int, int, int]] = []
    pos = 0
    for i in range(nb):
        if pos + _ENTRY.size > dir_size:
            raise CorruptImageError(f"qcow2 bitmap directory entry {i} runs past the directory")
        table_offset, table_size, _, _, _, name_size, extra = _ENTRY.unpack_from(directory, pos)
        found.append((pos, table_offset, table_size))
        pos += _ENTRY.size + extra + name_size
        pos += -pos % 8
    if pos > dir_size:
        raise CorruptImageError("qcow2 bitmap directory entries run past the directory")
    return dir_offset, directory, found


def bitmap_flag_offsets(storage: Storage, cluster_size: int, ext: bytes
                        ) -> list[tuple[int, int]]:
    """``(file offset of the flags field, flags)`` of every bitmap directory entry;
    CorruptImageError where the extension or the directory is malformed (QEMU then refuses
    the image)."""
    dir_offset, directory, entries = _directory(storage, cluster_size, ext)
    return [(dir_offset + pos + 12, int.from_bytes(directory[pos + 12 : pos + 16], "big"))
            for pos, _, _ in entries]


def bitmap_regions(storage: Storage, cluster_size: int, ext: bytes) -> list[tuple[int, int]]:
    """``(offset, length)`` of every structure the bitmaps hold clusters with: the
    directory, each bitmap table, each bitmap data cluster (QEMU's
    qcow2_check_bitmaps_refcounts counts exactly these)."""
    dir_offset, directory, entries = _directory(storage, cluster_size, ext)
    regions = [(dir_offset, len(directory))]
    for _, table_offset, table_size in entries:
        if table_offset % cluster_size or table_size * 8 > QCOW2_MAX_BITMAP_DIRECTORY_SIZE * 8:
            raise CorruptImageError(
                f"qcow2 bitmap table at 0x{table_offset:x} ({table_size} entries) is "
                "misaligned or too large"
            )
        regions.append((table_offset, table_size * 8))
        for (entry,) in struct.iter_unpack(">Q", storage.read(table_offset, table_size * 8)):
            if entry & BME_TABLE_ENTRY_OFFSET_MASK:
                regions.append((entry & BME_TABLE_ENTRY_OFFSET_MASK, cluster_size))
    return regions


def autoclear_for_writing(storage: Storage, header: QCowHeader,
                          extensions: Sequence[HeaderExtension]) -> int:
    """Prepare the bitmaps for a writable open; return the autoclear field to write.

    qcow2.features.autoclear-clear: "An implementation may only write to an image with
    unknown auto-clear features if it clears the respective bits from this field first."
    qcow2.bitmaps.in-use: "If the bitmaps extension is present but this bit is unset, the
    bitmaps extension data must be considered inconsistent" -- so the bit stays, and each
    bitmap is flagged in use instead (each flag one 4-byte write, before any data write).
    """
    keep = header.autoclear_features & QCOW2_AUTOCLEAR_MASK
    if not header.has_data_file:
        # "This bit may only be set if the External Data File bit [...] is also set."
        keep &= ~QCOW2_AUTOCLEAR_DATA_FILE_RAW
    if not keep & QCOW2_AUTOCLEAR_BITMAPS:
        return keep
    ext = bitmap_extension(header, extensions)
    if ext is None:
        # "It is an error if this bit is set without the bitmaps extension present": a bit
        # that describes nothing goes.
        return keep & ~QCOW2_AUTOCLEAR_BITMAPS
    for offset, flags in bitmap_flag_offsets(storage, header.cluster_size, ext):
        if not flags & BME_FLAG_IN_USE:
            storage.write(struct.pack(">I", flags | BME_FLAG_IN_USE), offset)
    return keep

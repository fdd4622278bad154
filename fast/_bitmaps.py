"""The bitmaps extension for pyimago.fast: flag bitmaps in use on a writable open, and
find the clusters the bitmaps hold (specs/qcow2-extensions.toml, qcow2.bitmaps.in-use).

pyimago keeps no dirty bitmaps.  Like QEMU's writable open (qcow2_load_dirty_bitmaps),
every bitmap of a consistent bitmaps extension is flagged in use before the first write and
the autoclear bit stays: the extension stays consistent, each bitmap "may be inconsistent",
and qemu-img check keeps counting the bitmaps' clusters (qcow2_check_bitmaps_refcounts).

"Bitmaps extension: [...] Byte 0 - 3: nb_bitmaps [...] 8 - 15: bitmap_directory_size [...]
16 - 23: bitmap_directory_offset"; "Bitmap directory entry: Byte 0 - 7: bitmap_table_offset
[...] 8 - 11: bitmap_table_size [...] 12 - 15: flags: Bit 0: in_use [...] 18 - 19: name_size
[...] 20 - 23: extra_data_size [...] Padding to round up the bitmap directory entry size to
the next multiple of 8."
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyimago.reference._errors import CorruptImageError
from pyimago.reference._storage import Storage

from ._codec import decode_u64_table
from ._header import AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, EXT_BITMAPS, Extension, Header

__all__ = ["BME_FLAG_IN_USE", "Directory", "autoclear_for_writing", "read_directory"]

#: "Bit 0: in_use. The bitmap was not saved correctly and may be inconsistent."
BME_FLAG_IN_USE = 1
#: The autoclear bits QEMU knows (QCOW2_AUTOCLEAR_MASK); every other one is cleared.
_KNOWN_AUTOCLEAR = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW
#: QEMU's limits (block/qcow2.h): QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
_MAX_BITMAPS = 65535
_MAX_DIRECTORY = 1024 * _MAX_BITMAPS
#: "Bits 9 - 55: Host cluster offset" of a bitmap table entry.
_BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00

_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")


@dataclass(frozen=True, slots=True)
class Directory:
    """A bitmap directory: where it is, and each entry's position, table and flags."""

    at: int
    size: int
    #: ``(byte of the entry in the directory, table offset, table entries, flags)``
    entries: tuple[tuple[int, int, int, int], ...]

    def regions(self, storage: Storage, cluster_size: int) -> list[tuple[int, int]]:
        """``(offset, length)`` of the directory, each bitmap table and each bitmap data
        cluster: what qcow2_check_bitmaps_refcounts counts."""
        found = [(self.at, self.size)]
        for _, table, n, _ in self.entries:
            if table % cluster_size or n > _MAX_DIRECTORY or table + 8 * n > storage.size():
                raise CorruptImageError(
                    f"qcow2: bitmap table at 0x{table:x} ({n} entries) is misaligned, too "
                    "large or past the end of the file"
                )
            found.append((table, 8 * n))
            for e in decode_u64_table(storage.read(table, 8 * n)) if n else ():
                if e & _BME_OFFSET_MASK:
                    found.append((e & _BME_OFFSET_MASK, cluster_size))
        return found


def read_directory(storage: Storage, hdr: Header, exts: Sequence[Extension]
                   ) -> Directory | None:
    """The bitmap directory where the autoclear bit says the extension is consistent (None
    otherwise); CorruptImageError naming the value where it is malformed."""
    if hdr.version < 3 or not hdr.features.autoclear & AUTOCLEAR_BITMAPS:
        return None
    ext = next((e.data for e in exts if e.kind == EXT_BITMAPS), None)
    if ext is None:
        return None
    if len(ext) < _EXT.size:
        raise CorruptImageError(f"qcow2: bitmaps extension of {len(ext)} bytes is too short")
    nb, _, size, at = _EXT.unpack_from(ext)
    if not 0 < nb <= _MAX_BITMAPS or size > _MAX_DIRECTORY:
        raise CorruptImageError(
            f"qcow2: bitmaps extension: {nb} bitmaps in a directory of {size} bytes exceed "
            "QEMU's limits"
        )
    if at % hdr.cluster_size or at + size > storage.size():
        raise CorruptImageError(
            f"qcow2: bitmap directory at 0x{at:x} ({size} bytes) is misaligned or runs past "
            "the end of the file"
        )
    raw = storage.read(at, size)
    entries = []
    pos = 0
    for i in range(nb):
        if pos + _ENTRY.size > size:
            raise CorruptImageError(f"qcow2: bitmap directory entry {i} runs past the directory")
        table, n, flags, _, _, name_size, extra = _ENTRY.unpack_from(raw, pos)
        entries.append((pos, table, n, flags))
        pos += _ENTRY.size + extra + name_size
        pos += -pos % 8
    if pos > size:
        raise CorruptImageError("qcow2: bitmap directory entries run past the directory")
    return Directory(at, size, tuple(entries))


def autoclear_for_writing(storage: Storage, hdr: Header, exts: Sequence[Extension]) -> int:
    """Flag every bitmap in use (in place) and return the autoclear field a writable open
    keeps.

    qcow2.features.autoclear-clear: "An implementation may only write to an image with
    unknown auto-clear features if it clears the respective bits from this field first."
    qcow2.bitmaps.in-use: "If the bitmaps extension is present but this bit is unset, the
    bitmaps extension data must be considered inconsistent" -- so the bit stays and each
    bitmap is flagged in use instead (one 4-byte write each, before any data write).
    """
    keep = hdr.features.autoclear & _KNOWN_AUTOCLEAR
    if not hdr.has_data_file:
        # "This bit may only be set if the External Data File bit [...] is also set."
        keep &= ~AUTOCLEAR_DATA_FILE_RAW
    directory = read_directory(storage, hdr, exts)
    if directory is None:
        # "It is an error if this bit is set without the bitmaps extension present": a bit
        # that describes nothing goes.
        return keep & ~AUTOCLEAR_BITMAPS
    for pos, _, _, flags in directory.entries:
        if not flags & BME_FLAG_IN_USE:
            storage.write((flags | BME_FLAG_IN_USE).to_bytes(4, "big"), directory.at + pos + 12)
    return keep

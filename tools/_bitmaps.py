"""The persistent dirty bitmaps a qcow2 image lists (``qemu-img info``'s ``bitmaps``).

The FormatAccess API does not report bitmaps, so ``info`` reads their directory itself, as
QEMU's qcow2_read_bitmaps does: the bitmaps header extension, honoured only while the
autoclear "bitmaps" bit is set, names the directory; each entry gives flags, granularity and
name.  Only names and flags are read, never the bitmaps' data.

qcow2.txt, "Bitmaps extension": "The fields of the bitmaps extension are: 0 - 3: nb_bitmaps
[...] 8 - 15: bitmap_directory_size [...] 16 - 23: bitmap_directory_offset".
"""

from __future__ import annotations

import struct
from typing import Any

from pyimago.reference.qcow2.constants import (
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_EXT_MAGIC_BITMAPS,
    QCOW2_EXT_MAGIC_END,
    QCOW_MAGIC,
)

from ._common import ToolError

__all__ = ["read_bitmaps"]

#: block/qcow2-bitmap.c names.
_BME_FLAG_IN_USE = 1 << 0
_BME_FLAG_AUTO = 1 << 1
_QCOW2_MAX_BITMAPS = 65535
_QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * _QCOW2_MAX_BITMAPS
_V3_HEADER = struct.Struct(">4sI64x QQQ II")  # ... incompatible, compatible, autoclear, order, len
_EXT = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">I4xQQ")
_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, gran. bits, name, extra
_MAX_HEADER_BYTES = 1 << 20


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def read_bitmaps(path: str) -> list[dict[str, Any]]:
    """qemu-img info's ``bitmaps`` list of the qcow2 v3 image at ``path`` (empty: none)."""
    with open(path, "rb") as f:
        head = f.read(_MAX_HEADER_BYTES)
        if len(head) < _V3_HEADER.size or head[:4] != QCOW_MAGIC.to_bytes(4, "big"):
            return []
        _, version, _, _, autoclear, _, header_length = _V3_HEADER.unpack_from(head)
        if version < 3 or not autoclear & QCOW2_AUTOCLEAR_BITMAPS:
            # "bitmaps extension [...] ignored" without the autoclear bit (qcow2_do_open).
            return []
        ext = _find_extension(head, header_length, path)
        if ext is None:
            return []
        nb_bitmaps, dir_size, dir_offset = _BITMAPS_EXT.unpack(ext[: _BITMAPS_EXT.size])
        if nb_bitmaps > _QCOW2_MAX_BITMAPS or dir_size > _QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise ToolError(f"{path}: bitmap directory of {nb_bitmaps} bitmaps, {dir_size} "
                            "bytes: past QEMU's limits")
        f.seek(dir_offset)
        directory = f.read(dir_size)
    if len(directory) < dir_size:
        raise ToolError(f"{path}: the bitmap directory at 0x{dir_offset:x} runs past the end "
                        "of the file")
    return _entries(directory, nb_bitmaps, path)


def _find_extension(head: bytes, at: int, path: str) -> bytes | None:
    """The bitmaps extension's data among the header extensions from ``at``."""
    while at + _EXT.size <= len(head):
        kind, length = _EXT.unpack_from(head, at)
        if kind == QCOW2_EXT_MAGIC_END:
            return None
        data = head[at + _EXT.size : at + _EXT.size + length]
        if len(data) < length:
            break
        if kind == QCOW2_EXT_MAGIC_BITMAPS:
            if length < _BITMAPS_EXT.size:
                raise ToolError(f"{path}: bitmaps header extension of {length} bytes is short")
            return data
        at += _EXT.size + _round8(length)
    raise ToolError(f"{path}: the qcow2 header extensions run past the header")


def _entries(directory: bytes, count: int, path: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    at = 0
    for index in range(count):
        if at + _ENTRY.size > len(directory):
            raise ToolError(f"{path}: bitmap directory entry {index} runs past the directory")
        _, _, flags, _, granularity_bits, name_size, extra = _ENTRY.unpack_from(directory, at)
        name_at = at + _ENTRY.size + extra
        name = directory[name_at : name_at + name_size]
        if len(name) < name_size or granularity_bits > 63:
            raise ToolError(f"{path}: bitmap directory entry {index} is malformed")
        listed: list[str] = []
        # block/qcow2-bitmap.c get_bitmap_info_flags prepends: auto comes before in-use.
        if flags & _BME_FLAG_AUTO:
            listed.append("auto")
        if flags & _BME_FLAG_IN_USE:
            listed.append("in-use")
        out.append({"flags": listed, "name": name.decode("utf-8", "replace"),
                    "granularity": 1 << granularity_bits})
        at = _round8(name_at + name_size)
    return out

"""qcow2 header extensions (qcow2.txt, "Header extensions").

"Directly after the image header, optional sections called header extensions can be stored.
Each extension has a structure like the following: Byte 0 - 3: Header extension type ...
Byte 4 - 7: Length of the header extension data ... n - m: Padding to round up the header
extension size to the next multiple of 8."  Unknown extensions are kept as they are: pyimago
never rewrites the extension area of an existing image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .._errors import CorruptImageError
from .constants import (
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_END,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
)

__all__ = [
    "FEATURE_TYPE_AUTOCLEAR",
    "FEATURE_TYPE_COMPATIBLE",
    "FEATURE_TYPE_INCOMPATIBLE",
    "HeaderExtension",
    "backing_format",
    "feature_names",
    "pack_extensions",
    "pack_feature_table",
    "parse_extensions",
]

_EXT_HEADER = struct.Struct(">II")
_FEATURE_ENTRY = struct.Struct(">BB46s")

FEATURE_TYPE_INCOMPATIBLE = 0

_AT_MOST_ONCE = (QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_DATA_FILE)
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2


@dataclass(frozen=True, slots=True)
class HeaderExtension:
    """One header extension: its type magic and its data (without padding)."""

    type: int
    data: bytes


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def parse_extensions(cluster: bytes, start: int, end: int) -> list[HeaderExtension]:
    """Parse the extensions in ``cluster[start:end]`` up to the end marker.

    ``end`` is where the extension area must stop (the backing file name or the end of the
    header cluster).
    """
    exts: list[HeaderExtension] = []
    pos = start
    while True:
        if pos + _EXT_HEADER.size > end:
            # QEMU tolerates a missing end marker when the extensions fill the space.
            return exts
        ext_type, length = _EXT_HEADER.unpack_from(cluster, pos)
        if ext_type == QCOW2_EXT_MAGIC_END:
            return exts
        data_start = pos + _EXT_HEADER.size
        if data_start + length > end:
            raise CorruptImageError(
                f"qcow2 header extension 0x{ext_type:08x} at offset {pos} with length "
                f"{length} runs past offset {end}"
            )
        ext = HeaderExtension(ext_type, bytes(cluster[data_start : data_start + length]))
        if ext_type in _AT_MOST_ONCE and any(e.type == ext_type and e != ext for e in exts):
            # qcow2.extensions.at-most-once: "each header extension type shall appear at most
            # once in the same image"; two that disagree leave us no way to choose.
            raise CorruptImageError(
                f"qcow2 header extension 0x{ext_type:08x} appears twice with different data"
            )
        exts.append(ext)
        pos = data_start + _pad8(length)


def backing_format(exts: list[HeaderExtension]) -> str | None:
    """The backing-format extension's format name, if any."""
    for ext in exts:
        if ext.type == QCOW2_EXT_MAGIC_BACKING_FORMAT:
            try:
                return ext.data.decode("ascii")
            except UnicodeDecodeError as exc:
                raise CorruptImageError(
                    f"qcow2 backing format extension is not ASCII: {ext.data!r}"
                ) from exc
    return None


def feature_names(exts: list[HeaderExtension]) -> dict[tuple[int, int], str]:
    """``{(feature type, bit): name}`` from the feature name table extension."""
    names: dict[tuple[int, int], str] = {}
    for ext in exts:
        if ext.type != QCOW2_EXT_MAGIC_FEATURE_TABLE:
            continue
        for pos in range(0, len(ext.data) - _FEATURE_ENTRY.size + 1, _FEATURE_ENTRY.size):
            ftype, bit, raw = _FEATURE_ENTRY.unpack_from(ext.data, pos)
            names[(ftype, bit)] = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return names


def pack_feature_table(entries: list[tuple[int, int, str]]) -> bytes:
    """Encode feature name table entries ``(type, bit, name)``."""
    return b"".join(_FEATURE_ENTRY.pack(t, b, n.encode("ascii")) for t, b, n in entries)


def pack_extensions(exts: list[HeaderExtension]) -> bytes:
    """Encode extensions followed by the end marker."""
    out = bytearray()
    for ext in exts:
        out += _EXT_HEADER.pack(ext.type, len(ext.data)) + ext.data
        out += bytes(_pad8(len(ext.data)) - len(ext.data))
    out += _EXT_HEADER.pack(QCOW2_EXT_MAGIC_END, 0)
    return bytes(out)

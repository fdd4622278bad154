"""Mapping value objects: what a guest range resolves to.

``FormatAccess.get_mapping`` returns one of :class:`RawMapping`, :class:`ZeroMapping`,
:class:`EofMapping` or :class:`SpecialMapping`; ``get_shallow_mapping`` (and a driver's
``get_mapping``) may also return :class:`IndirectMapping`, a reference into another layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "EofMapping",
    "IndirectMapping",
    "Mapping",
    "RawMapping",
    "ShallowMapping",
    "SpecialMapping",
    "ZeroMapping",
]


@dataclass(frozen=True, slots=True)
class RawMapping:
    """The range is stored verbatim in ``storage`` at ``offset``.

    ``writable`` says whether writing to ``storage`` at ``offset`` changes the image's data
    in place; when false, a new mapping must be allocated first (``ensure_data_mapping``).
    """

    storage: Any
    offset: int
    writable: bool

    def __str__(self) -> str:
        return f"{self.storage}:0x{self.offset:x}/{'rw' if self.writable else 'ro'}"


@dataclass(frozen=True, slots=True)
class ZeroMapping:
    """The range reads as zeroes.

    ``explicit`` is true when the top layer records the zeroes itself (a qcow2 zero cluster),
    so no backing image can show through; false for unallocated ranges that read as zero.
    """

    explicit: bool

    def __str__(self) -> str:
        return f"<zero:{'explicit' if self.explicit else 'unallocated'}>"


@dataclass(frozen=True, slots=True)
class EofMapping:
    """The end of the disk: the accompanying length is always 0."""

    def __str__(self) -> str:
        return "<eof>"


@dataclass(frozen=True, slots=True)
class SpecialMapping:
    """Encoded data (e.g. a compressed cluster) that only ``layer`` can read.

    ``layer`` is the format layer (a FormatAccess) whose ``readv_special`` reads the data,
    ``offset`` the guest offset to pass to it.  A driver returns ``layer=None`` for itself.
    """

    layer: Any
    offset: int

    def __str__(self) -> str:
        return f"<special:{self.layer}:0x{self.offset:x}>"


@dataclass(frozen=True, slots=True)
class IndirectMapping:
    """The range is to be looked up in another layer (a backing image) at ``offset``.

    ``writable`` gates the writability of whatever the lower layer maps the range to.
    """

    layer: Any
    offset: int
    writable: bool

    def __str__(self) -> str:
        return f"<indirect:{self.layer}:0x{self.offset:x}/{'rw' if self.writable else 'ro'}>"


Mapping = RawMapping | ZeroMapping | EofMapping | SpecialMapping
ShallowMapping = RawMapping | ZeroMapping | EofMapping | SpecialMapping | IndirectMapping

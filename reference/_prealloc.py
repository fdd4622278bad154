"""Preallocation modes for growing an image."""

from __future__ import annotations

import enum

__all__ = ["PreallocateMode"]


class PreallocateMode(enum.Enum):
    """How the area added by a grow is prepared.

    NONE
        Nothing is done; the new area may read back as anything (a backing image may show
        through).
    ZERO
        The new area reads as zero and the backing must not show through; nothing needs to
        be allocated.
    FORMAT_ALLOCATE
        As ZERO, and the format's metadata is allocated for the new area.
    FULL_ALLOCATE
        As FORMAT_ALLOCATE, and storage is allocated for the data too.
    WRITE_DATA
        As FULL_ALLOCATE, and zeroes are actually written.
    """

    NONE = "none"
    ZERO = "zero"
    FORMAT_ALLOCATE = "format-allocate"
    FULL_ALLOCATE = "full-allocate"
    WRITE_DATA = "write-data"

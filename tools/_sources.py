"""The sources of ``convert``: one image, or several read as one disk, end to end.

qemu-img.c img_convert: "bs_sectors[bs_i] = blk_nb_sectors(s.src[bs_i])" and
"s.total_sectors += bs_sectors[bs_i]": each source counts in whole 512-byte sectors (a raw
file of 1,000,000 bytes is 1,000,448 bytes long to QEMU) and the output's disk is their sum;
the bytes a source's last partial sector adds read as zeroes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pyimago.reference import IndirectMapping, ZeroMapping

from ._map import block_status

__all__ = ["BACKING", "DATA", "ZERO", "Sources", "sector_span"]

DATA, ZERO, BACKING = "data", "zero", "backing"
_SECTOR = 512


def sector_span(size: int) -> int:
    """``size`` rounded up to whole sectors: the length QEMU gives a disk (blk_nb_sectors)."""
    return -(-size // _SECTOR) * _SECTOR


@dataclass(frozen=True, slots=True)
class _Part:
    image: Any
    path: str
    #: Where the image starts in the whole, its own size and its size in whole sectors.
    start: int
    size: int
    span: int


class Sources:
    """Open source images read as one disk: ``size``, ``read``, ``runs``."""

    def __init__(self, opened: Sequence[tuple[Any, str]]) -> None:
        parts: list[_Part] = []
        start = 0
        for image, path in opened:
            span = sector_span(image.size)
            parts.append(_Part(image, path, start, image.size, span))
            start += span
        self._parts = tuple(parts)
        #: The whole disk's length: the sum of the sources' lengths in whole sectors.
        self.size = start

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` of the whole (a read may cross sources)."""
        first = self._parts[0]
        if offset + length <= first.size:  # the common case: one source, no padding
            data: bytes = first.image.read(offset, length)
            return data
        out = bytearray(length)
        end = offset + length
        for part in self._parts:
            lo, hi = max(offset, part.start), min(end, part.start + part.size)
            if lo < hi:
                out[lo - offset : hi - offset] = part.image.read(lo - part.start, hi - lo)
        return bytes(out)

    def runs(self, top_only: bool) -> Iterator[tuple[int, int, str]]:
        """(offset, length, kind) over the whole: ``DATA`` to copy, ``ZERO``, or (with
        ``top_only``) ``BACKING``, left to the output's backing file."""
        for part in self._parts:
            kind = ZERO
            for offset, length, kind in _image_runs(part.image, part.path, top_only):
                yield part.start + offset, length, kind
            if part.span > part.size:
                # QEMU reads the last sector whole: after data, the padding is part of that
                # data sector (read as zeroes), never a hole a zero target would skip.
                yield part.start + part.size, part.span - part.size, DATA if kind == DATA else ZERO


def _image_runs(image: Any, path: str, top_only: bool) -> Iterator[tuple[int, int, str]]:
    if not top_only:
        for e in block_status(image, path):
            yield e.start, e.length, ZERO if e.zero else DATA
        return
    pos = 0
    while pos < image.size:
        mapping, n = image.get_shallow_mapping(pos, image.size - pos)
        if isinstance(mapping, IndirectMapping):
            kind = BACKING
        elif isinstance(mapping, ZeroMapping):
            kind = ZERO
        else:
            kind = DATA
        yield pos, n, kind
        pos += n

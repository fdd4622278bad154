"""``compare``: are two images' guest contents the same? (``qemu-img compare``)

Exit statuses are qemu-img's: 0 identical, 1 different (the first differing offset is
printed, rounded down to its 512-byte sector as qemu-img reports it), 2 an error.  Without
``strict``, images of different sizes are equal when the larger one's extra part reads as
zeroes; with it, a size difference or a different allocation status is a difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._common import Impl, open_chain
from ._map import MapEntry, block_status, chain_length

__all__ = ["CompareResult", "compare"]

_SECTOR = 512
#: Bytes read from each image at a time.
_CHUNK = 4 << 20


@dataclass(frozen=True, slots=True)
class CompareResult:
    """The verdict: ``identical``, else the first ``offset`` that differs and a message."""

    identical: bool
    messages: tuple[str, ...]
    offset: int | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1


def _ranges(a: Any, a_name: str, b: Any, b_name: str, end: int
            ) -> Iterator[tuple[int, int, MapEntry, MapEntry]]:
    """Common ranges of the two images' block status up to ``end``."""
    ia, ib = block_status(a, a_name, 0, end), block_status(b, b_name, 0, end)
    ea, eb = next(ia, None), next(ib, None)
    pos = 0
    while ea is not None and eb is not None:
        stop = min(ea.start + ea.length, eb.start + eb.length)
        yield pos, stop - pos, ea, eb
        pos = stop
        if ea.start + ea.length == stop:
            ea = next(ia, None)
        if eb.start + eb.length == stop:
            eb = next(ib, None)


def _reads_zero(e: MapEntry) -> bool:
    return e.zero


def _first_difference(a: Any, b: Any, offset: int, length: int) -> int | None:
    pos = offset
    while pos < offset + length:
        n = min(_CHUNK, offset + length - pos)
        da, db = a.read(pos, n), b.read(pos, n)
        if da != db:
            at = next(i for i in range(n) if da[i] != db[i])
            return pos + at
        pos += n
    return None


def _first_nonzero(image: Any, name: str, start: int, end: int) -> int | None:
    for entry in block_status(image, name, start, end):
        if _reads_zero(entry):
            continue
        pos = entry.start
        while pos < entry.start + entry.length:
            n = min(_CHUNK, entry.start + entry.length - pos)
            data = image.read(pos, n)
            stripped = data.lstrip(b"\0")
            if stripped:
                return pos + n - len(stripped)
            pos += n
    return None


def _status(e: MapEntry, size: int, layers: int) -> tuple[bool, bool, bool, bool, bool]:
    """What qemu-img compare -s compares: the block status flags of the whole chain
    (allocated, zero, data, offset valid, and EOF when the run reaches the disk end).

    block/io.c: a range that is unallocated above a backing file shorter than it "behave[s]
    as if [it was] allocated at this layer": not present in map's terms (the layer above
    answered), but allocated for the chain.
    """
    past_backing_end = not e.present and e.depth < layers - 1
    return (e.present or past_backing_end, e.zero, e.data, e.offset is not None,
            e.start + e.length == size)


def compare(
    path1: str,
    path2: str,
    *,
    fmt1: str | None = None,
    fmt2: str | None = None,
    strict: bool = False,
    impl: Impl = "fast",
    force_share: bool = False,
) -> CompareResult:
    """Compare the guest contents of two images as ``qemu-img compare`` does."""
    with (open_chain(path1, impl=impl, fmt=fmt1, force_share=force_share) as a,
          open_chain(path2, impl=impl, fmt=fmt2, force_share=force_share) as b):
        messages: list[str] = []
        if a.size != b.size and strict:
            return CompareResult(False, ("Strict mode: Image size mismatch!",))
        common = min(a.size, b.size)
        layers_a, layers_b = chain_length(a), chain_length(b)
        for offset, length, ea, eb in _ranges(a, path1, b, path2, common):
            if strict and _status(ea, a.size, layers_a) != _status(eb, b.size, layers_b):
                return CompareResult(
                    False, (*messages, f"Strict mode: Offset {offset} block status mismatch!"),
                    offset,
                )
            if _reads_zero(ea) and _reads_zero(eb):
                continue
            if _reads_zero(ea) or _reads_zero(eb):
                image, name = (b, path2) if _reads_zero(ea) else (a, path1)
                at = _first_nonzero(image, name, offset, offset + length)
            else:
                at = _first_difference(a, b, offset, length)
            if at is not None:
                return _mismatch(messages, at)
        if a.size != b.size:
            messages.append("Warning: Image size mismatch!")
            larger, name = (a, path1) if a.size > b.size else (b, path2)
            at = _first_nonzero(larger, name, common, larger.size)
            if at is not None:
                return _mismatch(messages, at)
        return CompareResult(True, (*messages, "Images are identical."))


def _mismatch(messages: list[str], at: int) -> CompareResult:
    sector = at - at % _SECTOR
    return CompareResult(False, (*messages, f"Content mismatch at offset {sector}!"), sector)

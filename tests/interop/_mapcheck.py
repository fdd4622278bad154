"""Comparing what pyimago reads and maps with what QEMU says (shared by the interop tests).

Loaded by path and registered as ``pyimago_tests_interop_mapcheck`` by ``conftest.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from pyimago.reference import (
    EofMapping,
    IndirectMapping,
    RawMapping,
    SpecialMapping,
    ZeroMapping,
)

__all__ = [
    "assert_deep_map_like_qemu",
    "assert_same_bytes",
    "assert_shallow_map_like_qemu",
    "check_tiling",
    "walk_shallow",
]


def assert_same_bytes(ours: bytes | bytearray, qemu: bytes, base: int, what: str) -> None:
    """Compare without pytest's diff of megabyte-long byte strings; name the first mismatch."""
    if ours == qemu:
        return
    if len(ours) != len(qemu):
        pytest.fail(f"{what}: we read {len(ours)} bytes at 0x{base:x}, qemu has {len(qemu)}")
    first = next(i for i in range(len(ours)) if ours[i] != qemu[i])
    last = next(i for i in range(len(ours) - 1, -1, -1) if ours[i] != qemu[i])
    pytest.fail(
        f"{what}: content differs at guest 0x{base + first:x}..0x{base + last:x} "
        f"(first bytes: ours {bytes(ours[first:first + 8]).hex()} "
        f"qemu {qemu[first:first + 8].hex()})"
    )


def walk_shallow(img: Any, offset: int, max_length: int) -> tuple[int, Any, int]:
    """Follow ``get_shallow_mapping`` down the chain: ``(depth, mapping, length)``.

    ``depth`` counts the ``IndirectMapping`` hops to the layer that decides the range.  Where
    a lower layer ends (``EofMapping`` below the top), the rest of the range is unallocated
    and QEMU attributes it to the layer above, whose backing is too short: so do we.
    """
    depth = 0
    layer: Any = img
    off = offset
    length = max_length
    while True:
        mapping, n = layer.get_shallow_mapping(off, length)
        if isinstance(mapping, EofMapping):
            if depth == 0:
                return 0, mapping, 0
            return depth - 1, mapping, length
        assert 0 < n <= length, f"get_shallow_mapping({off}, {length}) -> {mapping}, {n}"
        length = n
        if isinstance(mapping, IndirectMapping):
            layer = mapping.layer
            off = mapping.offset
            depth += 1
            continue
        return depth, mapping, length


def check_tiling(name: str, qmap: list[dict[str, Any]], size: int) -> None:
    """QEMU's map covers the disk without gaps."""
    pos = 0
    for e in qmap:
        assert e["start"] == pos, f"{name}: qemu map has a gap at 0x{pos:x}"
        pos += e["length"]
    assert pos == size, f"{name}: qemu map ends at 0x{pos:x}, disk at 0x{size:x}"


# QEMU's tolerances, and why:
# * ``zero`` is ignored wherever ``data`` is true: QEMU also asks the host file, so a data
#   cluster over a hole of a sparse file (preallocation=metadata) is ``data: true, zero: true``.
# * a raw layer is ``present`` everywhere, and QEMU calls its holes ``data: false, zero: true``:
#   we map raw files as raw data throughout (a hole is still storage), so there a RawMapping
#   (or a zero) is accepted, and the bytes themselves are checked by the read tests.
# * QEMU gives no host ``offset`` for compressed clusters: that is how we tell them apart,
#   and they must be SpecialMapping; every other data range must be RawMapping at QEMU's offset.


def assert_shallow_map_like_qemu(
    img: Any, qmap: list[dict[str, Any]], formats: list[str], name: str
) -> None:
    """Every range of ``qemu-img map`` maps the same in ``img`` (walked with
    :func:`walk_shallow`): depth, data at QEMU's host offset, zero, unallocated."""
    check_tiling(name, qmap, img.size)
    for e in qmap:
        start, end = e["start"], e["start"] + e["length"]
        pos = start
        while pos < end:
            depth, m, n = walk_shallow(img, pos, end - pos)
            where = f"{name}: guest 0x{pos:x}+0x{n:x}: ours {m!r} at depth {depth}; qemu {e}"
            assert n > 0, where
            assert depth == e["depth"], where
            if e["data"]:
                _assert_data(m, e, pos - start, where)
            elif e["present"]:
                if formats[depth] == "raw":
                    assert isinstance(m, RawMapping | ZeroMapping), where
                    if isinstance(m, RawMapping) and "offset" in e:
                        assert m.offset == e["offset"] + (pos - start), where
                else:
                    # a zero cluster, with or without a preallocated host cluster
                    assert isinstance(m, ZeroMapping) and m.explicit, where
            else:
                assert isinstance(m, EofMapping) or (
                    isinstance(m, ZeroMapping) and not m.explicit
                ), where
            pos += n


def _assert_data(m: Any, e: dict[str, Any], into: int, where: str) -> None:
    """A data range of QEMU's map: raw data at QEMU's host offset (``into`` bytes into the
    range), or compressed (QEMU gives no offset) and special."""
    if "offset" in e:
        assert isinstance(m, RawMapping), where
        assert m.offset == e["offset"] + into, where
    else:
        assert isinstance(m, SpecialMapping), where


def assert_deep_map_like_qemu(
    img: Any, qmap: list[dict[str, Any]], formats: list[str], name: str
) -> None:
    """Every range of ``qemu-img map`` maps the same through ``img.get_mapping`` (resolved
    through the chain): data at QEMU's host offset, zeros explicit only in the top layer."""
    check_tiling(name, qmap, img.size)
    for e in qmap:
        start, end = e["start"], e["start"] + e["length"]
        pos = start
        while pos < end:
            m, n = img.get_mapping(pos, end - pos)
            where = f"{name}: guest 0x{pos:x}+0x{n:x}: ours {m!r}; qemu {e}"
            assert 0 < n <= end - pos, where
            if e["data"]:
                _assert_data(m, e, pos - start, where)
            elif e["present"] and formats[e["depth"]] == "raw":
                assert isinstance(m, RawMapping) or m == ZeroMapping(False), where
            elif e["present"]:
                # explicit only where the top layer itself records the zeroes
                assert m == ZeroMapping(e["depth"] == 0), where
            else:
                assert m == ZeroMapping(False), where
            pos += n
    assert img.get_mapping(img.size, 4096) == (EofMapping(), 0)

"""Subcluster address math and QEMU's copy-on-write rule, as small pure functions.

An image with extended L2 entries splits each cluster into 32 subclusters, each allocated,
zero or unallocated through a bitmap word next to the L2 entry: bit x marks subcluster x
allocated, bit 32 + x marks it zero.  Images without extended L2 entries are described here
the same way with a single "subcluster" per cluster (the zero flag plays bit 32, a host
offset bit 0), so one write path serves both (see :mod:`._general`).
"""

from __future__ import annotations

import enum

__all__ = [
    "ALL_ALLOC",
    "ALL_ZERO",
    "SubType",
    "alloc_range",
    "cow_span",
    "sc_type",
    "zero_range",
]

#: QCOW_L2_BITMAP_ALL_ALLOC and QCOW_L2_BITMAP_ALL_ZEROES.
ALL_ALLOC = 0xFFFFFFFF
ALL_ZERO = ALL_ALLOC << 32


class SubType(enum.IntEnum):
    """QEMU's QCow2SubclusterType (block/qcow2.h), minus INVALID (refused before)."""

    NORMAL = 0
    COMPRESSED = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    UNALLOCATED_PLAIN = 4
    UNALLOCATED_ALLOC = 5


def alloc_range(first: int, stop: int) -> int:
    """QCOW_OFLAG_SUB_ALLOC_RANGE(first, stop): allocation bits of subclusters [first, stop)."""
    return ((1 << (stop - first)) - 1) << first


def zero_range(first: int, stop: int) -> int:
    """QCOW_OFLAG_SUB_ZERO_RANGE(first, stop): zero bits of subclusters [first, stop)."""
    return alloc_range(first, stop) << 32


def sc_type(has_host: bool, compressed: bool, bitmap: int, sc: int) -> SubType:
    """qcow2_get_subcluster_type for a bitmap already found valid."""
    if compressed:
        return SubType.COMPRESSED
    if bitmap >> (32 + sc) & 1:
        return SubType.ZERO_ALLOC if has_host else SubType.ZERO_PLAIN
    if bitmap >> sc & 1:
        return SubType.NORMAL
    return SubType.UNALLOCATED_ALLOC if has_host else SubType.UNALLOCATED_PLAIN


def _ctz32(x: int) -> int:
    return (x & -x).bit_length() - 1 if x else 32


def _clz32(x: int) -> int:
    return 32 - x.bit_length()


def cow_span(
    lo: int, hi: int, first: SubType, last: SubType, alloc: int, keep: bool,
    sub_bits: int, cluster_bits: int, nsub: int,
) -> tuple[int, int]:
    """The part of one cluster a write of ``[lo, hi)`` (offsets in the cluster) stores:
    the write itself and the copy-on-write regions around it, as QEMU's calculate_l2_meta
    computes them (``cow_start.offset``, ``cow_end.offset + cow_end.nb_bytes``).

    ``first``/``last`` are the types of the subclusters holding ``lo`` and ``hi - 1``,
    ``alloc`` the cluster's allocation bits, ``keep`` whether the host cluster is written
    in place (QEMU's keep_old).  Every subcluster the span touches ends up allocated.
    """
    sub = 1 << sub_bits
    cs = 1 << cluster_bits
    sc_lo = lo >> sub_bits
    sc_last = (hi - 1) >> sub_bits
    if keep:
        # "cow_start_from = cow_start_to" for a normal subcluster, else its start.
        start = lo if first is SubType.NORMAL else sc_lo << sub_bits
        end = hi if last is SubType.NORMAL else -(-hi // sub) * sub
        return start, end
    if first is SubType.COMPRESSED:
        start = 0
    elif first in (SubType.ZERO_PLAIN, SubType.UNALLOCATED_PLAIN):
        start = sc_lo << sub_bits
    else:
        # "Skip all leading zero and unallocated subclusters"
        start = min(sc_lo, _ctz32(alloc)) << sub_bits if nsub > 1 else 0
    if last is SubType.COMPRESSED:
        end = cs
    elif last in (SubType.ZERO_PLAIN, SubType.UNALLOCATED_PLAIN):
        end = -(-hi // sub) * sub
    else:
        # "Skip all trailing zero and unallocated subclusters"
        end = cs
        if nsub > 1:
            end -= min(nsub - sc_last - 1, _clz32(alloc)) << sub_bits
    return start, end

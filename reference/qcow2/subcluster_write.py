"""Writing images with extended L2 entries: which subclusters a write allocates and copies.

qcow2.txt, "Extended L2 Entries": "Subcluster Allocation Bitmap [...] Bits 0 - 31: Allocation
status (one bit per subcluster) 1: the subcluster is allocated. In this case the host cluster
offset field must contain a valid offset. 0: the subcluster is not allocated. [...] Bits 32 - 63:
Subcluster reads as zeros (one bit per subcluster) 1: the subcluster reads as zeros. In this
case the allocation status bit must be unset."

Small pure functions over one cluster, after QEMU's ``calculate_l2_meta`` and
``qcow2_alloc_cluster_link_l2`` (block/qcow2-cluster.c): the copy-on-write range of a write
and the bitmap that results from it.  The driver (``Qcow2Driver``) does the I/O.
"""

from __future__ import annotations

from .constants import QCOW_OFLAG_COPIED
from .subclusters import QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER, QCOW_L2_BITMAP_ALL_ALLOC
from .tables import ClusterType, L2Entry

__all__ = [
    "QCOW_L2_BITMAP_ALL_ZEROES",
    "encode_extended_entry",
    "sub_alloc_range",
    "sub_zero_range",
    "subcluster_cow_range",
    "written_bitmap",
    "zeroed_bitmap",
]

#: Every subcluster reads as zeros (QEMU's QCOW_L2_BITMAP_ALL_ZEROES).
QCOW_L2_BITMAP_ALL_ZEROES = QCOW_L2_BITMAP_ALL_ALLOC << 32


def sub_alloc_range(first: int, end: int) -> int:
    """The allocation bits of subclusters ``[first, end)`` (QCOW_OFLAG_SUB_ALLOC_RANGE).

    pre: 0 <= first <= end <= 32
    post: __return__ >> 32 == 0
    """
    return ((1 << end) - 1) & ~((1 << first) - 1)


def sub_zero_range(first: int, end: int) -> int:
    """The zero bits of subclusters ``[first, end)`` (QCOW_OFLAG_SUB_ZERO_RANGE).

    pre: 0 <= first <= end <= 32
    post: __return__ & 0xFFFFFFFF == 0
    """
    return sub_alloc_range(first, end) << 32


def written_bitmap(old_bitmap: int, first_sc: int, end_sc: int) -> int:
    """The bitmap after subclusters ``[first_sc, end_sc)`` were written (data or copy):
    allocated, and no longer zero (qcow2_alloc_cluster_link_l2).

    pre: 0 <= first_sc < end_sc <= 32
    post: (__return__ >> 32) & __return__ & 0xFFFFFFFF & sub_alloc_range(first_sc, end_sc) == 0
    """
    return (old_bitmap | sub_alloc_range(first_sc, end_sc)) & ~sub_zero_range(first_sc, end_sc)


def zeroed_bitmap(old_bitmap: int, first_sc: int, end_sc: int) -> int:
    """The bitmap after subclusters ``[first_sc, end_sc)`` were zeroed: zero, not allocated
    (QEMU's zero_l2_subclusters)."""
    return (old_bitmap | sub_zero_range(first_sc, end_sc)) & ~sub_alloc_range(first_sc, end_sc)


def _lowest_set(bits: int) -> int:
    """ctz32, 32 for no bit."""
    return (bits & -bits).bit_length() - 1 if bits else QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER


def _highest_set(bits: int) -> int:
    """Index of the highest set bit, -1 for none."""
    return bits.bit_length() - 1


def subcluster_cow_range(
    cluster: L2Entry,
    bitmap: int,
    start: int,
    end: int,
    sc_bits: int,
    *,
    keep_old: bool,
) -> tuple[int, int]:
    """The byte range ``[cow_from, cow_to)`` of one cluster that a write of ``[start, end)``
    (offsets in the cluster) makes allocated: the write plus what is copied around it.

    After ``calculate_l2_meta``: into a new host cluster (``keep_old`` False), the copy reaches
    back to the first allocated subcluster and on to the last one (all of a compressed
    cluster), so that the new cluster holds everything the old one did; into the cluster's own
    host cluster (``keep_old``), only the partial subclusters at both ends are completed.
    Subclusters outside the range keep their state.

    pre: 0 <= start < end <= (32 << sc_bits)
    post: __return__[0] <= start and end <= __return__[1]
    post: __return__[0] % (1 << sc_bits) == 0
    """
    sc_size = 1 << sc_bits
    first_sc = start >> sc_bits
    last_sc = (end - 1) >> sc_bits
    cow_from = first_sc << sc_bits
    cow_to = (last_sc + 1) << sc_bits
    if keep_old or cluster.type is not ClusterType.NORMAL:
        if cluster.type is ClusterType.COMPRESSED:
            # "Compressed clusters don't have subclusters": the whole cluster is rewritten.
            return 0, QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER * sc_size
        return cow_from, cow_to
    alloc = bitmap & QCOW_L2_BITMAP_ALL_ALLOC
    cow_from = min(first_sc, _lowest_set(alloc)) << sc_bits
    cow_to = (max(last_sc, _highest_set(alloc)) + 1) << sc_bits
    return cow_from, cow_to


def encode_extended_entry(entry: L2Entry, bitmap: int | None) -> tuple[int, int]:
    """The two words of an extended L2 entry for ``entry`` (a cluster-level value).

    "With [...] extended L2 entries [...] bit 0 [...] is always 0": zero clusters are
    expressed through the bitmap instead.  ``bitmap`` None takes the bitmap the entry's type
    implies: none allocated for UNALLOCATED and NORMAL (a preallocated cluster, as QEMU leaves
    it), all zero for ZERO_PLAIN and ZERO_ALLOC, 0 for COMPRESSED ("this field is not used").
    """
    t = entry.type
    copied = QCOW_OFLAG_COPIED if entry.copied else 0
    if t is ClusterType.UNALLOCATED:
        return 0, 0 if bitmap is None else bitmap
    if t is ClusterType.ZERO_PLAIN:
        return 0, QCOW_L2_BITMAP_ALL_ZEROES if bitmap is None else bitmap
    if t is ClusterType.ZERO_ALLOC:
        return entry.host_offset | copied, QCOW_L2_BITMAP_ALL_ZEROES if bitmap is None else bitmap
    if t is ClusterType.NORMAL:
        return entry.host_offset | copied, 0 if bitmap is None else bitmap
    raise AssertionError(f"compressed entries are encoded by encode_l2_entry, not {entry}")

"""Extended L2 entries: subclusters (qcow2.txt, "Extended L2 Entries").

"An extended L2 entry has 128 bits: Bit 0 - 63: Standard L2 entry; Bit 64 - 127: Subcluster
allocation bitmap.  Subclusters are 32 per cluster."  The type of one subcluster follows
from its cluster's type and two bits of the bitmap, as QEMU's ``qcow2_get_subcluster_type``
decides it; combinations the spec forbids are corruption.
"""

from __future__ import annotations

from .._errors import CorruptImageError
from .tables import ClusterType, L2Entry

__all__ = [
    "QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER",
    "QCOW_L2_BITMAP_ALL_ALLOC",
    "subcluster_entry",
]

QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32
QCOW_L2_BITMAP_ALL_ALLOC = (1 << 32) - 1


def _sub_alloc(sc: int) -> int:
    return 1 << sc


def _sub_zero(sc: int) -> int:
    return 1 << (32 + sc)


def subcluster_entry(
    cluster: L2Entry, bitmap: int, sc: int, subcluster_size: int, *, where: str
) -> L2Entry:
    """What subcluster ``sc`` of a cluster (L2 entry ``cluster``, bitmap ``bitmap``) is.

    The result is an :class:`L2Entry` for the subcluster alone: NORMAL with the subcluster's
    host offset, ZERO_ALLOC/ZERO_PLAIN, UNALLOCATED, or the cluster's COMPRESSED entry.
    ``where`` names the entry in error messages.
    """
    t = cluster.type
    if t is ClusterType.COMPRESSED:
        # "Compressed clusters don't have subclusters, so this field is not used."
        return cluster
    if t is ClusterType.NORMAL:
        # "Bits 32 - 63: Subcluster reads as zeros ... In this case the allocation status
        # bit must be unset."
        if (bitmap >> 32) & bitmap & QCOW_L2_BITMAP_ALL_ALLOC:
            raise CorruptImageError(
                f"qcow2 extended L2 entry {where}: bitmap 0x{bitmap:016x} marks a subcluster "
                "both allocated and zero"
            )
        if bitmap & _sub_zero(sc):
            return L2Entry(ClusterType.ZERO_ALLOC, cluster.host_offset, cluster.copied)
        if bitmap & _sub_alloc(sc):
            return L2Entry(
                ClusterType.NORMAL, cluster.host_offset + sc * subcluster_size, cluster.copied
            )
        return L2Entry(ClusterType.UNALLOCATED)
    # No host cluster.  "1: the subcluster is allocated. In this case the host cluster offset
    # field must contain a valid offset."
    if bitmap & QCOW_L2_BITMAP_ALL_ALLOC:
        raise CorruptImageError(
            f"qcow2 extended L2 entry {where}: bitmap 0x{bitmap:016x} marks subclusters "
            "allocated but the entry has no host cluster"
        )
    if bitmap & _sub_zero(sc):
        return L2Entry(ClusterType.ZERO_PLAIN)
    return L2Entry(ClusterType.UNALLOCATED)

"""Writing images with extended L2 entries: which subclusters a write allocates and copies.

qcow2.txt, "Extended L2 Entries": "Subcluster Allocation Bitmap [...] Bits 0 - 31: Allocation
status (one bit per subcluster) 1: the subcluster is allocated. In this case the host cluster
offset field must contain a valid offset. 0: the subcluster is not allocated. [...] Bits 32 - 63:
Subcluster reads as zeros (one bit per subcluster) 1: the subcluster reads as zeros. In this
case the allocation status bit must be unset."

Small pure functions over one cluster, after QEMU's ``calculate_l2_meta`` and
``qcow2_alloc_cluster_link_l2`` (block/qcow2-cluster.c): the copy-on-write range of a write
and the bitmap that results from it.  ``SubclusterWrites`` (a mixin of ``Qcow2Driver``) does
the I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from .._errors import CorruptImageError
from .._storage import Storage
from .constants import QCOW_OFLAG_COPIED
from .driver_state import DriverState
from .subclusters import QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER, QCOW_L2_BITMAP_ALL_ALLOC
from .tables import (
    UNALLOCATED,
    ZERO_PLAIN,
    ClusterType,
    L2Entry,
    offset_in_cluster,
    whole_clusters,
)

__all__ = [
    "QCOW_L2_BITMAP_ALL_ZEROES",
    "SubclusterWrites",
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




class SubclusterWrites(DriverState):
    """The qcow2 driver's write paths with extended L2 entries (qcow2.extended-l2.write,
    qcow2.extended-l2.clear).  A mixin of ``Qcow2Driver``."""

    def _guest_content(self, offset: int, length: int) -> bytes:
        """What the guest sees in ``[offset, offset + length)``, inside one cluster, read unit
        by unit (subclusters with extended L2 entries)."""
        parts = []
        unit = 1 << self._unit_bits
        end = offset + length
        while offset < end:
            n = min(unit - offset_in_cluster(offset, self._unit_bits), end - offset)
            entry = self._get_unit(offset)
            if entry.type is ClusterType.COMPRESSED:
                pos = offset_in_cluster(offset, self._cluster_bits)
                parts.append(self._read_compressed(entry)[pos : pos + n])
            elif entry.type is ClusterType.NORMAL:
                pos = offset_in_cluster(offset, self._unit_bits)
                parts.append(self.data_storage.read(entry.host_offset + pos, n))
            elif entry.type is ClusterType.UNALLOCATED and self._backing is not None:
                parts.append(self._backing.read(offset, n))
            else:
                parts.append(bytes(n))
            offset += n
        return b"".join(parts)

    def _ensure_subcluster_data(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        """ensure_data_mapping with extended L2 entries: allocation and copy-on-write per
        subcluster (qcow2.extended-l2.write)."""
        cs, sc_bits = self._cluster_size, self._unit_bits
        in_cluster = offset_in_cluster(offset, self._cluster_bits)
        chunk = min(length, cs - in_cluster)
        guest_cluster = offset - in_cluster
        first_sc, end_sc = in_cluster >> sc_bits, -(-(in_cluster + chunk) >> sc_bits)
        try:
            units = [self._get_unit(guest_cluster + (sc << sc_bits))
                     for sc in range(first_sc, end_sc)]
        except CorruptImageError as exc:
            # QEMU: "Invalid cluster entry found" marks the image corrupt on a write path.
            self._signal_corruption(str(exc))
        entry = self._get_l2_entry(guest_cluster)
        _, bitmap = self._raw_l2_entry(guest_cluster)
        storage = self.data_storage
        keep_old = entry.type is ClusterType.NORMAL and entry.copied
        if keep_old and all(u.type is ClusterType.NORMAL for u in units):
            # Every subcluster written is allocated in a cluster of ours: write in place.
            self._check_host_data(entry.host_offset)
            return storage, entry.host_offset + in_cluster, chunk
        cow_from, cow_to = subcluster_cow_range(
            entry, bitmap, in_cluster, in_cluster + chunk, sc_bits, keep_old=keep_old
        )
        cow_to = min(cow_to, self._data_cluster_end(guest_cluster))
        if keep_old:
            host = entry.host_offset
            self._check_host_data(host)
        else:
            host = self._allocate_data_cluster(guest_cluster)
        partial = in_cluster > cow_from or in_cluster + chunk < cow_to
        if partial or not overwrite:
            # The copy of what the guest sees now goes in one write, over the caller's range
            # too: the table on storage may still show these subclusters of our own cluster
            # as the data they held before (crash.power-cut, as for ZERO_ALLOC clusters).
            storage.write(self._guest_content(guest_cluster + cow_from, cow_to - cow_from),
                          host + cow_from)
        old_bitmap = 0 if entry.type is ClusterType.COMPRESSED else bitmap
        new_bitmap = written_bitmap(old_bitmap, cow_from >> sc_bits, -(-cow_to >> sc_bits))
        self._replace_entry(guest_cluster, L2Entry(ClusterType.NORMAL, host, True),
                            data_pending=True, bitmap=new_bitmap)
        return storage, host + in_cluster, chunk

    def _zero_subclusters(self, offset: int, length: int) -> tuple[int, int]:
        """qcow2.extended-l2.clear: write_zeroes.  Whole clusters get an all-zero bitmap
        (keeping their host cluster; a compressed one is freed), partial ones the zero bits of
        the whole subclusters in range (QEMU's zero_in_l2_slice and zero_l2_subclusters)."""

        def whole(old: L2Entry) -> L2Entry:
            if old.type is ClusterType.NORMAL:
                return L2Entry(ClusterType.ZERO_ALLOC, old.host_offset, old.copied)
            return ZERO_PLAIN

        return self._subcluster_apply(offset, length, whole, zeroed_bitmap)

    def _discard_subclusters(self, offset: int, length: int, *, full: bool) -> tuple[int, int]:
        """qcow2.extended-l2.clear: the discards.  Whole clusters lose their host cluster
        (``full``: entry and bitmap 0, the backing shows; else all zero bits); the whole
        subclusters of a partial cluster lose their allocation bit and, with ``full``, their
        zero bit too, or else get it (QEMU's discard_in_l2_slice and, since 9.1,
        discard_l2_subclusters)."""
        if full:
            return self._subcluster_apply(
                offset, length, lambda old: UNALLOCATED,
                lambda bitmap, first, end: bitmap & ~(sub_alloc_range(first, end)
                                                      | sub_zero_range(first, end)))
        return self._subcluster_apply(offset, length, lambda old: ZERO_PLAIN, zeroed_bitmap)

    def _subcluster_apply(
        self, offset: int, length: int, whole: Callable[[L2Entry], L2Entry],
        partial: Callable[[int, int, int], int],
    ) -> tuple[int, int]:
        """Change the entries of the whole subclusters in ``[offset, offset + length)``:
        ``whole(old)`` for a whole cluster, ``partial(bitmap, first_sc, end_sc)`` the bitmap of
        a partial one (a compressed one first becomes a normal cluster)."""
        sc_bits, cs = self._unit_bits, self._cluster_size
        units = whole_clusters(offset, min(offset + length, self._size) - offset, sc_bits,
                               self._size)
        if not units:
            return offset, 0
        pos, stop = units[0], min(units[-1] + (1 << sc_bits), offset + length, self._size)
        self._zero_raw_data(pos, stop - pos)
        done_from: int | None = None
        while pos < stop:
            guest_cluster = pos - offset_in_cluster(pos, self._cluster_bits)
            c_end = min(guest_cluster + cs, stop)
            entry = self._get_l2_entry(guest_cluster)
            if pos == guest_cluster and c_end in (guest_cluster + cs, self._size):
                self._replace_entry(guest_cluster, whole(entry))
            elif entry.type is ClusterType.COMPRESSED:
                # "Compressed clusters don't have subclusters": the cluster is first copied
                # uncompressed into a new host cluster, every subcluster allocated (as a write
                # into it does, qcow2.extended-l2.write), the data before the entry.
                host = self._allocate_data_cluster(guest_cluster)
                self.data_storage.write(self._read_compressed(entry), host)
                first_sc = offset_in_cluster(pos, self._cluster_bits) >> sc_bits
                end_sc = -(-(c_end - guest_cluster) >> sc_bits)
                self._replace_entry(
                    guest_cluster, L2Entry(ClusterType.NORMAL, host, True),
                    bitmap=partial(QCOW_L2_BITMAP_ALL_ALLOC, first_sc, end_sc))
            else:
                _, bitmap = self._raw_l2_entry(guest_cluster)
                first_sc = offset_in_cluster(pos, self._cluster_bits) >> sc_bits
                end_sc = -(-(c_end - guest_cluster) >> sc_bits)
                self._replace_entry(guest_cluster, entry,
                                    bitmap=partial(bitmap, first_sc, end_sc))
            if done_from is None:
                done_from = pos
            pos = c_end
        if done_from is None:
            return offset, 0
        return done_from, pos - done_from

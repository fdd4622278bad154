"""Resizing with the qcow2 driver: growing (with preallocation) and shrinking.

specs/access.toml (access.resize.*), qcow2.l1.growth, qcow2.data-file.resize and
crash.order.grow-size-last.  A mixin of ``Qcow2Driver``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from .._errors import InvalidRequestError, UnsupportedError
from .._prealloc import PreallocateMode
from .constants import L1E_OFFSET_MASK
from .driver_state import DriverState
from .header import required_l1_size
from .subcluster_write import QCOW_L2_BITMAP_ALL_ZEROES
from .subclusters import QCOW_L2_BITMAP_ALL_ALLOC
from .tables import UNALLOCATED, ZERO_PLAIN, ClusterType, L2Entry, l1_index

__all__ = ["Resize"]


class Resize(DriverState):
    """``resize_grow`` and ``resize_shrink`` of the qcow2 driver."""

    def _check_new_size(self, new_size: int) -> None:
        # qcow2.header.size-512: QEMU only handles qcow2 sizes in whole 512-byte sectors.
        if new_size % 512:
            raise InvalidRequestError(
                f"{self}: qcow2 disk size {new_size} is not a multiple of 512"
            )
        needed = required_l1_size(new_size, self._cluster_bits, self._entry_bytes)
        if needed * 8 > 0x2000000:
            raise InvalidRequestError(f"{self}: disk size {new_size} needs too large an L1 table")
        if self.header.version < 3 and self.header.nb_snapshots:
            # qcow2.snapshots.v2-no-resize: qcow2_co_truncate, "Can't resize a v2 image which
            # has snapshots".
            raise UnsupportedError(f"{self}: a v2 image with snapshots cannot be resized")

    def _grow_l1(self, new_l1_size: int) -> None:
        """qcow2.l1.growth: a new, larger L1 table is written, then the header switched to it,
        then the old one freed.

        qcow2.txt: "The L1 table has a variable size (stored in the header) and may use
        multiple clusters, however it must be contiguous in the image file."
        """
        entries = self._l1 + [0] * (new_l1_size - len(self._l1))
        new_offset = self._write_l1_copy(entries)
        old_offset, old_size = self._l1_offset, self._l1_size
        self._write_field("l1_size", ">IQ", new_l1_size, new_offset)
        self._l1_offset, self._l1_size = new_offset, new_l1_size
        self._l1 = entries
        self._free_l1(old_offset, old_size)

    def _write_l1_copy(self, entries: list[int]) -> int:
        """crash.order.new-structure-before-pointer: an L1 table holding ``entries`` written
        whole into newly allocated (counted) clusters, zeroes to the end of its last cluster,
        before any header points at it.  Returns its offset."""
        cs = self._cluster_size
        clusters = -(-len(entries) * 8 // cs)
        offset = self._allocator.allocate(clusters)
        padded = entries + [0] * (clusters * cs // 8 - len(entries))
        self._storage.write(struct.pack(f">{len(padded)}Q", *padded), offset)
        return offset

    def _free_l1(self, offset: int, l1_size: int) -> None:
        """The clusters of an L1 table the header no longer points at go (last)."""
        if l1_size:
            self._allocator.free(offset, -(-l1_size * 8 // self._cluster_size))

    def _set_size(self, new_size: int) -> None:
        self._write_field("size", ">Q", new_size)
        self._size = new_size

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        self._begin("resize_grow")
        self._check_new_size(new_size)
        old_size = self._size
        # access.resize.no-op: "If the current size is already `new_size` or greater, do
        # nothing."
        if new_size <= old_size:
            return
        if self._data_file_raw and prealloc is PreallocateMode.NONE:
            # qcow2.data-file.raw: as qemu-img, a raw data file is mapped whole
            # (preallocation=metadata), so that the tables read as the data file does.
            prealloc = PreallocateMode.FORMAT_ALLOCATE
        if self.header.has_data_file:
            # qcow2.data-file.resize: the data file grows with the disk (as QEMU grows it).
            self.data_storage.resize(new_size, prealloc if prealloc in (
                PreallocateMode.FULL_ALLOCATE, PreallocateMode.WRITE_DATA)
                else PreallocateMode.NONE)
        needed = required_l1_size(new_size, self._cluster_bits, self._entry_bytes)
        if needed > self._l1_size:
            self._grow_l1(needed)
        # crash.order.grow-size-last: "Growing prepares the whole new area first [...] and
        # writes the new size into the header last".  The new size holds in memory only, so
        # that the preparation may map clusters past the old end.
        self._size = new_size
        try:
            self._prepare_grown_area(old_size, new_size, prealloc)
            self._settle()
            self._l2.flush()
        except BaseException:
            self._size = old_size
            raise
        self._set_size(new_size)

    def _prepare_grown_area(self, old_size: int, new_size: int,
                            prealloc: PreallocateMode) -> None:
        if prealloc is PreallocateMode.NONE:
            return
        # access.resize.grow-zero: the partial cluster at the old end may hold stale data from
        # before a shrink; it is zeroed through the normal data path.
        cs = self._cluster_size
        head_end = min(-(-old_size // cs) * cs, new_size)
        if head_end > old_size and not self._reads_zero(old_size - old_size % cs, head_end):
            # With extended L2 entries only the subcluster the old end cuts is written; the
            # whole ones past it get their zero bits (QEMU's qcow2_co_truncate: "Use zero
            # clusters as much as we can"), so that a write's COW of a shared cluster does
            # not turn the old range's zero or unallocated subclusters into data.
            unit = 1 << self._unit_bits
            zero_from = min(-(-old_size // unit) * unit, head_end) if self._extended else head_end
            if zero_from > old_size and not self._reads_zero(old_size, zero_from):
                # A cut subcluster that reads zero already holds no stale bytes: it stays
                # as it is (QEMU's truncate writes nothing there, and preallocation links
                # the cluster without setting its allocation bits).
                self._zero_cut_unit(old_size, zero_from)
            if head_end > zero_from:
                self._zero_subclusters(zero_from, head_end - zero_from)
        whole = range(head_end, new_size, cs)
        if prealloc is PreallocateMode.ZERO:
            # access.resize.grow-zero: "Does not necessarily allocate data, but has to ensure
            # the new range will read back as zeroes (e.g. a backing file's contents must not
            # show through)."
            self._zero_new_clusters(whole)
        else:
            self._preallocate(whole, prealloc, self._preallocated_bitmap(old_size, prealloc))

    def _preallocated_bitmap(self, old_size: int, prealloc: PreallocateMode) -> int | None:
        """The subcluster bitmap of the clusters ``_preallocate`` maps (None: none allocated).

        access.resize.grow-format-allocate: "the new range reads zero and the backing never
        shows through".  A preallocated extended L2 entry leaves its subclusters unallocated
        (QEMU's preallocate_co links it with ``m->prealloc``), so that a backing longer than
        the old disk would show there.  QEMU's bdrv_co_truncate then truncates with
        BDRV_REQ_ZERO_WRITE ("we cannot leave it unallocated because then the backing file
        content would become visible"), and as it does the subclusters read zero: metadata
        preallocation ends with the zero bits set (qcow2_subcluster_zeroize), falloc/full with
        the allocation bits set over host clusters that read zero.  An external data file may
        hold stale bytes past the old end, so there only the zero bits are safe.
        """
        if not self._extended or self._backing is None or self._backing.size <= old_size:
            return None
        if prealloc is PreallocateMode.FORMAT_ALLOCATE or self.header.has_data_file:
            return QCOW_L2_BITMAP_ALL_ZEROES
        return QCOW_L2_BITMAP_ALL_ALLOC

    def _zero_cut_unit(self, old_size: int, end: int) -> None:
        """Write zeroes to ``[old_size, end)``, the rest of the unit the old end cuts.

        With extended L2 entries, the write's COW of a shared cluster copies every subcluster
        from the first allocated one (QEMU's calculate_l2_meta), so those of the old range
        that were zero or unallocated get that state back: a grow changes the old range's
        allocation only in the unit the old end cuts.
        """
        unit = 1 << self._unit_bits
        first = old_size - old_size % self._cluster_size
        before = [(u, self._get_unit(u).type)
                  for u in range(first, old_size - old_size % unit, unit)] if self._extended else []
        storage, host, n = self.ensure_data_mapping(old_size, end - old_size, True)
        storage.write_zeroes(host, n)
        for u, was in before:
            if self._get_unit(u).type is was:
                continue
            if was in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
                self._zero_subclusters(u, unit)
            elif was is ClusterType.UNALLOCATED:
                self._discard_subclusters(u, unit, full=True)

    def _reads_zero(self, start: int, end: int) -> bool:
        """Whether every unit meeting ``[start, end)`` is zero (or unallocated with no backing
        image), so that it reads zero whatever it held before a shrink."""
        unit_size = 1 << self._unit_bits
        for unit in range(start - start % unit_size, end, unit_size):
            t = self._get_unit(unit).type
            if t not in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC) and not (
                t is ClusterType.UNALLOCATED and self._backing is None
            ):
                return False
        return True

    def _zero_new_clusters(self, clusters: range) -> None:
        for guest in clusters:
            if self.header.version >= 3:
                self._replace_entry(guest, ZERO_PLAIN)
            elif self._backing is None:
                self._replace_entry(guest, UNALLOCATED)
            else:
                storage, host, n = self.ensure_data_mapping(guest, self._cluster_size, True)
                storage.write_zeroes(host, n)

    def _preallocate(self, clusters: range, prealloc: PreallocateMode,
                     bitmap: int | None = None) -> None:
        """Map every new cluster to a host cluster that reads as zero, as QEMU does for
        preallocation=metadata/falloc/full (plain data clusters, not zero clusters).

        access.resize.grow-format-allocate: "Do not write data, but ensure all blocks are
        mapped as data."  access.resize.grow-full-allocate: "Same as `FormatAllocate`, but
        also allocate all blocks on the underlying storage."
        """
        if not clusters:
            return
        cs = self._cluster_size
        if self.header.has_data_file:
            # qcow2.data-file.offsets: each cluster maps its own place in the data file,
            # which resize_grow extended (zeroes past its old end).
            for guest in clusters:
                self._replace_entry(guest, L2Entry(ClusterType.NORMAL, guest, True),
                                    bitmap=bitmap)
            return
        first_host = self._allocator.allocate(len(clusters))
        if first_host < self._storage.size():
            # Reused clusters may hold stale data; fresh ones past the end of the storage read
            # as zero once the storage is extended below.
            self._storage.write_zeroes(first_host, len(clusters) * cs)
        host_end = first_host + len(clusters) * cs
        if self._storage.size() < host_end:
            # FORMAT_ALLOCATE maps clusters without allocating them on storage (sparse).
            storage_mode = (
                PreallocateMode.NONE if prealloc is PreallocateMode.FORMAT_ALLOCATE else prealloc
            )
            self._storage.resize(host_end, storage_mode)
        for i, guest in enumerate(clusters):
            self._replace_entry(guest, L2Entry(ClusterType.NORMAL, first_host + i * cs, True),
                                bitmap=bitmap)

    def resize_shrink(self, new_size: int) -> None:
        self._begin("resize_shrink")
        self._check_new_size(new_size)
        if new_size >= self._size:
            return
        cs = self._cluster_size
        # access.resize.shrink-discards: "If `new_size` is smaller than the current size,
        # ignore both preallocation modes and discard the data after `new_size`."  Clusters
        # wholly past the new end are freed.
        first_gone = -(-new_size // cs) * cs
        for guest in self._mapped_clusters(first_gone, self._size):
            if self._extended or self._get_l2_entry(guest).type is not ClusterType.UNALLOCATED:
                self._replace_entry(guest, UNALLOCATED)
        # L2 tables wholly past the new end are unhooked and freed, as QEMU does.
        keep = required_l1_size(new_size, self._cluster_bits, self._entry_bytes)
        for l1_idx in range(keep, self._l1_size):
            l2_offset = self._l1[l1_idx] & L1E_OFFSET_MASK
            if l2_offset:
                self._set_l1_entry(l1_idx, 0)
                self._l2.drop(l2_offset)
                self._allocator.free(l2_offset)
        self._set_size(new_size)
        if self.header.has_data_file:
            # qcow2.data-file.resize: the data file shrinks with the disk, after the tables
            # stopped mapping what it loses (as QEMU shrinks it).
            self._settle()
            self._l2.flush()
            self.data_storage.resize(new_size)

    def _mapped_clusters(self, start: int, end: int) -> Iterator[int]:
        """Guest cluster offsets in [start, end) whose L1 entry has an L2 table."""
        cs = self._cluster_size
        per_table = self._l2_entries * cs
        guest = start
        while guest < end:
            l1_idx = l1_index(guest, self._cluster_bits)
            table_end = (l1_idx + 1) * per_table
            if l1_idx < self._l1_size and self._l1[l1_idx] & L1E_OFFSET_MASK:
                yield from range(guest, min(end, table_end), cs)
            guest = table_end


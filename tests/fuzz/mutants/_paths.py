"""Mutants of the reference's write, mapping, refcount, cache and crash paths (issue 9's
unseen batch: written by a reviewer who had not seen the oracle's own mutants).

Each overrides one small piece of ``Qcow2Driver`` (or of a helper it owns: the L2 cache,
the refcount table, the allocator, swapped in by ``_mutate``), the way a real bug would
look.  They run on the machines' own chains (every refcount width, refcount-table growth,
compressed clusters, files checked by ``qemu-img``) and with the power-cut rule on: see
``reference_path_target``.
"""

from __future__ import annotations

import struct
from typing import Any

from pyimago.oracle.targets import ImplementationTarget
from pyimago.reference import FileStorage, FormatAccess, Qcow2Driver, create_image, open_image
from pyimago.reference.qcow2.allocation import ClusterAllocator
from pyimago.reference.qcow2.l2cache import L2Cache
from pyimago.reference.qcow2.refcounts import RefcountTable
from pyimago.reference.qcow2.tables import ClusterType, L2Entry

__all__ = ["reference_path_target"]


# -- write and mapping paths ----------------------------------------------------------------


class ZeroAllocReusedUnzeroed(Qcow2Driver):
    """A partial write into a zero cluster that kept its host cluster (write_zeroes over
    data) reuses the host cluster without zeroing the rest of it: the old data shows around
    the write."""

    def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> Any:
        entry = self._get_unit(offset) if not self._extended and offset < self._size else None
        if entry is not None and entry.type is ClusterType.ZERO_ALLOC and entry.copied:
            in_cluster = offset % self._cluster_size
            chunk = min(length, self._cluster_size - in_cluster)
            self._replace_entry(offset - in_cluster,
                                L2Entry(ClusterType.NORMAL, entry.host_offset, True),
                                data_pending=True)
            return self.data_storage, entry.host_offset + in_cluster, chunk
        return super().ensure_data_mapping(offset, length, overwrite)


class ShrinkDropsCutCluster(Qcow2Driver):
    """A shrink to mid-cluster frees the cluster the new end cuts (floor for ceiling): the
    bytes before the new end in that cluster are lost."""

    def resize_shrink(self, new_size: int) -> None:
        cs = self._cluster_size
        if new_size % cs and new_size < self._size:
            floor = new_size - new_size % cs
            for guest in self._mapped_clusters(floor, floor + cs):
                if self._get_l2_entry(guest).type is not ClusterType.UNALLOCATED:
                    self._replace_entry(guest, L2Entry(ClusterType.UNALLOCATED))
        super().resize_shrink(new_size)


class PreallocReusedNotZeroed(Qcow2Driver):
    """A preallocating grow maps clusters it reuses (freed earlier, inside the file) without
    zeroing them: their stale data shows in the grown area."""

    def _preallocate(self, clusters: range, prealloc: Any, bitmap: int | None = None) -> None:
        if not clusters or self.header.has_data_file:
            super()._preallocate(clusters, prealloc, bitmap)
            return
        cs = self._cluster_size
        first_host = self._allocator.allocate(len(clusters))
        host_end = first_host + len(clusters) * cs
        if self._storage.size() < host_end:
            self._storage.resize(host_end)
        for i, guest in enumerate(clusters):
            self._replace_entry(guest, L2Entry(ClusterType.NORMAL, first_host + i * cs, True),
                                bitmap=bitmap)


class MappingJoinsNonAdjacent(Qcow2Driver):
    """get_mapping runs two data clusters together when their host clusters merely both
    exist (not when the second follows the first on the host)."""

    def _continues(self, first: L2Entry, later: L2Entry, distance: int) -> bool:
        if first.type is ClusterType.NORMAL and later.type is ClusterType.NORMAL:
            return later.copied == first.copied
        return super()._continues(first, later, distance)


class MappingIgnoresMaxLength(Qcow2Driver):
    """get_mapping of a zero or unallocated run reports the whole run, past ``max_length``."""

    def get_mapping(self, offset: int, max_length: int) -> Any:
        mapping, length = super().get_mapping(offset, max_length)
        if mapping.__class__.__name__ in ("ZeroMapping", "IndirectMapping") and length:
            full, more = super().get_mapping(offset, self._size - offset)
            if type(full) is type(mapping):
                return mapping, max(length, more)
        return mapping, length


class CompressedReadvSkipsPosition(Qcow2Driver):
    """readv_special fills every buffer from the position of the first (it forgets to
    advance inside the decompressed cluster)."""

    def readv_special(self, buffers: Any, offset: int) -> None:
        for buf in buffers:
            super().readv_special([buf], offset)


# -- refcounts and allocation ----------------------------------------------------------------


class _LowByteLostRefcounts(RefcountTable):
    def set(self, cluster_index: int, value: int) -> None:
        if self._order <= 3:
            super().set(cluster_index, value)
            return
        # The block in the cache is right; only the first byte of the entry is written back
        # (a width in bytes computed as bits // 16).
        table_index = cluster_index // self._entries
        offset = self._block_offset(table_index)
        if not offset:
            super().set(cluster_index, value)
            return
        block = self._load_block(offset)
        from pyimago.reference.qcow2.refcounts import set_block_entry

        index = cluster_index % self._entries
        set_block_entry(block, index, self._order, value)
        start = index * (1 << self._order) // 8
        self._storage.write(block[start : start + 1], offset + start)


class WideRefcountWriteBackShort(Qcow2Driver):
    """Refcounts of 16 bits and more write back only their first (most significant) byte:
    the cached value is right, storage keeps the old low byte."""

    def _mutate(self) -> None:
        self._refcounts.__class__ = _LowByteLostRefcounts


class _UncountedTableRefcounts(RefcountTable):
    def add(self, cluster_index: int, delta: int) -> int:
        if delta == 1 and getattr(self, "_growing", False):
            return self.get(cluster_index)
        return super().add(cluster_index, delta)

    def _grow_table(self, needed_index: int) -> None:
        self._growing = True
        try:
            super()._grow_table(needed_index)
        finally:
            self._growing = False


class GrownRefcountTableUncounted(Qcow2Driver):
    """A moved refcount table's clusters that existing blocks cover are never counted
    (the loop that adds their references is skipped): they read as free."""

    def _mutate(self) -> None:
        self._refcounts.__class__ = _UncountedTableRefcounts


class _PackingAllocator(ClusterAllocator):
    def incref(self, host_offset: int) -> None:
        return None


class CompressedPackingUncounted(Qcow2Driver):
    """Compressed data packed into a host cluster another compressed cluster already uses
    does not add its reference (QEMU's qcow2_alloc_bytes does)."""

    def _mutate(self) -> None:
        self._allocator.__class__ = _PackingAllocator


class _NoReuseAllocator(ClusterAllocator):
    def free(self, host_offset: int, n: int = 1) -> None:
        first = host_offset >> self._cluster_bits
        for index in range(first, first + n):
            if self._rc.add(index, -1) == 0:
                self._free_hint = min(self._free_hint, index)


class FreedClusterPackedInto(Qcow2Driver):
    """Freeing the host cluster compressed data is being packed into does not stop the
    packing: later compressed clusters go into a cluster that may be handed out whole."""

    def _mutate(self) -> None:
        self._allocator.__class__ = _NoReuseAllocator


# -- the L2 cache ---------------------------------------------------------------------------


class _UnpinnedL2Cache(L2Cache):
    def mark_dirty(self, offset: int, *, pinned: bool = False) -> None:
        super().mark_dirty(offset, pinned=False)


class L2CacheIgnoresPins(Qcow2Driver):
    """The L2 cache does not pin tables whose new entries map data not yet written: an
    eviction (small caches, parallel writes) writes the entry before the data."""

    def _mutate(self) -> None:
        self._l2.__class__ = _UnpinnedL2Cache


class _DropKeepsDirty(L2Cache):
    def drop(self, offset: int) -> None:
        table = self._tables.get(offset)
        super().drop(offset)
        if table is not None:
            # Forgets to forget it: a flush writes the freed table back over its cluster.
            self._tables[offset] = table
            self._dirty.add(offset)


class DroppedL2WrittenBack(Qcow2Driver):
    """An L2 table dropped because its cluster is freed (a shrink, a copied shared table)
    stays dirty in the cache, and a later flush writes it over whatever reused the cluster."""

    def _mutate(self) -> None:
        self._l2.__class__ = _DropKeepsDirty


class L1EntryNotWritten(Qcow2Driver):
    """A new L2 table's L1 entry is changed in memory only (the storage write is lost):
    everything mapped through that table vanishes on reopen."""

    def _set_l1_entry(self, l1_idx: int, raw: int) -> None:
        if raw:
            self._l1[l1_idx] = raw
            return
        super()._set_l1_entry(l1_idx, raw)


# -- crash ordering -------------------------------------------------------------------------


class FreeBeforeEntry(Qcow2Driver):
    """A replaced entry's old clusters are freed before the new entry is on storage
    (crash.order.unref-after-entry): a cut in between leaves an entry pointing at a free
    cluster."""

    def _set_l2_entry(self, guest_offset: int, entry: L2Entry, *, write_through: bool,
                      pinned: bool = False, bitmap: int | None = None) -> None:
        super()._set_l2_entry(guest_offset, entry, write_through=False, pinned=pinned,
                              bitmap=bitmap)


class SettleFreesFirst(Qcow2Driver):
    """The refcount drops that wait for pinned entries are made before those entries are
    written (crash.order.unref-after-entry, the data_pending path)."""

    def _settle(self) -> None:
        if self._pending_frees:
            frees, self._pending_frees = self._pending_frees, []
            for host in frees:
                self._allocator.free(host)
        super()._settle()


class _HeaderFirstRefcounts(RefcountTable):
    def _grow_table(self, needed_index: int) -> None:
        storage, header = self._storage, self._write_header
        deferred: list[tuple[bytes, int]] = []

        class _Deferring:
            def __getattr__(self, name: str) -> Any:
                return getattr(storage, name)

            def write(self, data: Any, offset: int) -> None:
                deferred.append((bytes(data), offset))

        def switch(offset: int, clusters: int) -> None:
            self._storage = storage
            header(offset, clusters)  # the header first ...
            for data, at in deferred:  # ... then the new table and its blocks
                storage.write(data, at)

        self._storage = _Deferring()  # type: ignore[assignment]
        self._write_header = switch
        try:
            super()._grow_table(needed_index)
        finally:
            self._storage, self._write_header = storage, header


class RefcountTableSwitchedFirst(Qcow2Driver):
    """A refcount-table move points the header at the new table before the table and its
    new blocks are written (crash.order.new-structure-before-pointer)."""

    def _mutate(self) -> None:
        self._refcounts.__class__ = _HeaderFirstRefcounts


class L1GrownPointerFirst(Qcow2Driver):
    """A grown L1 table: the header points at the new table before the table is written
    (crash.order.new-structure-before-pointer)."""

    def _grow_l1(self, new_l1_size: int) -> None:
        cs = self._cluster_size
        clusters = -(-new_l1_size * 8 // cs)
        new_offset = self._allocator.allocate(clusters)
        entries = self._l1 + [0] * (clusters * cs // 8 - len(self._l1))
        old_offset, old_size = self._l1_offset, self._l1_size
        self._write_field("l1_size", ">IQ", new_l1_size, new_offset)
        self._storage.write(struct.pack(f">{len(entries)}Q", *entries), new_offset)
        self._l1_offset, self._l1_size = new_offset, new_l1_size
        self._l1 = entries[:new_l1_size]
        if old_size:
            self._allocator.free(old_offset, -(-old_size * 8 // cs))


class GrowSizeFirst(Qcow2Driver):
    """A grow writes the new size into the header before preparing the new area
    (crash.order.grow-size-last): a cut in between shows stale bytes there."""

    def resize_grow(self, new_size: int, prealloc: Any) -> None:
        old = self._size
        if new_size > old and self._writable:
            self._check_new_size(new_size)
            self._write_field("size", ">Q", new_size)
            try:
                super().resize_grow(new_size, prealloc)
            except BaseException:
                self._write_field("size", ">Q", old)
                raise
            return
        super().resize_grow(new_size, prealloc)


# -- the target -----------------------------------------------------------------------------


def _swap_chain(access: Any, mutant: type[Qcow2Driver]) -> None:
    layer = access
    while isinstance(layer, FormatAccess):
        driver = layer.driver
        if type(driver) is Qcow2Driver:
            driver.__class__ = mutant
            hook = getattr(driver, "_mutate", None)
            if hook is not None:
                hook()
        layer = getattr(driver, "backing", None)


def reference_path_target(name: str, driver: type[Qcow2Driver]) -> ImplementationTarget:
    """The reference with every qcow2 driver of each chain turned into ``driver``, driven
    as the machines drive the reference (default chains, power cuts checked)."""

    def open_mutant(location: Any, **kwargs: Any) -> Any:
        opened = open_image(location, **kwargs)
        _swap_chain(opened, driver)
        backing = kwargs.get("backing")
        if isinstance(backing, FormatAccess):
            _swap_chain(backing, driver)
        return opened

    return ImplementationTarget(
        name=f"mutant:{name}",
        open_image=open_mutant,
        create_image=create_image,
        l2_cache_option=True,
        crash_safe=True,
        file_storage=FileStorage,
    )

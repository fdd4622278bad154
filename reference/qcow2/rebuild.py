"""Rebuilding the refcount structure from counted references (qcow2.corrupt.repair).

QEMU's ``rebuild_refcount_structure`` (block/qcow2-refcount.c), used by ``qemu-img check -r
all`` when the refcount structure itself cannot be trusted (a referenced cluster with refcount
0, a misplaced refcount block): new refcount blocks and a new refcount table are written where
nothing is referenced, placed as QEMU places them (so that the image ends where QEMU's would),
and the header switches to them last; the old structure leaks, and the caller frees it.
"""

from __future__ import annotations

import struct
from collections import Counter

from .._storage import Storage
from .header import FIELD_OFFSETS, QCowHeader
from .refcounts import refcount_block_entries, set_block_entry

__all__ = ["rebuild_refcount_structure"]


class _Rebuild:
    def __init__(self, storage: Storage, header: QCowHeader, refs: Counter[int],
                 nb_clusters: int) -> None:
        self.storage = storage
        self.h = header
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.entries = refcount_block_entries(self.cb, header.refcount_order)
        self.refs = refs
        self.nb_clusters = nb_clusters

    def _alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt: the first run of ``count`` clusters without references from
        ``first_free`` on (or at the end), now counted; returns it and the new first_free."""
        cluster, run, first_gap = first_free, 0, True
        while cluster < self.nb_clusters and run < count:
            if not self.refs[cluster]:
                run += 1
                if first_gap:
                    first_free, first_gap = cluster, False
            else:
                run = 0
            cluster += 1
        if run < count:
            self.nb_clusters = cluster + count - run
        cluster -= run
        for i in range(count):
            self.refs[cluster + i] = 1
        return cluster, first_free

    def _write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """rebuild_refcounts_write_refblocks: a block for every range of clusters with
        references, written as the counted refcounts; whether ``reftable`` grew."""
        grown, first_free, cluster = False, 0, first
        while cluster < end:
            if not self.refs[cluster]:
                cluster += 1
                continue
            index = cluster // self.entries
            start = index * self.entries
            if index < len(reftable) and reftable[index]:
                offset = reftable[index]
            else:
                block_cluster, first_free = self._alloc(1, max(first_free, start))
                end = max(end, block_cluster + 1)
                if index >= len(reftable):
                    per_cluster = self.cs // 8
                    wanted = -(-(index + 1) // per_cluster) * per_cluster
                    reftable.extend([0] * (wanted - len(reftable)))
                    grown = True
                offset = reftable[index] = block_cluster << self.cb
            block = bytearray(self.cs)
            for c in range(start, start + self.entries):
                if self.refs[c]:
                    set_block_entry(block, c - start, self.h.refcount_order, self.refs[c])
            self.storage.write(block, offset)
            cluster = start + self.entries
        return grown

    def rebuild_structure(self) -> None:
        """rebuild_refcount_structure: new refcount blocks and table from the counted
        references, placed where nothing is referenced; the header switches to them last
        (the old structure is left to leak, and the caller frees it)."""
        reftable: list[int] = []
        self._write_refblocks(0, self.nb_clusters, reftable)
        while True:
            clusters = -(-len(reftable) * 8 // self.cs)
            start, _ = self._alloc(clusters, 0)
            if not self._write_refblocks(start, start + clusters, reftable):
                break
        offset = start << self.cb
        self.storage.write(struct.pack(f">{len(reftable)}Q", *reftable), offset)
        self.storage.write(struct.pack(">QI", offset, clusters),
                           FIELD_OFFSETS["refcount_table_offset"])


def rebuild_refcount_structure(storage: Storage, header: QCowHeader, refs: Counter[int],
                               nb_clusters: int) -> int:
    """Write a new refcount structure for the references ``refs`` counts (the new clusters
    are counted there too); return the new number of clusters the counts cover."""
    rebuild = _Rebuild(storage, header, refs, nb_clusters)
    rebuild.rebuild_structure()
    return rebuild.nb_clusters

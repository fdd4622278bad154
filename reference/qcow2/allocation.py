"""Host cluster allocation: where new clusters go.

Policy (pyimago's, the spec leaves it open): a single cluster reuses the lowest free cluster
(refcount 0) below the end of the image; runs of several clusters, and everything the refcount
structure itself needs, are taken from the end of the image.  Clusters handed out from the end
are never below ``end``, so the refcount machinery can take clusters from the end while an
allocation is in progress without ever handing out the same cluster twice.
"""

from __future__ import annotations

from collections.abc import Callable

from .._errors import CorruptImageError
from .._storage import Storage
from .refcounts import RefcountTable

__all__ = ["MAX_CLUSTERS_PAST_EOF", "ClusterAllocator"]

#: How many clusters past the end of the file may carry a refcount (leaked by a crash)
#: before the image counts as corrupt.
MAX_CLUSTERS_PAST_EOF = 1024


class ClusterAllocator:
    """Hands out host clusters and keeps their refcounts (through ``RefcountTable``)."""

    def __init__(self, storage: Storage, cluster_bits: int) -> None:
        self._storage = storage
        self._cluster_bits = cluster_bits
        cs = 1 << cluster_bits
        self._end = -(-storage.size() // cs)
        self._free_hint = 0
        # qcow2_alloc_bytes' free_byte_offset: where the next compressed cluster may start
        # in a host cluster compressed data already uses (0: none).
        self._free_byte_offset = 0
        self.refcounts: RefcountTable | None = None
        #: Called with ``(offset, length, what)`` before clusters are handed out; raises if
        #: they overlap metadata (qcow2.corrupt.overlap-check: "QEMU checks every
        #: allocation [...] against all metadata").
        self.overlap_check: Callable[[int, int, str], None] | None = None

    def attach(self, refcounts: RefcountTable) -> None:
        """Connect the refcount table (which itself bumps clusters from this allocator)."""
        self.refcounts = refcounts
        last = refcounts.last_used_cluster()
        if last >= self._end + MAX_CLUSTERS_PAST_EOF:
            # A crash may leave a few refcounted clusters past the end of the file (leaks);
            # refcounts far beyond it would make us allocate there: a hostile image.
            raise CorruptImageError(
                f"qcow2 refcounts claim host cluster {last}, far beyond the end of the image "
                f"file ({self._end} clusters)"
            )
        self._end = max(self._end, last + 1)

    @property
    def _rc(self) -> RefcountTable:
        assert self.refcounts is not None, "allocator used before attach()"
        return self.refcounts

    def peek_end(self) -> int:
        """Index of the first cluster past everything in use or handed out."""
        return self._end

    def bump(self, n: int) -> int:
        """Hand out ``n`` clusters from the end (no refcount is set); return the first index."""
        first = self._end
        self._end += n
        return first

    def allocate(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters with refcount 1; return the host offset."""
        first = self._find_free_cluster() if n == 1 else None
        if first is None:
            first = self.bump(n)
        if self.overlap_check is not None:
            # A refcount of 0 may lie (a damaged image): never hand out metadata.
            self.overlap_check(first << self._cluster_bits, n << self._cluster_bits,
                               "allocation")
        for index in range(first, first + n):
            self._rc.set(index, 1)
        return first << self._cluster_bits

    def allocate_bytes(self, size: int) -> int:
        """Count ``size`` bytes (1..cluster size) for compressed data; return their offset.

        QEMU's qcow2_alloc_bytes: compressed clusters are packed byte after byte into the
        host cluster the previous one ended in while that cluster's refcount has room; data
        that does not fit continues into a new cluster when that one directly follows,
        else starts in the new one.  Every host cluster the bytes touch gains one reference
        (qcow2.compressed.shared-sector).
        """
        cs = 1 << self._cluster_bits
        offset = self._free_byte_offset
        if offset and self.refcount(offset) >= self._rc.max_refcount:
            offset = 0
        if offset and cs - offset % cs >= size:
            self.incref(offset)
        else:
            new = self.allocate(1)
            if offset and -(-offset // cs) * cs == new:
                self.incref(offset)
            else:
                offset = new
        end = offset + size
        self._free_byte_offset = end if end % cs else 0
        return offset

    def _find_free_cluster(self) -> int | None:
        index = self._free_hint
        while index < self._end:
            if self._rc.get(index) == 0:
                self._free_hint = index + 1
                return index
            index += 1
        self._free_hint = self._end
        return None

    def free(self, host_offset: int, n: int = 1) -> None:
        """Drop one reference to each of ``n`` clusters starting at ``host_offset``."""
        first = host_offset >> self._cluster_bits
        for index in range(first, first + n):
            if self._rc.add(index, -1) == 0:
                self._free_hint = min(self._free_hint, index)
                if self._free_byte_offset >> self._cluster_bits == index:
                    # The cluster may be handed out whole now: pack nothing more into it.
                    self._free_byte_offset = 0

    def incref(self, host_offset: int) -> None:
        self._rc.add(host_offset >> self._cluster_bits, 1)

    def refcount(self, host_offset: int) -> int:
        return self._rc.get(host_offset >> self._cluster_bits)

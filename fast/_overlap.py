"""Where an image's metadata lies, for QEMU-style overlap checks (qcow2.corrupt.overlap-check).

:class:`MetadataIndex` maps host cluster numbers to the structure they hold (header, L1
table, refcount table and blocks, active and snapshot L2 tables, snapshot table and snapshot
L1 tables).  The cluster numbers are kept sorted, so "does ``[first, last]`` hold any
metadata" is one bisection however large the range or the image.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping

__all__ = ["MetadataIndex", "clusters_of"]


def clusters_of(at: int, nbytes: int, cluster_bits: int) -> range:
    """Host cluster numbers that ``nbytes`` bytes from ``at`` touch."""
    if nbytes <= 0:
        return range(0)
    return range(at >> cluster_bits, ((at + nbytes - 1) >> cluster_bits) + 1)


class MetadataIndex:
    """Host clusters holding metadata, each with the name of what it holds."""

    def __init__(self, parts: Iterable[tuple[range, str]] = ()) -> None:
        self._what: dict[int, str] = {}
        for clusters, what in parts:
            for c in clusters:
                self._what.setdefault(c, what)
        self._sorted = sorted(self._what)
        #: Metadata cluster -> what it holds (read-only: change it with add/discard); the
        #: hot write path asks ``cluster in index.clusters`` without a method call.
        self.clusters: Mapping[int, str] = self._what

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, cluster: int) -> bool:
        return cluster in self._what

    def what(self, cluster: int) -> str:
        """What cluster ``cluster`` holds (it must be in the index)."""
        return self._what[cluster]

    def add(self, cluster: int, what: str) -> None:
        if cluster not in self._what:
            insort(self._sorted, cluster)
        self._what[cluster] = what

    def discard(self, cluster: int) -> None:
        if self._what.pop(cluster, None) is not None:
            del self._sorted[bisect_left(self._sorted, cluster)]

    def first_hit(self, first: int, last: int) -> int | None:
        """The lowest metadata cluster in ``[first, last]``, or None."""
        i = bisect_left(self._sorted, first)
        if i < len(self._sorted) and self._sorted[i] <= last:
            return self._sorted[i]
        return None

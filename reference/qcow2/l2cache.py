"""The reference driver's write-back cache of L2 tables.

Small on purpose (so that eviction is a real code path in tests).  A dirty table reaches
storage when it is evicted, when the driver flushes, or when the driver writes it through
before dropping a refcount.  A table that holds an entry whose guest data the caller has not
written yet is *pinned*: it is never written back on eviction, only once the driver knows the
data is on storage (crash.order.data-before-entry).
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from .._storage import Storage
from .tables import unpack_table

__all__ = ["L2Cache"]


class L2Cache:
    """L2 tables by host offset, least recently used first."""

    def __init__(self, storage: Storage, cluster_size: int, capacity: int) -> None:
        self._storage = storage
        self._cluster_size = cluster_size
        self._capacity = capacity
        self._tables: OrderedDict[int, list[int]] = OrderedDict()
        self._dirty: set[int] = set()
        self._pinned: set[int] = set()

    @property
    def pinned(self) -> bool:
        """Whether any table is pinned."""
        return bool(self._pinned)

    def load(self, offset: int) -> list[int]:
        """The table at ``offset`` (read from storage on a miss)."""
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            return table
        raw = self._storage.read(offset, self._cluster_size)
        table = unpack_table(raw)
        self._tables[offset] = table
        self._evict()
        return table

    def write_new(self, offset: int, table: list[int]) -> list[int]:
        """Write a new table to storage and cache it (it must be complete on storage before
        anything points at it: crash.order.new-structure-before-pointer)."""
        self._tables[offset] = table
        self.write(offset)
        self._evict()
        return table

    def mark_dirty(self, offset: int, *, pinned: bool = False) -> None:
        """The cached table at ``offset`` changed; ``pinned`` while the data it maps is not
        written yet."""
        self._dirty.add(offset)
        if pinned:
            self._pinned.add(offset)

    def write(self, offset: int) -> None:
        """Write one cached table back to storage."""
        table = self._tables[offset]
        self._storage.write(struct.pack(f">{len(table)}Q", *table), offset)
        self._dirty.discard(offset)

    def write_pinned(self) -> None:
        """Write back every dirty pinned table (the data it maps is now on storage)."""
        for offset in sorted(self._pinned & self._dirty):
            self.write(offset)

    def unpin(self) -> None:
        """The caller has written through every mapping it was given: nothing is pinned."""
        self._pinned.clear()
        self._evict()

    def drop(self, offset: int) -> None:
        """Forget the table at ``offset`` without writing it (it is being freed)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)
        self._pinned.discard(offset)

    def flush(self) -> None:
        """Write back every dirty table (pinned ones included: the caller asks for it)."""
        for offset in sorted(self._dirty):
            self.write(offset)

    def clear(self) -> None:
        """Drop everything without writing it back."""
        self._tables.clear()
        self._dirty.clear()
        self._pinned.clear()

    def _evict(self) -> None:
        # Pinned tables stay, even past the capacity: writing them now could put an entry on
        # storage before the data it maps.  The most recently used table stays too: the
        # caller is about to change it.
        for offset in [o for o in list(self._tables)[:-1] if o not in self._pinned]:
            if len(self._tables) <= self._capacity:
                return
            if offset in self._dirty:
                self.write(offset)
            del self._tables[offset]

"""A bounded write-back cache of decoded one-cluster metadata tables (L2 tables and
refcount blocks), least recently used first out.

``tables`` is the plain ordered dict (host offset -> decoded array) so that the layer's
hottest path can look a table up without a method call.  Writing a table back goes through
``store`` (which encodes and writes it) after ``before_store`` (the layer passes "write the
refcounts and the pending guest data first" for L2 tables: a cluster is counted on disk, and
holds its data, before any entry uses it) and before ``after_store`` (the layer passes
"release what the table's old entries held": a refcount drops only once no table on
storage refers to the cluster).

With ``entry_flag`` the cache also keeps ``by_entry``: each table under the two values a
pointer to it can have (its offset, with and without that flag bit), so that the hot read
path (``_hot``) finds a table from the raw L1 entry in one dict lookup.  An entry with any
other bit set is in no key: it is not a plain pointer, and the slow path judges it.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["TableCache"]


class TableCache:
    """Decoded tables keyed by their host offset, at most ``limit`` of them."""

    def __init__(
        self,
        limit: int,
        store: Callable[[int, array[int]], None],
        before_store: Callable[[], None] | None = None,
        after_store: Callable[[int], None] | None = None,
        entry_flag: int = 0,
    ) -> None:
        self.tables: OrderedDict[int, array[int]] = OrderedDict()
        #: Cached tables by raw pointer value (empty without ``entry_flag``).
        self.by_entry: dict[int, array[int]] = {}
        self._flag = entry_flag
        self.dirty: set[int] = set()
        self.limit = max(1, limit)
        self._store = store
        self._before_store = before_store
        self._after_store = after_store

    def __len__(self) -> int:
        return len(self.tables)

    def __contains__(self, ofs: int) -> bool:
        return ofs in self.tables

    def get(self, ofs: int) -> array[int] | None:
        tbl = self.tables.get(ofs)
        if tbl is not None:
            self.tables.move_to_end(ofs)
        return tbl

    def add(self, ofs: int, tbl: array[int], *, dirty: bool = False) -> None:
        """Insert (or replace) a table; the least recently used ones may be written out."""
        self.tables[ofs] = tbl
        self.tables.move_to_end(ofs)
        if self._flag:
            self.by_entry[ofs] = self.by_entry[ofs | self._flag] = tbl
        if dirty:
            self.dirty.add(ofs)
        while len(self.tables) > self.limit:
            old, old_tbl = self.tables.popitem(last=False)
            self._unalias(old)
            if old in self.dirty:
                self._write(old, old_tbl)

    def _unalias(self, ofs: int) -> None:
        if self._flag:
            self.by_entry.pop(ofs, None)
            self.by_entry.pop(ofs | self._flag, None)

    def touch(self, ofs: int, tbl: array[int]) -> None:
        """``tbl`` at ``ofs`` changed: keep it (cached, dirty) until it is written back."""
        if ofs in self.tables:
            self.dirty.add(ofs)
        else:
            self.add(ofs, tbl, dirty=True)

    def _write(self, ofs: int, tbl: array[int]) -> None:
        if self._before_store is not None:
            self._before_store()
        self._store(ofs, tbl)
        self.dirty.discard(ofs)
        if self._after_store is not None:
            self._after_store(ofs)

    def write_back(self) -> None:
        """Write every dirty table, in offset order."""
        if not self.dirty:
            return
        if self._before_store is not None:
            self._before_store()
        for ofs in sorted(self.dirty):
            tbl = self.tables.get(ofs)
            if tbl is not None:
                self._store(ofs, tbl)
        stored, self.dirty = self.dirty, set()
        if self._after_store is not None:
            for ofs in sorted(stored):
                self._after_store(ofs)

    def forget(self, ofs: int) -> None:
        """Drop one table without writing it (its cluster is being freed)."""
        self.tables.pop(ofs, None)
        self._unalias(ofs)
        self.dirty.discard(ofs)

    def clear(self) -> None:
        """Drop everything without writing anything back."""
        self.tables.clear()
        self.by_entry.clear()
        self.dirty.clear()

"""The qcow2 driver's caches and lifetime: flush, sync, invalidate_cache, close.

A mixin of ``Qcow2Driver``.
"""

from __future__ import annotations

from .driver_state import DriverState

__all__ = ["CachesAndLifetime"]


class CachesAndLifetime(DriverState):
    """Writing back and dropping the driver's caches, and releasing its storages."""

    def flush(self) -> None:
        """access.flush.no-sync: every cached change reaches the storages, which are not
        synced ("Does not necessarily sync those buffers to disk")."""
        if self._writable and not self._corrupt:
            self._settle()
            self._l2.flush()
        # qcow2.data-file.write: "flush() and sync() flush the data file before the qcow2
        # file" (the data before the entries that map it).
        if self._data_storage is not None:
            self._data_storage.flush()
        self._storage.flush()

    def sync(self) -> None:
        """access.sync.no-flush: "This does not necessarily include flushing internal
        buffers, i.e. `flush`."  Only what the storages hold is made durable."""
        if self._data_storage is not None:
            self._data_storage.sync()
        self._storage.sync()

    def invalidate_cache(self) -> None:
        self._l2.clear()
        # Refcount drops that waited for entries now lost: the clusters leak, never corrupt.
        self._pending_frees.clear()
        self._refcounts.invalidate_cache()
        self._l1 = self._load_l1()
        self._storage.invalidate_cache()

    def close(self) -> None:
        try:
            self._storage.close()
        finally:
            try:
                self.close_data_file()
            finally:
                if self._backing is not None and self._own_backing:
                    self._backing.close()

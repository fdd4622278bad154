"""The raw layer of pyimago.fast: the disk is the storage, byte for byte."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pyimago.reference._info import ImageInfo
from pyimago.reference._mapping import EofMapping, RawMapping, ShallowMapping
from pyimago.reference._prealloc import PreallocateMode
from pyimago.reference._storage import Buffer, Storage

from ._layer import Clear, LayerBase
from ._probe import SECTOR, refuse_block0_change
from ._runs import K_DATA, K_EOF
from ._storage import fill_zero

__all__ = ["RawLayer"]

#: Serialises check-and-change of block 0 of probed raw images: two writers could otherwise
#: each pass the check with half of a header.  (Rare and tiny: one lock for all images.)
_BLOCK0 = threading.Lock()


class _Block0Guard:
    """The storage of a probed raw image as handed out in mappings of block 0: writes
    through it are checked as the layer's own (clause ``raw.probed.block0``)."""

    def __init__(self, storage: Storage) -> None:
        self._inner = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __str__(self) -> str:
        return str(self._inner)

    def write(self, data: Buffer, offset: int) -> None:
        view = memoryview(data).cast("B")
        if offset < SECTOR:
            head = bytes(view[: SECTOR - offset])
            with _BLOCK0:
                refuse_block0_change(self._inner.read(0, SECTOR), offset, head, len(view), self)
                self._inner.write(head, offset)
            view, offset = view[len(head) :], offset + len(head)
        if view:
            self._inner.write(view, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        with _BLOCK0:
            refuse_block0_change(self._inner.read(0, SECTOR), offset, None, length, self)
            self._inner.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        with _BLOCK0:
            refuse_block0_change(self._inner.read(0, SECTOR), offset, None, length, self)
            self._inner.discard(offset, length)


class RawLayer(LayerBase):
    """A raw image: one run of writable data from 0 to the end of the storage.

    ``probed``: the format was probed, not given; block 0 then must keep probing as raw.
    """

    format_name = "raw"

    def __init__(self, storage: Storage, writable: bool, probed: bool = False) -> None:
        super().__init__(storage, writable)
        self.probed = probed and writable
        self._guard = _Block0Guard(storage) if self.probed else None

    def _storage_at(self, offset: int) -> Storage:
        if self._guard is not None and offset < SECTOR:
            return self._guard
        return self.storage

    def _check_block0(self, offset: int, new: bytes | None, length: int) -> None:
        if self.probed and offset < SECTOR:
            refuse_block0_change(self.storage.read(0, SECTOR), offset, new, length, self)

    @property
    def size(self) -> int:
        return self.storage.size()

    def info(self) -> ImageInfo:
        """A raw image is its size and nothing else."""
        return ImageInfo(format="raw", virtual_size=self.storage.size())

    def map_run(self, offset: int, max_len: int) -> tuple[int, int, int]:
        left = self.storage.size() - offset
        return (K_DATA, offset, min(max_len, left)) if left > 0 else (K_EOF, 0, 0)

    def to_mapping(self, kind: int, host: int, offset: int, ln: int) -> ShallowMapping:
        if kind != K_DATA:
            return EofMapping()
        return RawMapping(self._storage_at(host), host, self.writable)

    def readinto(self, view: memoryview, offset: int) -> None:
        inside = min(len(view), max(0, self.storage.size() - offset))
        if inside:
            self.storage.readinto(view if inside == len(view) else view[:inside], offset)
        if inside < len(view):
            fill_zero(view[inside:])

    def plan_read(
        self, view: memoryview, offset: int, jobs: list[Callable[[], None]], chunk: int
    ) -> None:
        # A plain copy is memory-bound: threads would only add hand-offs.
        self.readinto(view, offset)

    def write(
        self, view: memoryview, offset: int, jobs: list[tuple[int, memoryview]] | None
    ) -> None:
        if self.probed and offset < SECTOR:
            # Judge and write the very same bytes (the caller's buffer may change), at once:
            # the rest of the request may still go to the worker threads.
            head = bytes(view[: SECTOR - offset])
            with _BLOCK0:
                self._check_block0(offset, head, len(view))
                self.storage.write(head, offset)
            view, offset = view[len(head) :], offset + len(head)
            if not view:
                return
        if jobs is not None:
            jobs.append((offset, view))
        else:
            self.storage.write(view, offset)

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        self.refuse_read_only("ensure_data_mapping")
        return self._storage_at(offset), offset, min(length, self.size - offset)

    def clear(self, offset: int, length: int, how: Clear) -> None:
        """No metadata to mark anything with: zeroes are written (raw has no backing, so
        "the backing" reads as zeroes too); only ``discard_to_any`` may drop the data."""
        if self.probed and offset < SECTOR:
            with _BLOCK0:
                # A discard may leave zeroes too: every kind is judged as zeroing.
                self._check_block0(offset, None, length)
                self._clear(offset, length, how)
        else:
            self._clear(offset, length, how)

    def _clear(self, offset: int, length: int, how: Clear) -> None:
        if how is Clear.ANY:
            self.storage.discard(offset, length)
        else:
            self.storage.write_zeroes(offset, length)

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        self.refuse_read_only("resize_grow")
        if new_size > self.size:
            # A grown file reads zero whatever the mode; the mode decides its allocation.
            self.storage.resize(new_size, prealloc)

    def resize_shrink(self, new_size: int) -> None:
        self.refuse_read_only("resize_shrink")
        if new_size < self.size:
            self.storage.resize(new_size)

    def flush(self) -> None:
        self.storage.flush()

    def invalidate_cache(self) -> None:
        self.storage.invalidate_cache()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.storage.close()

"""The raw layer of pyimago.fast: the disk is the storage, byte for byte."""

from __future__ import annotations

from collections.abc import Callable

from pyimago.reference._info import ImageInfo
from pyimago.reference._mapping import EofMapping, RawMapping, ShallowMapping
from pyimago.reference._prealloc import PreallocateMode
from pyimago.reference._storage import Storage

from ._layer import Clear, LayerBase
from ._runs import K_DATA, K_EOF
from ._storage import fill_zero

__all__ = ["RawLayer"]


class RawLayer(LayerBase):
    """A raw image: one run of writable data from 0 to the end of the storage."""

    format_name = "raw"

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
        return RawMapping(self.storage, host, self.writable) if kind == K_DATA else EofMapping()

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
        if jobs is not None:
            jobs.append((offset, view))
        else:
            self.storage.write(view, offset)

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        self.refuse_read_only("ensure_data_mapping")
        return self.storage, offset, min(length, self.size - offset)

    def clear(self, offset: int, length: int, how: Clear) -> None:
        """No metadata to mark anything with: zeroes are written (raw has no backing, so
        "the backing" reads as zeroes too); only ``discard_to_any`` may drop the data."""
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

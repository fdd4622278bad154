"""The raw format driver: the guest disk is the storage, byte for byte."""

from __future__ import annotations

from collections.abc import Sequence

from ._errors import ReadOnlyError, UnsupportedError
from ._info import ImageInfo
from ._mapping import EofMapping, RawMapping, ShallowMapping
from ._prealloc import PreallocateMode
from ._storage import Storage, WritableBuffer
from .probe import ProbedRawGuard

__all__ = ["RawDriver"]


class RawDriver:
    """raw.passthrough: guest offset N is storage offset N; the disk size is the storage size."""

    def __init__(self, storage: Storage, *, writable: bool = False, probed: bool = False) -> None:
        """``probed``: the format was probed, not given; writes that would make block 0
        probe as another format are then refused (clause ``raw.probed.block0``)."""
        if writable and not storage.writable:
            raise ReadOnlyError(f"cannot open {storage} writable: the storage is read-only")
        # raw.probed.block0: every path to the storage (mappings included) goes through
        # the guard, so no write can bypass it.
        self._storage: Storage = ProbedRawGuard(storage) if probed and writable else storage
        self._writable = writable
        self._probed = probed

    @property
    def probed(self) -> bool:
        """Whether the format was probed (block 0 is then guarded when writable)."""
        return self._probed

    def __str__(self) -> str:
        return f"raw:{self._storage}"

    @property
    def size(self) -> int:
        return self._storage.size()

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def storage(self) -> Storage:
        return self._storage

    @property
    def zero_granularity(self) -> int | None:
        # Raw has no metadata to mark zeroes with: zeroing always means writing zeroes.
        return None

    def storage_dependencies(self) -> list[Storage]:
        return [self._storage]

    def info(self) -> ImageInfo:
        """A raw image has no metadata: its format and size are all there is."""
        return ImageInfo(format="raw", virtual_size=self.size)

    def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        size = self.size
        if offset >= size:
            return EofMapping(), 0
        return RawMapping(self._storage, offset, self._writable), min(max_length, size - offset)

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        self._require_writable("ensure_data_mapping")
        return self._storage, offset, min(length, self.size - offset)

    def _require_writable(self, op: str) -> None:
        if not self._writable:
            raise ReadOnlyError(f"{op}: {self} is read-only")

    def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        return offset, 0

    def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        # raw.no-backing: the caller zeroes the range by writing zeroes.
        self._require_writable("discard_to_zero")
        return offset, 0

    def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        self._require_writable("discard_to_any")
        self._storage.discard(offset, length)
        return offset, length

    def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        # raw.no-backing: with no backing image, "the backing" reads as zeroes.
        self._require_writable("discard_to_backing")
        self._storage.write_zeroes(offset, length)
        return offset, length

    def readv_special(self, buffers: Sequence[WritableBuffer], offset: int) -> None:
        raise UnsupportedError(f"{self} has no special (encoded) data")

    def flush(self) -> None:
        self._storage.flush()

    def sync(self) -> None:
        self._storage.sync()

    def invalidate_cache(self) -> None:
        self._storage.invalidate_cache()

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        # raw.resize: a grown file reads as zeroes, so every mode reads zero.
        self._require_writable("resize_grow")
        if new_size > self.size:
            self._storage.resize(new_size, prealloc)

    def resize_shrink(self, new_size: int) -> None:
        self._require_writable("resize_shrink")
        if new_size < self.size:
            self._storage.resize(new_size)

    def close(self) -> None:
        self._storage.close()

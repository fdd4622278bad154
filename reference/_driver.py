"""The format-driver protocol, mirroring imago's ``FormatDriverInstance``.

``FormatAccess(driver)`` wraps any object that follows this protocol: ours (raw, qcow2) or a
third party's.  Ranges are ``(offset, length)`` in guest bytes; methods that return a range
return ``(offset, length)`` of what they actually did, which may be shorter than asked or
start later (format alignment); a length of 0 means nothing could be done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ._mapping import ShallowMapping
from ._prealloc import PreallocateMode
from ._storage import Storage, WritableBuffer

__all__ = ["FormatDriver"]


@runtime_checkable
class FormatDriver(Protocol):
    """One format layer of an image (its backing chain is reached through ``get_mapping``)."""

    @property
    def size(self) -> int:
        """Guest-visible disk size in bytes."""
        ...

    @property
    def writable(self) -> bool: ...

    @property
    def zero_granularity(self) -> int | None:
        """Granularity of efficient zeroing (``ensure_zero_mapping``), None if unsupported."""
        ...

    def storage_dependencies(self) -> list[Storage]:
        """Every storage this layer uses, the backing chain's included."""
        ...

    def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """What ``offset`` maps to in this layer, and for how many bytes (may exceed max)."""
        ...

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        """Make ``offset`` writable raw data; return ``(storage, host_offset, length)``.

        With ``overwrite`` the caller overwrites ``[offset, offset + length)`` entirely, so
        only the rest of each allocation unit needs to be copied (copy-on-write).
        """
        ...

    def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Mark the aligned part of the range as zero without freeing allocations."""
        ...

    def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]: ...

    def discard_to_any(self, offset: int, length: int) -> tuple[int, int]: ...

    def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]: ...

    def readv_special(self, buffers: Sequence[WritableBuffer], offset: int) -> None:
        """Read data behind a ``SpecialMapping`` (compressed clusters)."""
        ...

    def flush(self) -> None: ...

    def sync(self) -> None: ...

    def invalidate_cache(self) -> None: ...

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None: ...

    def resize_shrink(self, new_size: int) -> None: ...

    def close(self) -> None: ...

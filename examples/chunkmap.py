"""chunkmap: a small sparse disk-image format of our own, driven through pyimago.

This is what a third-party format driver looks like: a class that follows
``pyimago.reference.FormatDriver`` and is wrapped in ``pyimago.reference.FormatAccess``.
The oracle fuzzes it (``pyimago fuzz chunkmap:target``).

On-disk layout (all numbers little-endian)::

    0       8   magic  b"CHUNKMAP"
    8       4   chunk_size (power of two, 512 .. 1 MiB)
    12      4   backing name length (0: no backing)
    16      8   disk size in bytes
    24      8   map offset (a multiple of the chunk size)
    32      8   map entries
    40    ...   backing name (UTF-8), inside the first chunk

    map: one u64 per chunk: 0 unallocated (the backing shows, else zero), 1 zero,
         otherwise the host offset of the chunk's data (a multiple of the chunk size).

Chunks are appended at the end of the file; discarded chunks are not reused (the format
keeps no free list: it is a sample, not a product).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

from pyimago.reference import (
    AUTO,
    CorruptImageError,
    EofMapping,
    FileStorage,
    FormatAccess,
    IndirectMapping,
    InvalidRequestError,
    MemoryStorage,
    PreallocateMode,
    RawMapping,
    ReadOnlyError,
    ShallowMapping,
    Storage,
    UnsupportedError,
    WritableBuffer,
    ZeroMapping,
)

__all__ = ["MAGIC", "ChunkMapDriver", "create_image", "open_image", "target"]

MAGIC = b"CHUNKMAP"
_HEADER = struct.Struct("<8sIIQQQ")
_UNALLOCATED = 0
_ZERO = 1
_MAX_MAP_ENTRIES = 1 << 22


class ChunkMapDriver:
    """A chunkmap image on a storage, optionally over a backing FormatAccess."""

    def __init__(self, storage: Storage, *, writable: bool = False) -> None:
        if writable and not storage.writable:
            raise ReadOnlyError(f"{storage} is read-only")
        self._storage = storage
        self._writable = writable
        self._backing: FormatAccess | None = None
        raw = storage.read(0, _HEADER.size)
        magic, chunk, name_len, size, map_offset, entries = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise CorruptImageError(f"not a chunkmap image: magic {magic!r}")
        if chunk < 512 or chunk > 1 << 20 or chunk & (chunk - 1):
            raise CorruptImageError(f"chunkmap chunk size {chunk} is not a power of two")
        if entries > _MAX_MAP_ENTRIES or entries * chunk < size:
            raise CorruptImageError(f"chunkmap map of {entries} entries cannot hold {size}")
        if map_offset % chunk or map_offset < chunk or name_len > chunk - _HEADER.size:
            raise CorruptImageError(f"chunkmap map offset {map_offset} is invalid")
        self._chunk = chunk
        self._size = size
        self._map_offset = map_offset
        name = storage.read(_HEADER.size, name_len)
        self.backing_file = name.decode("utf-8", "surrogateescape") if name_len else None
        self._map = list(struct.unpack(f"<{entries}Q", storage.read(map_offset, entries * 8)))
        self._dirty = False
        self._end = max(-(-storage.size() // chunk) * chunk, map_offset + entries * 8)
        self._end = -(-self._end // chunk) * chunk

    # -- the FormatDriver protocol ------------------------------------------------------------

    def set_backing(self, backing: FormatAccess | None) -> None:
        self._backing = backing

    def __str__(self) -> str:
        return f"chunkmap:{self._storage}"

    @property
    def size(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def zero_granularity(self) -> int | None:
        return self._chunk

    def storage_dependencies(self) -> list[Storage]:
        deps = [self._storage]
        if self._backing is not None:
            deps += self._backing.driver.storage_dependencies()
        return deps

    def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        if offset >= self._size:
            return EofMapping(), 0
        index, within = divmod(offset, self._chunk)
        length = min(self._chunk - within, max_length, self._size - offset)
        entry = self._entry(index)
        if entry == _ZERO:
            return ZeroMapping(True), length
        if entry != _UNALLOCATED:
            return RawMapping(self._storage, entry + within, self._writable), length
        if self._backing is not None:
            return IndirectMapping(self._backing, offset, False), length
        return ZeroMapping(False), length

    def _entry(self, index: int) -> int:
        entry = self._map[index]
        if entry > _ZERO and entry % self._chunk:
            raise CorruptImageError(f"chunkmap entry {index} has misaligned offset {entry}")
        return entry

    def _require_writable(self) -> None:
        if not self._writable:
            raise ReadOnlyError(f"{self} is read-only")

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        self._require_writable()
        index, within = divmod(offset, self._chunk)
        chunk_len = min(length, self._chunk - within)
        entry = self._entry(index)
        if entry > _ZERO:
            return self._storage, entry + within, chunk_len
        # Copy what the guest sees now into the new chunk (backing data or zeroes).
        start = index * self._chunk
        if entry == _UNALLOCATED and self._backing is not None:
            content = self._backing.read(start, self._chunk)
        else:
            content = bytes(self._chunk)
        host = self._end
        self._end += self._chunk
        self._storage.write(content, host)
        self._map[index] = host
        self._dirty = True
        return self._storage, host + within, chunk_len

    def _whole_chunks(self, offset: int, length: int) -> range:
        end = min(offset + length, self._size)
        first = -(-offset // self._chunk)
        last = -(-end // self._chunk) if end == self._size else end // self._chunk
        return range(first, max(first, last))

    def _mark(self, offset: int, length: int, value: int) -> tuple[int, int]:
        self._require_writable()
        chunks = self._whole_chunks(offset, length)
        if not chunks:
            return offset, 0
        for index in chunks:
            self._map[index] = value
        self._dirty = True
        start = chunks[0] * self._chunk
        return start, min(chunks[-1] * self._chunk + self._chunk, offset + length) - start

    def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        return self._mark(offset, length, _ZERO)

    def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        return self._mark(offset, length, _ZERO)

    def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        return self._mark(offset, length, _UNALLOCATED)

    def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        return self._mark(offset, length, _UNALLOCATED)

    def readv_special(self, buffers: Sequence[WritableBuffer], offset: int) -> None:
        raise UnsupportedError("chunkmap has no special (encoded) data")

    def flush(self) -> None:
        if self._dirty:
            self._write_map()
        self._storage.flush()

    def _write_map(self) -> None:
        self._storage.write(struct.pack(f"<{len(self._map)}Q", *self._map), self._map_offset)
        self._dirty = False

    def sync(self) -> None:
        self._storage.sync()

    def invalidate_cache(self) -> None:
        entries = len(self._map)
        raw = self._storage.read(self._map_offset, entries * 8)
        self._map = list(struct.unpack(f"<{entries}Q", raw))
        self._dirty = False

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        self._require_writable()
        old_size = self._size
        entries = -(-new_size // self._chunk)
        if entries > _MAX_MAP_ENTRIES:
            raise InvalidRequestError(f"chunkmap cannot address {new_size} bytes")
        if entries > len(self._map):
            # A larger map goes to the end of the file; the header is switched after it.
            self._map += [_UNALLOCATED] * (entries - len(self._map))
            self._map_offset = self._end
            self._end += -(-entries * 8 // self._chunk) * self._chunk
            self._write_map()
        self._size = new_size
        self._write_header()
        if prealloc is not PreallocateMode.NONE:
            # The old last chunk may hold data past the old end (from before a shrink).
            within = old_size % self._chunk
            if within and self._entry(old_size // self._chunk) > _ZERO:
                storage, host, n = self.ensure_data_mapping(old_size, self._chunk - within, True)
                storage.write_zeroes(host, n)
            first = -(-old_size // self._chunk)
            for index in range(first, entries):
                self._map[index] = _ZERO
            self._dirty = True

    def resize_shrink(self, new_size: int) -> None:
        self._require_writable()
        for index in range(-(-new_size // self._chunk), len(self._map)):
            self._map[index] = _UNALLOCATED
        self._dirty = True
        self._size = new_size
        self._write_header()

    def _write_header(self) -> None:
        self._storage.write(struct.pack("<QQQ", self._size, self._map_offset,
                                        len(self._map)), 16)

    def close(self) -> None:
        self._storage.close()


def create_image(
    target: str | os.PathLike[str] | Storage,
    size: int,
    *,
    format: str = "chunkmap",
    chunk_size: int = 65536,
    backing_file: str | None = None,
    **options: Any,
) -> None:
    """Create an empty chunkmap image (``backing_fmt`` is accepted and ignored)."""
    options.pop("backing_fmt", None)
    if options or format != "chunkmap":
        raise UnsupportedError(f"chunkmap: unsupported options {sorted(options)} / {format}")
    name = (backing_file or "").encode()
    entries = -(-size // chunk_size)
    header = _HEADER.pack(MAGIC, chunk_size, len(name), size, chunk_size, entries) + name
    if len(header) > chunk_size:
        raise InvalidRequestError("chunkmap: backing name does not fit in the first chunk")
    data = header.ljust(chunk_size, b"\0") + bytes(entries * 8)
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            f.write(data)
    else:
        target.resize(0)
        target.write(data, 0)


def open_image(
    target: str | os.PathLike[str] | Storage,
    *,
    writable: bool = False,
    format: str | None = None,
    backing: Any = AUTO,
) -> FormatAccess:
    """Open a chunkmap image; a backing file it names is opened with pyimago.reference."""
    from pyimago.reference import open_image as open_any

    if isinstance(target, (str, os.PathLike)):
        path: str | None = os.fspath(target)
        storage: Storage = FileStorage(path, writable=writable)
    else:
        path, storage = None, target
    driver = ChunkMapDriver(storage, writable=writable)
    if backing is not AUTO:
        driver.set_backing(backing)
    elif driver.backing_file:
        if path is None:
            raise InvalidRequestError("chunkmap on a storage object: pass backing= explicitly")
        folder = os.path.dirname(os.path.abspath(path))
        driver.set_backing(open_any(os.path.join(folder, driver.backing_file)))
    return FormatAccess(driver)


def target() -> object:
    """The oracle target for this format (see ``pyimago.oracle.run_driver_conformance``)."""
    from pyimago.oracle import DriverTarget  # type: ignore[attr-defined]

    return DriverTarget(
        name="chunkmap",
        create_image=create_image,
        open_image=open_image,
        formats=("chunkmap",),
    )


if __name__ == "__main__":
    mem = MemoryStorage()
    create_image(mem, 1 << 20, chunk_size=4096)
    with open_image(mem, writable=True) as img:
        img.write(b"hello chunkmap", 5000)
    with open_image(mem) as img:
        print(img.read(5000, 14), img.get_mapping(4096, 1 << 20))

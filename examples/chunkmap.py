"""chunkmap: a small sparse disk-image format of our own, fuzzed against pyimago's oracle.

This is what a third-party format driver looks like: a class that follows
``pyimago.reference.FormatDriver``, wrapped in ``pyimago.reference.FormatAccess`` (which does
the guest I/O: reads, writes, copy-on-write, zeroing, backing chains), plus
``create_image`` / ``open_image`` and a ``target()`` that tells the oracle what it supports::

    pyimago fuzz chunkmap:target          # from this folder

On-disk layout (all numbers little-endian)::

    0       8   magic  b"CHUNKMAP"
    8       4   chunk size (a power of two, 512 .. 1 MiB)
    12      4   backing file name length (0: no backing file)
    16      8   disk size in bytes
    24      8   map offset (a multiple of the chunk size)
    32      8   map entries
    40    ...   backing file name (UTF-8), inside the first chunk

    map: one u64 per chunk: 0 unallocated (the backing shows through, else zeroes),
         1 explicit zeroes, otherwise the host offset of the chunk's data (chunk-aligned).

New chunks are appended at the end of the file; freed chunks are not reused (the format
keeps no free list: it is a sample, not a product).  The map is cached and written back by
``flush``; the header is written through.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyimago.reference import (
    AUTO,
    CorruptImageError,
    EofMapping,
    FileStorage,
    FormatAccess,
    IndirectMapping,
    InvalidRequestError,
    PreallocateMode,
    RawMapping,
    ReadOnlyError,
    ShallowMapping,
    Storage,
    UnsupportedError,
    WritableBuffer,
    ZeroMapping,
)
from pyimago.reference import open_image as open_reference_image

if TYPE_CHECKING:
    from pyimago.oracle import DriverTarget

__all__ = ["MAGIC", "ChunkMapDriver", "create_image", "open_image", "target"]

MAGIC = b"CHUNKMAP"
_HEADER = struct.Struct("<8sIIQQQ")
_SIZE_FIELDS = struct.Struct("<QQQ")  # disk size, map offset, map entries: bytes 16..40
_UNALLOCATED = 0
_ZERO = 1
_MAX_MAP_ENTRIES = 1 << 22
_PREALLOCATION = {
    "off": PreallocateMode.NONE,
    "metadata": PreallocateMode.FORMAT_ALLOCATE,
    "falloc": PreallocateMode.FULL_ALLOCATE,
    "full": PreallocateMode.WRITE_DATA,
}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


class ChunkMapDriver:
    """A chunkmap image on a storage, optionally over a backing image."""

    def __init__(self, storage: Storage, *, writable: bool = False) -> None:
        if writable and not storage.writable:
            raise ReadOnlyError(f"{storage} is read-only")
        self._storage = storage
        self._writable = writable
        self._backing: FormatAccess | None = None
        self._own_backing = False
        fields: tuple[bytes, int, int, int, int, int] = _HEADER.unpack(
            storage.read(0, _HEADER.size)
        )
        magic, chunk, name_len, size, map_offset, entries = fields
        if magic != MAGIC:
            raise CorruptImageError(f"not a chunkmap image: magic {magic!r}")
        if chunk < 512 or chunk > 1 << 20 or chunk & (chunk - 1):
            raise CorruptImageError(f"chunkmap chunk size {chunk} is not a power of two")
        if entries > _MAX_MAP_ENTRIES or entries * chunk < size:
            raise CorruptImageError(f"chunkmap map of {entries} entries cannot hold {size} B")
        if map_offset % chunk or map_offset < chunk or name_len > chunk - _HEADER.size:
            raise CorruptImageError(f"chunkmap map offset {map_offset} is invalid")
        self._chunk = chunk
        self._size = size
        self._map_offset = map_offset
        name = storage.read(_HEADER.size, name_len)
        self.backing_file = name.decode("utf-8", "surrogateescape") if name_len else None
        self._map = self._read_map(entries)
        self._dirty = False
        # Where the next chunk goes: past the data, the map and anything else in the file.
        self._end = _round_up(max(storage.size(), map_offset + entries * 8), chunk)

    # -- the FormatDriver protocol: properties ------------------------------------------------

    def set_backing(self, backing: FormatAccess | None, *, owned: bool = False) -> None:
        self._backing = backing
        self._own_backing = owned

    @property
    def backing(self) -> FormatAccess | None:
        return self._backing

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

    # -- mappings -----------------------------------------------------------------------------

    def _entry(self, index: int) -> int:
        entry = self._map[index]
        if entry > _ZERO and entry % self._chunk:
            raise CorruptImageError(f"chunkmap entry {index} has misaligned offset {entry}")
        return entry

    def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        if offset >= self._size:
            return EofMapping(), 0
        index, within = divmod(offset, self._chunk)
        limit = min(max_length, self._size - offset)
        entry = self._entry(index)
        length = min(self._chunk - within, limit)
        # Following chunks that continue the same mapping extend it.
        while length < limit:
            index += 1
            following = self._entry(index)
            if entry > _ZERO:
                if following != entry + (index * self._chunk - offset + within):
                    break
            elif following != entry:
                break
            length = min(length + self._chunk, limit)
        if entry == _ZERO:
            return ZeroMapping(True), length
        if entry != _UNALLOCATED:
            return RawMapping(self._storage, entry + within, self._writable), length
        if self._backing is not None:
            return IndirectMapping(self._backing, offset, False), length
        return ZeroMapping(False), length

    def readv_special(self, buffers: Sequence[WritableBuffer], offset: int) -> None:
        raise UnsupportedError("chunkmap has no special (encoded) data")

    # -- allocation ---------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self._writable:
            raise ReadOnlyError(f"{self} is read-only")

    def _chunk_content(self, index: int, entry: int) -> bytes:
        """What the guest sees in a whole chunk now: the source of copy-on-write."""
        if entry == _UNALLOCATED and self._backing is not None:
            return self._backing.read(index * self._chunk, self._chunk)
        return bytes(self._chunk)

    def _allocate(self, index: int, content: bytes | None) -> int:
        """Give chunk ``index`` a fresh host chunk holding ``content`` (None: zeroes)."""
        host = self._end
        self._end += self._chunk
        if content is None:
            self._storage.write_zeroes(host, self._chunk)
        else:
            self._storage.write(content, host)
        self._map[index] = host
        self._dirty = True
        return host

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        self._require_writable()
        index, within = divmod(offset, self._chunk)
        length = min(length, self._chunk - within)
        entry = self._entry(index)
        if entry > _ZERO:
            return self._storage, entry + within, length
        whole = overwrite and within == 0 and length == self._chunk
        host = self._allocate(index, None if whole else self._chunk_content(index, entry))
        return self._storage, host + within, length

    # -- zeroing and discarding ---------------------------------------------------------------

    def _whole_chunks(self, offset: int, length: int) -> range:
        # The disk end counts as a chunk boundary.
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

    # -- resize -------------------------------------------------------------------------------

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        self._require_writable()
        old_size = self._size
        if new_size <= old_size:
            return
        entries = -(-new_size // self._chunk)
        if entries > _MAX_MAP_ENTRIES:
            raise InvalidRequestError(f"chunkmap cannot address {new_size} bytes")
        if entries > len(self._map):
            # A larger map goes to the end of the file; the header then switches to it.
            self._map += [_UNALLOCATED] * (entries - len(self._map))
            self._map_offset = self._end
            self._end += _round_up(entries * 8, self._chunk)
            self._write_map()
        self._size = new_size
        self._write_header()
        if prealloc is PreallocateMode.NONE:
            return
        # The chunk the old end cut short may show stale data (from before a shrink) or the
        # backing past the old end: the new area must read zero.
        index, within = divmod(old_size, self._chunk)
        entry = self._entry(index) if within else _ZERO
        if entry > _ZERO or (entry == _UNALLOCATED and self._backing is not None):
            storage, host, n = self.ensure_data_mapping(old_size, self._chunk - within, False)
            storage.write_zeroes(host, n)
        first = -(-old_size // self._chunk)
        for index in range(first, entries):
            if prealloc in (PreallocateMode.FULL_ALLOCATE, PreallocateMode.WRITE_DATA):
                self._allocate(index, None)
            else:
                self._map[index] = _ZERO
        self._dirty = True

    def resize_shrink(self, new_size: int) -> None:
        self._require_writable()
        for index in range(-(-new_size // self._chunk), len(self._map)):
            self._map[index] = _UNALLOCATED
        self._dirty = True
        self._size = new_size
        self._write_header()

    # -- metadata I/O and lifetime ------------------------------------------------------------

    def _read_map(self, entries: int) -> list[int]:
        raw = self._storage.read(self._map_offset, entries * 8)
        return list(struct.unpack(f"<{entries}Q", raw))

    def _write_map(self) -> None:
        self._storage.write(struct.pack(f"<{len(self._map)}Q", *self._map), self._map_offset)
        self._dirty = False

    def _write_header(self) -> None:
        fields = _SIZE_FIELDS.pack(self._size, self._map_offset, len(self._map))
        self._storage.write(fields, 16)

    def flush(self) -> None:
        if self._dirty:
            self._write_map()
        self._storage.flush()

    def sync(self) -> None:
        self._storage.sync()

    def invalidate_cache(self) -> None:
        self._map = self._read_map(len(self._map))
        self._dirty = False
        self._storage.invalidate_cache()

    def close(self) -> None:
        try:
            self._storage.close()
        finally:
            if self._backing is not None and self._own_backing:
                self._backing.close()


def create_image(
    target: str | os.PathLike[str] | Storage,
    size: int,
    *,
    format: str = "chunkmap",
    chunk_size: int = 65536,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    preallocation: str = "off",
) -> None:
    """Create a chunkmap image (``backing_fmt`` is accepted and not stored: backing files are
    probed)."""
    if format != "chunkmap":
        raise UnsupportedError(f"chunkmap cannot create {format!r} images")
    if chunk_size < 512 or chunk_size > 1 << 20 or chunk_size & (chunk_size - 1):
        raise InvalidRequestError(f"chunk_size must be a power of two in [512, 1 MiB]: "
                                  f"{chunk_size}")
    if preallocation not in _PREALLOCATION:
        raise InvalidRequestError(f"preallocation must be one of {sorted(_PREALLOCATION)}")
    if backing_file is not None and preallocation != "off":
        raise InvalidRequestError("preallocation would hide the backing file")
    name = (backing_file or "").encode()
    if _HEADER.size + len(name) > chunk_size:
        raise InvalidRequestError("chunkmap: backing file name does not fit in the first chunk")
    entries = -(-size // chunk_size)
    # The image starts empty (size 0) and grows, so creating preallocated is just a grow.
    header = _HEADER.pack(MAGIC, chunk_size, len(name), 0, chunk_size, entries) + name
    data = header.ljust(chunk_size, b"\0") + bytes(entries * 8)
    storage: Storage
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            f.write(data)
        storage = FileStorage(target, writable=True)
    else:
        storage = target
        storage.resize(0)
        storage.write(data, 0)
    driver = ChunkMapDriver(storage, writable=True)
    try:
        driver.resize_grow(size, _PREALLOCATION[preallocation])
        driver.flush()
    finally:
        if storage is not target:
            storage.close()


def open_image(
    target: str | os.PathLike[str] | Storage,
    *,
    writable: bool = False,
    format: str | None = None,
    backing: Any = AUTO,
) -> FormatAccess:
    """Open a chunkmap image.  The backing file it names is opened read-only (a chunkmap
    backing with this function, any other with ``pyimago.reference``); for a Storage object
    pass ``backing=`` (a FormatAccess or None) instead."""
    if format not in (None, "chunkmap"):
        raise UnsupportedError(f"chunkmap cannot open {format!r} images")
    path = os.fspath(target) if isinstance(target, (str, os.PathLike)) else None
    storage = FileStorage(path, writable=writable) if path is not None else target
    assert isinstance(storage, Storage)
    try:
        driver = ChunkMapDriver(storage, writable=writable)
        if backing is not AUTO:
            driver.set_backing(backing)
        elif driver.backing_file:
            if path is None:
                raise InvalidRequestError("chunkmap on a storage object: pass backing=")
            folder = os.path.dirname(os.path.abspath(path))
            backing_path = os.path.join(folder, driver.backing_file)
            with open(backing_path, "rb") as f:
                is_chunkmap = f.read(len(MAGIC)) == MAGIC
            opener = open_image if is_chunkmap else open_reference_image
            driver.set_backing(opener(backing_path), owned=True)
    except BaseException:
        if path is not None:
            storage.close()
        raise
    return FormatAccess(driver)


def target() -> DriverTarget:
    """What the oracle needs to fuzz chunkmap (``pyimago fuzz chunkmap:target``)."""
    from pyimago.oracle import DriverTarget, Layout

    return DriverTarget(
        name="chunkmap",
        format="chunkmap",
        create_image=create_image,
        open_image=open_image,
        layouts=tuple(Layout(size, chunk_size=size) for size in (512, 1024, 4096, 65536)),
    )


if __name__ == "__main__":
    from pyimago.reference import MemoryStorage

    mem = MemoryStorage()
    create_image(mem, 1 << 20, chunk_size=4096)
    with open_image(mem, writable=True) as img:
        img.write(b"hello chunkmap", 5000)
    with open_image(mem) as img:
        print(img.read(5000, 14), img.get_mapping(4096, 1 << 20))

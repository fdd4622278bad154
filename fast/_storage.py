"""File storage that reads small requests through ``mmap``, large ones with ``preadv``, and
writes with ``pwrite``.

Measured on the project's machine (2 cores, a 256 MiB file in tmpfs, a fresh map per pass,
CPU MB/s -- the machine is shared, so CPU time, not wall time, compares the two):

    request        mmap copy   preadv
    4 KiB seq      6250        5220
    16 KiB seq     9190        9260
    64 KiB seq     10030       11320
    256 KiB seq    10370       12990
    1 MiB seq      9300        11580
    4 KiB random   4210        3520

For 1 MiB sequential reads from a fresh map the alternatives measured no better: madvise
MADV_SEQUENTIAL 9370, MADV_WILLNEED before each request 9630, MADV_POPULATE_READ before each
request 7930 (CPU MB/s, as above); MAP_POPULATE costs 44 ms per 256 MiB at open and maps
the whole file.  A first touch of a mapped page costs a fault, a ``preadv`` costs a system
call: from 16 KiB on the call is cheaper, so larger requests are read with ``preadv`` (which
also releases the GIL and leaves nothing mapped) and smaller ones are copied out of the map.
Random 4 KiB reads from a freshly opened file (every request a new page; 256 MiB in tmpfs,
CPU ns per request, medians of five runs): a copy out of a prefaulted map 630 (no fresh
handle has one: MAP_POPULATE at open costs ~380 ns a page, in the open), out of a fresh map
955 (the kernel maps 64 KiB around each fault), the same with MADV_RANDOM no better,
``preadv`` 1175, and populating each 64 KiB..8 MiB stretch of the map on its first touch
(MADV_POPULATE_READ) 1070..1200.  So small reads stay copies out of a plain fresh map.
A map's pages count in the process's RSS while mapped (reclaimable page cache, not private
memory): tables, decoded once, are read with :meth:`pread`.  Ranges the map does not cover
(the file grew since it was mapped, or could not be mapped) are served by ``preadv`` too.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from typing import ClassVar

from pyimago.reference._errors import (
    ImageAccessError,
    ImageNotFoundError,
    InvalidRequestError,
    ReadOnlyError,
)
from pyimago.reference._prealloc import PreallocateMode
from pyimago.reference._storage import Buffer, WritableBuffer

from ._lock import lock_fd, validate

__all__ = ["MAP_MAX", "MAX_STORAGE_OFFSET", "FastFileStorage", "fill_zero"]

MAX_STORAGE_OFFSET = (1 << 63) - 1
_ZEROS = memoryview(bytes(1 << 20))
#: Requests up to this size are copied out of the map; larger ones are read with preadv.
MAP_MAX = 16 << 10
#: Remap only once the file outgrew the map by this much: remapping costs page faults.
_REMAP_GROWTH = 64 << 20


def fill_zero(view: memoryview) -> None:
    """Zero a byte view without allocating more than 1 MiB."""
    for at in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - at)
        view[at : at + n] = _ZEROS[:n]


def _bytes_of(buf: Buffer) -> memoryview:
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _in_bounds(offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > MAX_STORAGE_OFFSET:
        raise InvalidRequestError(
            f"storage range offset={offset} length={length} is outside [0, 2^63)"
        )


def _path_of(path: object) -> str:
    if isinstance(path, str) and path:
        return path
    if isinstance(path, os.PathLike):
        got = os.fspath(path)
        if isinstance(got, str) and got:
            return got
    raise InvalidRequestError(f"image path {path!r}: expected a non-empty str or os.PathLike")


def _open_file(path: str, writable: bool) -> int:
    """A descriptor for an image file; pyimago errors name the path (storage.open.errors)."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ImageNotFoundError(f"{path}: no such image file", filename=path) from exc
    except IsADirectoryError as exc:
        raise InvalidRequestError(f"{path}: a folder is not an image file") from exc
    except PermissionError as exc:
        raise ImageAccessError(f"{path}: access denied ({exc.strerror})", filename=path) from exc
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidRequestError(f"{path}: a folder is not an image file")
    return fd


class FastFileStorage:
    """A file opened by pyimago.fast (Storage protocol; thread-safe)."""

    #: Buffered I/O: any offset and any buffer address will do.
    req_align: ClassVar[int] = 1
    mem_align: ClassVar[int] = 1

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        use_mmap: bool = True,
        locking: str = "auto",
        force_share: bool = False,
    ) -> None:
        validate(locking, force_share, writable)
        self.path = self.name = _path_of(path)
        self.writable = writable
        self._fd: int | None = _open_file(self.path, writable)
        try:
            #: Whether QEMU-compatible image locks are held on the file.
            self.locked = lock_fd(self._fd, self.path, writable, locking, force_share)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._use_mmap = use_mmap
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        #: The map's bytes (None: not mapped) and how many: the qcow2 layer's hot read
        #: path copies out of them directly.
        self.mapped: memoryview | None = None
        self.mapped_size = 0
        self._file_size = os.lseek(self._fd, 0, os.SEEK_END)
        self._remap()

    def __str__(self) -> str:
        return f"file:{self.path}"

    def __repr__(self) -> str:
        return f"<FastFileStorage {self.path}>"

    # -- the map --------------------------------------------------------------------------

    def _unmap(self) -> None:
        view, mm = self.mapped, self._map
        self.mapped = self._map = None
        self.mapped_size = 0
        if view is not None:
            view.release()
        if mm is not None:
            # A reader in another thread may still hold a slice; the map then goes with it.
            with contextlib.suppress(BufferError):
                mm.close()

    def _remap(self) -> None:
        self._unmap()
        if not self._use_mmap or self._fd is None or self._file_size == 0:
            return
        try:
            mm = mmap.mmap(self._fd, self._file_size, prot=mmap.PROT_READ)
        except (OSError, ValueError, OverflowError):
            self._use_mmap = False
            return
        self._map = mm
        self.mapped = memoryview(mm)
        self.mapped_size = self._file_size

    # -- Storage protocol -----------------------------------------------------------------

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self}: the storage is closed")
        return self._fd

    def size(self) -> int:
        # Every change of size goes through this object; others are seen after
        # invalidate_cache().  Saves a syscall per request on raw images.
        self._open_fd()
        return self._file_size

    def readinto(self, buf: WritableBuffer, offset: int) -> None:
        view = buf if type(buf) is memoryview and buf.format == "B" else _bytes_of(buf)
        n = len(view)
        end = offset + n
        mv = self.mapped
        if n <= MAP_MAX:
            if mv is not None and offset >= 0 and end <= self.mapped_size:
                view[:] = mv[offset:end]
                return
            _in_bounds(offset, n)
            outgrown = self._file_size - self.mapped_size >= max(_REMAP_GROWTH, self.mapped_size)
            if self._use_mmap and outgrown and end <= self._file_size:
                with self._lock:
                    self._remap()
        else:
            _in_bounds(offset, n)
        self.pread_into(view, offset)

    def pread_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with ``preadv`` (releases the GIL); zeroes past the end of file."""
        fd = self._fd
        if fd is None:
            fd = self._open_fd()  # (raises)
        n = len(view)
        got = os.preadv(fd, [view], offset)
        while got < n:
            more = os.preadv(fd, [view[got:]], offset + got)
            if not more:
                fill_zero(view[got:])
                break
            got += more

    def pread(self, offset: int, length: int) -> bytes:
        """Read with ``pread`` (not through the map): for data read once, e.g. tables."""
        _in_bounds(offset, length)
        data = os.pread(self._open_fd(), length, offset)
        if len(data) == length:
            return data
        buf = bytearray(length)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def read(self, offset: int, length: int) -> bytes:
        mv = self.mapped
        if length > MAP_MAX:
            return self.pread(offset, length)
        if mv is not None and offset >= 0 and length >= 0 and offset + length <= self.mapped_size:
            return mv[offset : offset + length].tobytes()
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def _writing(self, offset: int, length: int) -> int:
        """The descriptor to write ``[offset, offset+length)`` with, or the reason not to."""
        fd = self._fd
        if fd is None or not self.writable or offset < 0 or length < 0:
            if not self.writable:
                raise ReadOnlyError(f"{self}: opened read-only")
            _in_bounds(offset, length)
            return self._open_fd()
        if offset + length > MAX_STORAGE_OFFSET:
            _in_bounds(offset, length)
        return fd

    def write(self, data: Buffer, offset: int) -> None:
        view = data if type(data) is memoryview and data.format == "B" else _bytes_of(data)
        n = len(view)
        fd = self._writing(offset, n)
        at = os.pwrite(fd, view, offset)
        while at < n:
            at += os.pwrite(fd, view[at:], offset + at)
        if offset + n > self._file_size:
            self._file_size = offset + n

    def _pwrite_zeroes(self, fd: int, start: int, end: int) -> None:
        while start < end:
            start += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - start)], start)

    def write_zeroes(self, offset: int, length: int) -> None:
        fd = self._writing(offset, length)
        end = offset + length
        if end > self._file_size:
            # Past the end of file a hole reads as zero: extend instead of writing there.
            written_to = self._file_size
            os.ftruncate(fd, end)
            self._file_size = end
            end = max(offset, written_to)
        self._pwrite_zeroes(fd, offset, end)

    def discard(self, offset: int, length: int) -> None:
        # Advisory: the stdlib cannot punch holes, so the data simply stays.
        self._writing(offset, length)

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        fd = self._writing(new_size, 0)
        old = os.lseek(fd, 0, os.SEEK_END)
        with self._lock:
            if new_size < self.mapped_size:
                # Pages past a truncation would raise SIGBUS: drop the map first.
                self._unmap()
            os.ftruncate(fd, new_size)
            self._file_size = new_size
        if new_size <= old or prealloc in (PreallocateMode.NONE, PreallocateMode.ZERO):
            return
        if prealloc is PreallocateMode.WRITE_DATA:
            self._pwrite_zeroes(fd, old, new_size)
            return
        try:
            os.posix_fallocate(fd, old, new_size - old)
        except OSError:
            self._pwrite_zeroes(fd, old, new_size)

    def flush(self) -> None:
        # pwrite goes straight to the kernel: no user-space buffer to write back.
        self._open_fd()

    def sync(self) -> None:
        os.fsync(self._open_fd())

    def invalidate_cache(self) -> None:
        fd = self._open_fd()
        with self._lock:
            self._file_size = os.lseek(fd, 0, os.SEEK_END)
            if self._file_size < self.mapped_size:
                self._unmap()

    def close(self) -> None:
        with self._lock:
            self._unmap()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

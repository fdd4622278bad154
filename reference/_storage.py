"""Storage objects: the byte containers images live in (files, memory).

The contract every storage follows (and that a third party's storage must follow too):
reads never come back short and read zeroes past the end of the storage, as QEMU's file
driver does (QEMU's own images end mid-cluster); writes past the end extend it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import Protocol, runtime_checkable

from ._errors import ImageAccessError, ImageNotFoundError, InvalidRequestError, ReadOnlyError
from ._prealloc import PreallocateMode
from .locking import lock_image

__all__ = [
    "Buffer",
    "FileStorage",
    "MemoryStorage",
    "Storage",
    "WritableBuffer",
]

Buffer = bytes | bytearray | memoryview
WritableBuffer = bytearray | memoryview

#: Largest offset or size a storage accepts (QEMU's limit for image files, 2^63 - 1).
MAX_STORAGE_OFFSET = (1 << 63) - 1

_ZERO_CHUNK = bytes(1 << 20)


@runtime_checkable
class Storage(Protocol):
    """What a format driver needs from the container an image lives in."""

    @property
    def name(self) -> str: ...

    @property
    def writable(self) -> bool: ...

    @property
    def req_align(self) -> int: ...

    @property
    def mem_align(self) -> int: ...

    def size(self) -> int: ...

    def readinto(self, buf: WritableBuffer, offset: int) -> None: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, data: Buffer, offset: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None: ...

    def flush(self) -> None: ...

    def sync(self) -> None: ...

    def invalidate_cache(self) -> None: ...

    def close(self) -> None: ...


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > MAX_STORAGE_OFFSET:
        raise InvalidRequestError(
            f"storage range offset={offset} length={length} is outside [0, 2^63)"
        )


class _StorageBase:
    """What every pyimago storage shares: its name, writability, alignment and ``read``."""

    def __init__(self, name: str, writable: bool) -> None:
        self._name = name
        self._writable = writable

    @property
    def name(self) -> str:
        return self._name

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def req_align(self) -> int:
        return 1

    @property
    def mem_align(self) -> int:
        return 1

    def readinto(self, buf: WritableBuffer, offset: int) -> None:
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def _require_writable(self) -> None:
        if not self._writable:
            raise ReadOnlyError(f"storage {self._name} is read-only")


class MemoryStorage(_StorageBase):
    """Storage in a ``bytearray``.

    Closing it keeps the bytes, so an image in memory survives ``close()`` and can be opened
    again from the same object.  ``snapshot()`` returns a copy of the current bytes.
    """

    def __init__(
        self, data: Buffer = b"", *, name: str = "memory", writable: bool = True
    ) -> None:
        super().__init__(name, writable)
        self._data = bytearray(data)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"{self._name}[{len(self._data)}B]"

    def size(self) -> int:
        return len(self._data)

    def snapshot(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def readinto(self, buf: WritableBuffer, offset: int) -> None:
        view = memoryview(buf).cast("B")
        _check_range(offset, len(view))
        with self._lock, memoryview(self._data) as data:  # (a view: one copy, not two)
            avail = max(0, min(len(view), len(self._data) - offset))
            view[:avail] = data[offset : offset + avail]
            view[avail:] = bytes(len(view) - avail)

    def read(self, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        with self._lock, memoryview(self._data) as data:
            out = bytes(data[offset : offset + length])
        return out if len(out) == length else out + bytes(length - len(out))

    def write(self, data: Buffer, offset: int) -> None:
        self._require_writable()
        view = memoryview(data).cast("B")
        _check_range(offset, len(view))
        with self._lock:
            end = offset + len(view)
            if end > len(self._data):
                self._data.extend(bytes(end - len(self._data)))
            self._data[offset:end] = view

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_writable()
        _check_range(offset, length)
        with self._lock:
            # storage.write.extends: zeroes written past the end extend the storage, as any
            # other write does.
            end = offset + length
            if end > len(self._data):
                self._data.extend(bytes(end - len(self._data)))
            self._data[offset:end] = bytes(length)

    def discard(self, offset: int, length: int) -> None:
        # Memory has no holes to punch; zeroing is a valid "discard" result.
        self.write_zeroes(offset, length)

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        self._require_writable()
        _check_range(new_size, 0)
        with self._lock:
            if new_size < len(self._data):
                del self._data[new_size:]
            else:
                self._data.extend(bytes(new_size - len(self._data)))

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def invalidate_cache(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_image_file(path: object, writable: bool) -> tuple[str, int]:
    """Open an image file: its path (checked) and a descriptor, or a pyimago error naming it.

    storage.open.errors: a missing file, a folder, a file the OS refuses, or a path that is
    not a path at all give ImageNotFoundError, InvalidRequestError or ImageAccessError.
    """
    if not isinstance(path, (str, bytes, os.PathLike)) or isinstance(path, bytes):
        raise InvalidRequestError(f"an image path must be a str or os.PathLike, not {path!r}")
    name = os.fspath(path)
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"an image path must be a non-empty str, not {path!r}")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags)
    except FileNotFoundError as exc:
        raise ImageNotFoundError(f"image file {name} does not exist", filename=name) from exc
    except IsADirectoryError as exc:
        raise InvalidRequestError(f"{name} is a folder, not an image file") from exc
    except PermissionError as exc:
        raise ImageAccessError(
            f"cannot open {name} {'writable' if writable else 'read-only'}: {exc.strerror}",
            filename=name,
        ) from exc
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidRequestError(f"{name} is a folder, not an image file")
    return name, fd


def make_image_file(path: object) -> None:
    """Create ``path`` if missing (an existing file is left as it is, not truncated)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidRequestError(f"an image path must be a str or os.PathLike, not {path!r}")
    name = os.fspath(path)
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644))
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        # open_image_file says what is wrong with the path, naming it.
        open_image_file(name, True)
        raise


class FileStorage(_StorageBase):
    """Storage in a file, accessed with ``os.pread``/``os.pwrite`` (thread-safe).

    The file is locked as QEMU locks image files (``locking``: "auto" locks where the OS has
    OFD locks, "on" insists, "off" does not lock; ``force_share`` for a read-only open takes
    no lock that keeps writers out, as ``qemu-img -U``): a conflicting open by QEMU or by
    pyimago raises :class:`ImageInUseError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        locking: str = "auto",
        force_share: bool = False,
    ) -> None:
        self._path, fd = open_image_file(path, writable)
        super().__init__(self._path, writable)
        self._fd: int | None = fd
        try:
            self._locked = lock_image(fd, self._path, writable=writable, locking=locking,
                                      force_share=force_share)
        except BaseException:
            self.close()
            raise

    @property
    def locked(self) -> bool:
        """Whether this storage holds QEMU-compatible locks on its file."""
        return self._locked

    def __str__(self) -> str:
        return f"file:{self._path}"

    @property
    def path(self) -> str:
        return self._path

    def _fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"I/O on closed storage {self._path}")
        return self._fd

    def size(self) -> int:
        return os.fstat(self._fileno()).st_size

    def readinto(self, buf: WritableBuffer, offset: int) -> None:
        view = memoryview(buf).cast("B")
        _check_range(offset, len(view))
        fd = self._fileno()
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                # End of file: the rest reads as zeroes.
                view[done:] = bytes(len(view) - done)
                return
            done += n

    def write(self, data: Buffer, offset: int) -> None:
        self._require_writable()
        view = memoryview(data).cast("B")
        _check_range(offset, len(view))
        fd = self._fileno()
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_writable()
        _check_range(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            n = min(len(_ZERO_CHUNK), end - pos)
            self.write(memoryview(_ZERO_CHUNK)[:n], pos)
            pos += n

    def discard(self, offset: int, length: int) -> None:
        # Discarding is advisory: the stdlib cannot punch holes, so the data simply stays.
        self._require_writable()
        _check_range(offset, length)

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        self._require_writable()
        _check_range(new_size, 0)
        fd = self._fileno()
        old_size = self.size()
        os.ftruncate(fd, new_size)
        if new_size <= old_size:
            return
        # Only FULL_ALLOCATE and WRITE_DATA concern storage: FORMAT_ALLOCATE allocates the
        # image format's metadata, which a plain file does not have.
        if prealloc is PreallocateMode.FULL_ALLOCATE:
            try:
                os.posix_fallocate(fd, old_size, new_size - old_size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.write_zeroes(old_size, new_size - old_size)
        elif prealloc is PreallocateMode.WRITE_DATA:
            self.write_zeroes(old_size, new_size - old_size)

    def flush(self) -> None:
        # pwrite() goes straight to the kernel: there is no user-space buffer to write back.
        self._fileno()

    def sync(self) -> None:
        os.fsync(self._fileno())

    def invalidate_cache(self) -> None:
        self._fileno()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

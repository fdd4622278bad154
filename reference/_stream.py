"""``FormatAccess.stream()``: an image as a file object (``io.RawIOBase``).

The stream reads and writes the guest disk at a file position, so code made for files
(``shutil.copyfileobj``, ``tarfile``, ``hashlib.file_digest``, forensic tools) can use an image
directly.  It works over any object with the public FormatAccess calls (``size``,
``writable``, ``readinto``, ``write``, ``flush``); both implementations return one.
"""

from __future__ import annotations

import errno
import io
import os
from typing import Any

__all__ = ["ImageStream"]


class ImageStream(io.RawIOBase):
    """A seekable, readable (and, for a writable image, writable) view of the guest disk.

    Reads stop at the disk end (a short read there, then b""); writes never grow the disk:
    the part of a write past the end is refused (a short write, or ``ENOSPC`` when nothing
    fits).  Closing the stream flushes a writable image but leaves it open: the image's
    owner closes it.
    """

    def __init__(self, image: Any) -> None:
        super().__init__()
        self._image = image
        self._pos = 0

    def __repr__(self) -> str:
        return f"<ImageStream {self._image} pos={self._pos}>"

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return bool(self._image.writable)

    def seekable(self) -> bool:
        return True

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed ImageStream")

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the position; fewer bytes only at the disk end."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        n: int = max(0, min(len(view), self._image.size - self._pos))
        if n:
            self._image.readinto(view[:n], self._pos)
            self._pos += n
        return n

    def write(self, data: Any) -> int:
        """Write at the position; bytes past the disk end are not written (short write)."""
        self._check_open()
        if not self.writable():
            raise io.UnsupportedOperation(f"{self._image} was opened read-only")
        view = memoryview(data).cast("B")
        n: int = max(0, min(len(view), self._image.size - self._pos))
        if view and not n:
            raise OSError(errno.ENOSPC, f"write at {self._pos} is past the disk end "
                                        f"({self._image.size} bytes)")
        if n:
            self._image.write(view[:n], self._pos)
            self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        if whence == os.SEEK_SET:
            base = 0
        elif whence == os.SEEK_CUR:
            base = self._pos
        elif whence == os.SEEK_END:
            base = self._image.size
        else:
            raise ValueError(f"invalid whence {whence!r} (SEEK_SET, SEEK_CUR or SEEK_END)")
        target = base + offset
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._pos = target
        return target

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("an image stream cannot change the disk size "
                                      "(use FormatAccess.resize)")

    def flush(self) -> None:
        if not self.closed and self._image.writable and not self._image.closed:
            self._image.flush()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an image stream has no file descriptor")

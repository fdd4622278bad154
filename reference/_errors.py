"""The one error root of pyimago and its subclasses.

Each subclass also inherits the builtin exception that callers of a file-like or
block-device-like API would already catch, so ``except OSError`` or ``except ValueError``
keeps working without knowing pyimago.
"""

from __future__ import annotations

import errno
import io

__all__ = [
    "CorruptImageError",
    "DriverError",
    "GateDeniedError",
    "ImageAccessError",
    "ImageInUseError",
    "ImageNotFoundError",
    "InvalidRequestError",
    "ProbedRawWriteError",
    "PyimagoError",
    "ReadOnlyError",
    "UnsupportedError",
    "UnsupportedFeatureError",
]


class PyimagoError(Exception):
    """Root of every error pyimago raises on purpose."""


class ReadOnlyError(PyimagoError, PermissionError):
    """A modifying operation was requested on an image opened read-only."""


class UnsupportedError(PyimagoError, io.UnsupportedOperation):
    """The format or driver does not support the requested operation or mode."""


class UnsupportedFeatureError(UnsupportedError):
    """The image uses a feature this implementation cannot handle (named in the message)."""

    def __init__(self, message: str, *, feature: str) -> None:
        super().__init__(message)
        self.feature = feature


class InvalidRequestError(PyimagoError, ValueError):
    """Bad arguments: out-of-range offsets, overflow, writes past the disk end, bad options."""


class CorruptImageError(PyimagoError, ValueError):
    """The image's metadata is malformed, inconsistent or hostile."""


class GateDeniedError(PyimagoError, PermissionError):
    """The implicit-open gate refused to open a file the image refers to (e.g. its backing)."""


class DriverError(PyimagoError, RuntimeError):
    """A format driver broke the driver protocol (e.g. returned an empty non-EOF mapping)."""


class _FileError(PyimagoError):
    """An error about one file: ``filename`` is its path; the message names it."""

    def __init__(self, message: str, *, filename: str) -> None:
        super().__init__(message)
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ImageNotFoundError(_FileError, FileNotFoundError):
    """An image file (or a backing or data file an image names) does not exist.

    ``filename`` is the path that was looked for; the message names it and, for a file an
    image refers to, the image that names it.
    """


class ImageAccessError(_FileError, PermissionError):
    """The operating system refused access to an image file (``filename`` names it)."""


class ImageInUseError(PyimagoError, BlockingIOError):
    """Another process holds the image with permissions that conflict with this open.

    Raised when QEMU-compatible image locking (``locking=``) finds a conflicting lock: the
    message says "... is in use by another process" and names the permission; ``filename``
    is the image file.
    """

    def __init__(self, message: str, *, filename: str) -> None:
        super().__init__(errno.EAGAIN, message)
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else ""


class ProbedRawWriteError(ReadOnlyError):
    """A write to block 0 of a raw image whose format was probed would change its format.

    As QEMU's raw driver: a write, zeroing or discard touching the first 512 bytes of an image
    opened without ``format=`` that probed as raw is refused if the first sector would then
    probe as another format (``probed_as`` names it).  ``format="raw"`` lifts the restriction.
    """

    def __init__(self, message: str, *, probed_as: str) -> None:
        super().__init__(message)
        self.probed_as = probed_as

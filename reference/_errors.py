"""The one error root of pyimago and its subclasses.

Each subclass also inherits the builtin exception that callers of a file-like or
block-device-like API would already catch, so ``except OSError`` or ``except ValueError``
keeps working without knowing pyimago.
"""

from __future__ import annotations

import io

__all__ = [
    "CorruptImageError",
    "DriverError",
    "GateDeniedError",
    "ImageNotFoundError",
    "InvalidRequestError",
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


class ImageNotFoundError(PyimagoError, FileNotFoundError):
    """An image file (or a backing or data file an image names) does not exist.

    ``filename`` is the path that was looked for; the message names it and, for a file an
    image refers to, the image that names it.
    """

    def __init__(self, message: str, *, filename: str) -> None:
        super().__init__(message)
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

"""Backing files: resolving their names and the gate that decides whether they may be opened.

An image names its backing file itself, so a hostile image can name any file on the machine.
The *implicit-open gate* is asked before any file the caller did not name is opened.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from ._errors import GateDeniedError

__all__ = [
    "DenyImplicitOpenGate",
    "FolderImplicitOpenGate",
    "ImplicitOpenGate",
    "PermissiveImplicitOpenGate",
    "resolve_backing_path",
]


@runtime_checkable
class ImplicitOpenGate(Protocol):
    """Decides whether a file an image refers to may be opened; raises GateDeniedError if not."""

    def check(self, path: str, *, format: str | None, writable: bool, referrer: str) -> None: ...


class PermissiveImplicitOpenGate:
    """Allows every implicit open (what qemu-img does)."""

    def check(self, path: str, *, format: str | None, writable: bool, referrer: str) -> None:
        return None


class DenyImplicitOpenGate:
    """Refuses every implicit open: images must be opened with their backing given explicitly."""

    def check(self, path: str, *, format: str | None, writable: bool, referrer: str) -> None:
        raise GateDeniedError(f"{referrer} refers to backing file {path!r}; implicit opens denied")


class FolderImplicitOpenGate:
    """Allows implicit opens of files inside the given folders only (symlinks resolved)."""

    def __init__(self, *folders: str | os.PathLike[str]) -> None:
        self._folders = [os.path.realpath(f) for f in folders]

    def check(self, path: str, *, format: str | None, writable: bool, referrer: str) -> None:
        real = os.path.realpath(path)
        for folder in self._folders:
            if os.path.commonpath([real, folder]) == folder:
                return
        raise GateDeniedError(
            f"{referrer} refers to backing file {path!r} outside the allowed folders"
        )


def resolve_backing_path(backing_name: str, overlay_path: str | None) -> str:
    """backing.resolve-relative: a relative backing name is relative to the overlay's folder."""
    if os.path.isabs(backing_name) or overlay_path is None:
        return backing_name
    return os.path.join(os.path.dirname(os.path.abspath(overlay_path)), backing_name)

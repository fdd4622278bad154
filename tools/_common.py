"""What every tool shares: choosing the implementation, opening images, qemu's size text."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from pyimago.reference import PyimagoError

__all__ = [
    "IMPLEMENTATIONS",
    "Impl",
    "ToolError",
    "implementation",
    "open_chain",
    "size_to_str",
]

#: Names ``impl=`` accepts, and the module each stands for.
IMPLEMENTATIONS = {"fast": "pyimago.fast", "reference": "pyimago.reference"}

Impl = str | ModuleType


class ToolError(PyimagoError, ValueError):
    """A tool cannot do what it was asked (bad argument, missing file, unsupported request);
    the message is one line naming the offending value."""


def implementation(impl: Impl = "fast") -> ModuleType:
    """The implementation module ``impl`` names (or ``impl`` itself, when a module)."""
    if isinstance(impl, ModuleType):
        module = impl
    elif impl in IMPLEMENTATIONS:
        module = importlib.import_module(IMPLEMENTATIONS[impl])
    else:
        raise ToolError(f"unknown implementation {impl!r} (choose from {sorted(IMPLEMENTATIONS)})")
    for needed in ("open_image", "create_image"):
        if not hasattr(module, needed):
            raise ToolError(f"implementation {module.__name__} has no {needed}()")
    return module


def check_format(fmt: str | None, what: str = "format") -> str | None:
    """``-f``/``-O`` values: qcow2, raw or None (probe)."""
    if fmt is not None and fmt not in ("qcow2", "raw"):
        raise ToolError(f"unknown {what} {fmt!r} (pyimago knows qcow2 and raw)")
    return fmt


def require_file(path: str, what: str = "image") -> None:
    """Refuse a missing or unreadable path up front, naming it."""
    if not os.path.exists(path):
        raise ToolError(f"{what} {path!r}: no such file")
    if os.path.isdir(path):
        raise ToolError(f"{what} {path!r} is a directory")


@contextmanager
def open_chain(
    path: str, *, impl: Impl = "fast", fmt: str | None = None, writable: bool = False
) -> Iterator[Any]:
    """Open ``path`` (and its backing chain) with ``impl``; the image is closed afterwards."""
    require_file(path)
    module = implementation(impl)
    image = module.open_image(path, format=check_format(fmt), writable=writable)
    try:
        yield image
    finally:
        image.close()


def backing_path(overlay: str, name: str) -> str:
    """The path of backing file ``name`` as qemu-img shows it (``full-backing-filename``):
    relative names join the overlay's folder, without normalising ``..``."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(overlay), name)


_SUFFIXES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def size_to_str(value: int) -> str:
    """A size as qemu prints it (util/cutils.c size_to_str: three significant digits)."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    index = int((exp - 1) / 10)
    return f"{value / (1 << (index * 10)):0.3g} {_SUFFIXES[index]}"


def allocated_size(path: str) -> int:
    """Bytes the file occupies on disk (qemu's ``actual-size``: st_blocks * 512)."""
    return os.stat(path).st_blocks * 512

"""What every tool shares: choosing the implementation, opening images, qemu's size text."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from pyimago.reference import FileStorage, PyimagoError, Storage

__all__ = [
    "IMPLEMENTATIONS",
    "Impl",
    "ToolError",
    "implementation",
    "open_chain",
    "open_file_for_writing",
    "require_room",
    "same_file",
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
    path: str, *, impl: Impl = "fast", fmt: str | None = None, writable: bool = False,
    force_share: bool = False, snapshot: str | None = None, no_backing: bool = False,
) -> Iterator[Any]:
    """Open ``path`` (and its backing chain) with ``impl``; the image is closed afterwards.
    ``force_share`` opens read-only without the shared-permission locks (qemu-img ``-U``);
    ``snapshot`` (an internal snapshot's ID) opens that snapshot's contents, read-only;
    ``no_backing`` opens the image alone, without its backing file."""
    require_file(path)
    module = implementation(impl)
    extra: dict[str, Any] = {} if snapshot is None else {"snapshot": snapshot}
    if no_backing:
        extra["backing"] = None
    try:
        image = module.open_image(path, format=check_format(fmt), writable=writable,
                                  force_share=force_share, **extra)
    except (PyimagoError, OSError) as exc:
        # Name the image the user gave: the driver's message may only name a field.
        message = str(exc) if path in str(exc) else f"{path}: {exc}"
        raise ToolError(message) from exc
    try:
        yield image
    finally:
        image.close()


#: Preallocation modes that take the disk's bytes from the file system up front.
_ALLOCATING = frozenset({"falloc", "full"})


def open_file_for_writing(path: str) -> Storage:
    """``path`` as a writable Storage (the reference's FileStorage), holding the file's write
    lock as QEMU's writable open would.  A tool that changes a file's bytes outside an
    image goes through it, never around it, so that each change is one storage mutation
    that power-cut recordings see and that ``sync`` makes durable (crash.power-cut)."""
    try:
        return FileStorage(path, writable=True, locking="auto")
    except PyimagoError as exc:
        raise ToolError(str(exc)) from exc


def require_room(path: str, needed: int, preallocation: object) -> None:
    """Refuse a ``falloc``/``full`` preallocation of ``needed`` bytes for ``path`` that the
    file system cannot hold, before anything is written (qemu-img starts, fills the file
    system and fails on ENOSPC, leaving the file behind)."""
    if preallocation not in _ALLOCATING or needed <= 0:
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fs = os.statvfs(folder)
    except OSError:
        return  # no folder: the create itself reports it
    free = fs.f_bavail * fs.f_frsize
    if needed > free:
        raise ToolError(f"preallocation={preallocation} of {path}: {needed} bytes "
                        f"({size_to_str(needed)}) do not fit in the {free} bytes "
                        f"({size_to_str(free)}) free on its file system")


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (one that may not exist yet)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


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


# -- creation options (qemu-img's -o) -------------------------------------------------------------

#: The -o names pyimago's create_image takes, per format, and how each value is parsed.
_SIZE_OPTIONS = frozenset({"cluster_size", "size"})
_INT_OPTIONS = frozenset({"refcount_bits"})
_STR_OPTIONS = frozenset({"compat", "backing_file", "backing_fmt", "preallocation",
                          "compression_type", "data_file"})
_BOOL_OPTIONS = frozenset({"extended_l2", "data_file_raw", "lazy_refcounts"})
OPTION_NAMES = {
    "qcow2": _SIZE_OPTIONS | _INT_OPTIONS | _STR_OPTIONS | _BOOL_OPTIONS,
    "raw": frozenset({"size", "preallocation"}),
}
#: qemu-img options pyimago knows but cannot honour (a clear "not supported" error).
_UNSUPPORTED = frozenset({"encryption", "encrypt.format", "nocow", "extent_size_hint"})
#: qapi_bool_parse: the words qemu-img takes for on and off.
_BOOLS = {"on": True, "yes": True, "true": True, "y": True,
          "off": False, "no": False, "false": False, "n": False}

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str, what: str = "size") -> int:
    """A byte count as qemu-img reads one: a number with an optional k/M/G/T/P/E suffix
    (powers of 1024); fractions are allowed when the result is whole."""
    body = text.strip()
    suffix = body[-1:].lower() if body[-1:].isalpha() else ""
    number = body[: len(body) - len(suffix)]
    try:
        value = float(number) if "." in number else int(number, 10)
    except ValueError:
        raise ToolError(f"invalid {what} {text!r}") from None
    if suffix not in _UNITS or value < 0:
        raise ToolError(f"invalid {what} {text!r}")
    result = value * _UNITS[suffix]
    if result != int(result) or result >= 1 << 63:
        raise ToolError(f"invalid {what} {text!r}")
    return int(result)


def parse_options(texts: list[str], fmt: str) -> dict[str, object]:
    """``-o name=value[,name=value...]`` (repeatable) as create_image keyword arguments."""
    out: dict[str, object] = {}
    for text in texts:
        for item in text.split(","):
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep:
                raise ToolError(f"option {item!r} has no value (use name=value)")
            if name in _UNSUPPORTED:
                raise ToolError(f"option {name!r} is not supported by pyimago yet")
            if name not in OPTION_NAMES[fmt]:
                known = ", ".join(sorted(OPTION_NAMES[fmt]))
                raise ToolError(f"unknown {fmt} option {name!r} (known: {known})")
            if name in _SIZE_OPTIONS:
                out[name] = parse_size(value, name)
            elif name in _BOOL_OPTIONS:
                if value not in _BOOLS:
                    raise ToolError(f"{name} must be on or off, not {value!r}")
                out[name] = _BOOLS[value]
            elif name in _INT_OPTIONS:
                try:
                    out[name] = int(value)
                except ValueError:
                    raise ToolError(f"{name} must be a number, not {value!r}") from None
            else:
                out[name] = value
    return out

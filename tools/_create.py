"""``create`` and ``resize``: new images and new disk sizes, as qemu-img makes them."""

from __future__ import annotations

import os
from typing import Any

from pyimago.reference import PreallocateMode

from ._common import (
    Impl,
    ToolError,
    backing_path,
    check_format,
    implementation,
    open_chain,
    require_file,
    require_room,
    same_file,
)

__all__ = ["PREALLOCATION", "create", "formatting_line", "parse_resize", "resize"]

#: qemu-img's --preallocation names and the modes they stand for.
PREALLOCATION = {
    "off": PreallocateMode.NONE,
    "metadata": PreallocateMode.FORMAT_ALLOCATE,
    "falloc": PreallocateMode.FULL_ALLOCATE,
    "full": PreallocateMode.WRITE_DATA,
}


def formatting_line(path: str, fmt: str, size: int, options: dict[str, object]) -> str:
    """qemu-img create's ``Formatting ...`` line (block.c ``bdrv_img_create`` prints the
    options in the driver's option-list order, defaults included)."""
    if fmt == "raw":
        parts = [f"fmt=raw size={size}"]
        if "preallocation" in options:
            parts.append(f"preallocation={options['preallocation']}")
        return f"Formatting '{path}', {' '.join(parts)}"
    def onoff(name: str) -> str:
        return "on" if options.get(name) else "off"

    parts = [f"fmt=qcow2 cluster_size={options.get('cluster_size', 65536)}",
             f"extended_l2={onoff('extended_l2')}"]
    if "preallocation" in options:
        parts.append(f"preallocation={options['preallocation']}")
    parts.append(f"compression_type={options.get('compression_type', 'zlib')}")
    parts.append(f"size={size}")
    for name in ("backing_file", "backing_fmt", "compat", "data_file"):
        if name in options:
            parts.append(f"{name}={options[name]}")
    if "data_file_raw" in options:
        parts.append(f"data_file_raw={onoff('data_file_raw')}")
    parts.append(f"lazy_refcounts={onoff('lazy_refcounts')}")
    parts.append(f"refcount_bits={options.get('refcount_bits', 16)}")
    return f"Formatting '{path}', {' '.join(parts)}"


def create(
    path: str,
    size: int | None,
    *,
    fmt: str = "raw",
    options: dict[str, object] | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    impl: Impl = "fast",
) -> str:
    """Create ``path`` as ``qemu-img create`` does; returns its ``Formatting`` line.

    A backing file must come with its format (as qemu-img 7.2 demands) and, unless
    ``unsafe``, must open; ``size`` defaults to the backing file's.
    """
    check_format(fmt)
    module = implementation(impl)
    opts = dict(options or {})
    if "size" in opts:
        if size is not None:
            raise ToolError("give the size once: as an argument or as -o size=")
        size = int(opts.pop("size"))  # type: ignore[call-overload]
    if backing is not None:
        if fmt != "qcow2":
            raise ToolError(f"format {fmt} takes no backing file (-b needs -f qcow2)")
        if backing_fmt is None:
            raise ToolError(f"{path}: backing file {backing!r} specified without backing "
                            "format (-F)")
        opts["backing_file"] = backing
        opts["backing_fmt"] = check_format(backing_fmt, "backing format")
        # block.c bdrv_img_create: "Trying to create an image with the same filename as the
        # backing file" (qemu-img compares the two names; the image would be its own backing
        # file, and an existing one would be overwritten).
        if same_file(path, backing_path(path, backing)):
            raise ToolError(f"{path}: trying to create an image with the same filename as "
                            f"its backing file {backing!r}")
    if os.path.isdir(path):
        raise ToolError(f"{path!r} is a directory")
    if backing is not None and not unsafe:
        with open_chain(backing_path(path, backing), impl=module, fmt=backing_fmt) as base:
            if size is None:
                size = int(base.size)
    if size is None:
        raise ToolError("a size is needed (no backing file to take it from)")
    _require_room_for(path, size, fmt, opts)
    existed = os.path.exists(path)
    try:
        module.create_image(path, size, format=fmt, unsafe=unsafe, **opts)
    except OSError as exc:
        # A file system that refuses the image's size (EFBIG) or runs out of room: name the
        # image, and take away the partial file this call made (nothing was there before).
        if not existed and os.path.isfile(path):
            os.unlink(path)
        raise ToolError(f"{path}: cannot create the image: {exc.strerror or exc}") from exc
    return formatting_line(path, fmt, size, {k: v for k, v in opts.items()})


def _require_room_for(path: str, size: int, fmt: str, opts: dict[str, object]) -> None:
    """The bytes a preallocated create takes up front must fit on the file system: the
    whole disk (falloc, full) or, for qcow2 metadata preallocation, every L2 table and
    refcount block of a fully allocated image (as qemu-img measure counts them)."""
    prealloc = opts.get("preallocation")
    if fmt == "qcow2" and prealloc == "metadata":
        from ._measure import measure

        layout = {k: v for k, v in opts.items()
                  if k in ("cluster_size", "refcount_bits", "extended_l2", "compat")}
        sizes = measure(size=size, out_fmt="qcow2", options=layout)
        require_room(path, sizes["fully-allocated"] - size, "full")
        return
    require_room(path, size, prealloc)


def parse_resize(text: str, current: int) -> int:
    """``[+|-]SIZE`` against the current size (qemu-img resize)."""
    from ._common import parse_size

    sign = text[:1] if text[:1] in "+-" else ""
    amount = parse_size(text[1:] if sign else text, "size")
    if sign == "+":
        return current + amount
    if sign == "-":
        if amount > current:
            raise ToolError(f"size {text!r} would make the disk negative ({current} bytes now)")
        return current - amount
    return amount


def resize(
    path: str,
    size: str,
    *,
    fmt: str | None = None,
    shrink: bool = False,
    preallocation: str | None = None,
    impl: Impl = "fast",
) -> int:
    """Resize ``path`` to ``size`` (``[+|-]SIZE``); returns the new size.

    As qemu-img: shrinking needs ``shrink``; ``preallocation`` prepares a grown area.
    """
    require_file(path)
    if preallocation is not None and preallocation not in PREALLOCATION:
        raise ToolError(f"unknown preallocation {preallocation!r} "
                        f"(choose from {', '.join(PREALLOCATION)})")
    with open_chain(path, impl=impl, fmt=fmt, writable=True) as image:
        current: int = image.size
        new = parse_resize(size, current)
        info: Any = image.info()
        if info.format == "raw" and preallocation == "metadata":
            raise ToolError("Unsupported preallocation mode: metadata (raw has no metadata)")
        if info.format == "qcow2" and new % 512:
            raise ToolError(f"qcow2 sizes are whole 512-byte sectors, not {new}")
        if new < current and not shrink:
            raise ToolError("Use the --shrink option to perform a shrink operation.")
        if new < current and preallocation not in (None, "off"):
            raise ToolError("--preallocation applies to growing only")
        require_room(path, new - current, preallocation)
        try:
            image.resize(new, PREALLOCATION[preallocation or "off"])
        except OSError as exc:  # EFBIG, ENOSPC: name the image and the size
            raise ToolError(f"{path}: cannot resize to {new} bytes: "
                            f"{exc.strerror or exc}") from exc
        image.flush()
        image.sync()
    return new

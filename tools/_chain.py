"""``commit``: move an overlay's data into its backing chain.

commit writes the overlay's own data into its backing file, then empties the overlay (-d
keeps it), with the public FormatAccess calls only.  (``rebase`` is in ``_rebase``.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from pyimago.reference import IndirectMapping, ZeroMapping

from ._common import (
    Impl,
    ToolError,
    backing_path,
    implementation,
    open_chain,
    require_file,
)
from ._progress import progress

__all__ = ["commit"]

_CHUNK = 1 << 20


def _own_ranges(image: Any) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_zero) of what the image's own layer holds (not its backing's)."""
    pos = 0
    while pos < image.size:
        mapping, n = image.get_shallow_mapping(pos, image.size - pos)
        if not isinstance(mapping, IndirectMapping):
            yield pos, n, isinstance(mapping, ZeroMapping)
        pos += n


def _copy_range(src: Any, dst: Any, offset: int, length: int, is_zero: bool) -> None:
    """Copy ``src``'s guest range into ``dst``: zeroes as zeroes (also runs of them in data
    gathered from several layers, which may be zero clusters in some)."""
    if is_zero:
        dst.write_zeroes(offset, length)
        return
    for at in range(offset, offset + length, _CHUNK):
        n = min(_CHUNK, offset + length - at)
        data = src.read(at, n)
        if data.count(0) == n:
            dst.write_zeroes(at, n)
        else:
            dst.write(data, at)


def _chain_layers(top: Any, path: str) -> Iterator[tuple[Any, str, Any]]:
    """(layer, its path, its info) of the opened chain, top first."""
    layer, name = top, path
    while layer is not None:
        info = layer.info()
        yield layer, name, info
        if info.backing_file is None:
            return
        name = backing_path(name, info.backing_file)
        layer = layer.driver.backing


def _find_base(top: Any, path: str, base: str | None) -> tuple[list[Any], str, str | None]:
    """The layers above the commit target (top first), the target's path and format.

    qemu-img commit -b: BASE "has to be part of FILENAME's backing chain" (found by the
    name the chain records, or as the same file); without -b, the overlay's own backing."""
    above: list[Any] = []
    named_by: tuple[str | None, str | None] = (None, None)  # (backing name, format)
    for layer, name, info in _chain_layers(top, path):
        if above:
            recorded, fmt = named_by
            if base is None or base == recorded or (
                    os.path.exists(base) and os.path.realpath(base) == os.path.realpath(name)):
                return above, name, fmt
        above.append(layer)
        named_by = (info.backing_file, info.backing_format)
    if base is None:
        raise ToolError(f"{path}: the image has no backing file to commit into")
    raise ToolError(f"-b {base!r}: did not find it in the backing chain of {path!r}")


def _held_ranges(layers: list[Any]) -> list[tuple[int, int]]:
    """The merged guest ranges that any of ``layers`` holds itself (data or zeroes)."""
    spans = sorted((o, o + n) for layer in layers for o, n, _ in _own_ranges(layer))
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return [(lo, hi - lo) for lo, hi in merged]


def commit(path: str, *, fmt: str | None = None, keep: bool = False, impl: Impl = "fast",
           show_progress: bool = False, base: str | None = None) -> str:
    """Write what the overlay shows above its commit target into that target: its backing
    file, or ``base``, a deeper layer of its chain (qemu-img commit -b, which implies
    ``keep``: the layers between would no longer match what the overlay was made over).
    Then (unless ``keep``) empty the overlay so the backing shows through.  Returns the path
    of the image committed into."""
    module = implementation(impl)
    keep = keep or base is not None
    # The overlay's chain is opened force-share: its read-only lock on the backing file would
    # otherwise refuse the writable open of that same file below (QEMU's commit job reopens
    # the one backing node read-write instead; we hold two opens of it).
    with open_chain(path, impl=module, fmt=fmt, force_share=True) as top:
        layers, base_path, base_fmt = _find_base(top, path, base)
        require_file(base_path, "backing file")
        own = list(_own_ranges(top))
        ranges = [(o, n, z) for o, n, z in own] if len(layers) == 1 else [
            (o, n, False) for o, n in _held_ranges(layers)]
        target = module.open_image(base_path, format=base_fmt, writable=True)
        try:
            if target.size < top.size:
                target.resize(top.size)
            with progress(show_progress, sum(n for _, n, _ in ranges), "commit") as bar:
                for offset, length, is_zero in ranges:
                    _copy_range(top, target, offset, length, is_zero)
                    bar.advance(length)
            target.flush()
            target.sync()
        finally:
            target.close()
    if not keep:
        # The backing holds everything now: the overlay's clusters can go.
        with open_chain(path, impl=module, fmt=fmt, writable=True) as top:
            for offset, length, _ in own:
                top.discard_to_backing(offset, length)
            top.flush()
            top.sync()
    return base_path

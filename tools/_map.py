"""``map``: where each guest range of an image lives, as ``qemu-img map`` reports it.

A record says at which ``depth`` of the backing chain a range was found (0 is the image
itself), whether a layer records it (``present``), whether it reads as zeroes (``zero``),
whether it is data (``data``) and, where the data sits verbatim in a file, the ``offset``
in that file.  The walk is qemu-img's (qemu-img.c, ``get_block_status``): ask each layer in
turn, stop at the first that knows the range (data or zero), and step down otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from pyimago.reference import (
    EofMapping,
    IndirectMapping,
    RawMapping,
    SpecialMapping,
    ZeroMapping,
)

from ._bitmaps import bitmap_clusters
from ._common import Impl, ToolError, backing_path, open_chain

__all__ = ["MapEntry", "block_status", "chain_length", "map_image", "render_map"]

#: qemu-img map asks for at most this much at once (BDRV_REQUEST_MAX_BYTES, rounded).
_STEP = 1 << 30


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One ``qemu-img map`` record; ``filename`` names the file ``offset`` points into."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record with qemu-img's keys, in its order."""
        out: dict[str, Any] = {
            "start": self.start, "length": self.length, "depth": self.depth,
            "present": self.present, "zero": self.zero, "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    def merges_with(self, nxt: MapEntry) -> bool:
        """qemu-img.c ``entry_mergeable``: same kind, same file, contiguous offsets."""
        if (self.zero, self.data, self.depth, self.present, self.filename) != (
            nxt.zero, nxt.data, nxt.depth, nxt.present, nxt.filename
        ) or (self.offset is None) != (nxt.offset is None):
            return False
        return self.offset is None or self.offset + self.length == nxt.offset


@dataclass(frozen=True, slots=True)
class _Layer:
    image: Any
    filename: str
    format: str
    #: qcow2 with metadata preallocation detected: data clusters in file holes read zero.
    holes_read_zero: bool
    #: The file guest data lives in: the image's, or its external data file.
    data_filename: str


def _metadata_preallocated(image: Any, filename: str, cluster_size: int,
                           data_in_file: bool = True) -> bool:
    """qcow2.c ``qcow2_detect_metadata_preallocation``: the image uses more clusters (by
    refcount) than the file has allocated blocks, by a margin (10 %, at least 2 clusters).

    QEMU counts clusters with a non-zero refcount, which the public API does not show; the
    count here is a lower bound of it (distinct host data clusters, the header, L1 and L2
    tables, one refcount table and block, the persistent bitmaps' clusters), so "yes" here
    is always QEMU's answer too.
    Clusters of an external data file (``data_in_file`` false) have no refcount: not counted.
    """
    st = os.stat(filename)
    real_clusters = st.st_blocks * 512 // cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    if -(-st.st_size // cluster_size) < threshold:
        return False  # the file cannot hold that many clusters
    entries_per_l2 = cluster_size // 8
    l2_span = cluster_size * entries_per_l2
    size: int = image.size
    l1_entries = -(-size // l2_span)
    used = 1 + -(-l1_entries * 8 // cluster_size) + 2 + bitmap_clusters(filename, cluster_size)
    data: set[int] = set()
    tables: set[int] = set()
    pos = 0
    while pos < size and len(data) + len(tables) + used < threshold:
        mapping, n = image.get_shallow_mapping(pos, size - pos)
        if isinstance(mapping, EofMapping):
            break
        if isinstance(mapping, RawMapping) and data_in_file:
            first = mapping.offset // cluster_size
            data.update(range(first, -(-(mapping.offset + n) // cluster_size)))
        if not isinstance(mapping, IndirectMapping) and not (
            isinstance(mapping, ZeroMapping) and not mapping.explicit
        ):
            tables.update(range(pos // l2_span, (pos + n - 1) // l2_span + 1))
        pos += n
    return len(data) + len(tables) + used >= threshold


def _layers(image: Any, filename: str) -> list[_Layer]:
    out: list[_Layer] = []
    while image is not None:
        info = image.info()
        external = info.qcow2 is not None and info.qcow2.data_file is not None
        # An external data file's name resolves like a backing file's (create.qcow2.data-file).
        data_filename = backing_path(filename, info.qcow2.data_file) if external else filename
        prealloc = info.format == "qcow2" and _metadata_preallocated(
            image, filename, info.cluster_size, not external
        )
        out.append(_Layer(image, filename, info.format, prealloc, data_filename))
        if info.backing_file is None:
            break
        filename = backing_path(filename, info.backing_file)
        image = image.driver.backing
    return out


def chain_length(image: Any) -> int:
    """How many layers the image's backing chain has (1: no backing file)."""
    count = 0
    while image is not None:
        count += 1
        image = image.driver.backing if image.info().backing_file is not None else None
    return count


def _file_extents(filename: str, offset: int, length: int) -> Iterator[tuple[int, bool]]:
    """Split ``[offset, offset+length)`` of a file into (length, is_data) by SEEK_DATA/HOLE."""
    end = offset + length
    fd = os.open(filename, os.O_RDONLY)
    try:
        pos = offset
        while pos < end:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past pos
                data_at = end
            if data_at > pos:
                n = min(data_at, end) - pos
                yield n, False
                pos += n
                continue
            try:
                hole_at = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole_at = end
            n = min(max(hole_at, pos + 1), end) - pos
            yield n, True
            pos += n
    finally:
        os.close(fd)


def _status(layers: list[_Layer], offset: int, length: int) -> MapEntry:
    """The record for the range at ``offset`` (at most ``length`` bytes)."""
    depth = 0
    guest = offset
    while True:
        layer = layers[depth]
        mapping, n = layer.image.get_shallow_mapping(guest, length)
        if isinstance(mapping, IndirectMapping):
            below = layers[depth + 1]
            if mapping.offset >= below.image.size:
                # block/io.c: an unallocated range past the backing file's end reads zero
                # and is reported by the layer that asked.
                return MapEntry(offset, n, depth, False, True, False)
            length = min(n, below.image.size - mapping.offset)
            guest = mapping.offset
            depth += 1
            continue
        if isinstance(mapping, RawMapping):
            where = layer.data_filename
            if layer.format == "raw" or layer.holes_read_zero:
                n, is_data = next(_file_extents(where, mapping.offset, n))
                if layer.format == "raw":
                    return MapEntry(offset, n, depth, True, not is_data, is_data,
                                    mapping.offset, where)
                return MapEntry(offset, n, depth, True, not is_data, True, mapping.offset, where)
            return MapEntry(offset, n, depth, True, False, True, mapping.offset, where)
        if isinstance(mapping, SpecialMapping):
            return MapEntry(offset, n, depth, True, False, True)
        if isinstance(mapping, ZeroMapping):
            return MapEntry(offset, n, depth, mapping.explicit, True, False)
        assert isinstance(mapping, EofMapping)
        raise ToolError(f"{layer.filename}: unexpected end of disk at {guest}")


def block_status(image: Any, filename: str, start: int = 0, end: int | None = None
                 ) -> Iterator[MapEntry]:
    """Unmerged records for ``[start, end)`` of an open image (``end``: the disk end);
    ``filename`` is the path the image was opened from (backing names resolve against it)."""
    layers = _layers(image, filename)
    stop = image.size if end is None else min(end, image.size)
    pos = start
    while pos < stop:
        entry = _status(layers, pos, min(stop - pos, _STEP))
        yield entry
        pos += entry.length


def map_image(
    path: str,
    *,
    impl: Impl = "fast",
    fmt: str | None = None,
    start_offset: int = 0,
    max_length: int | None = None,
    force_share: bool = False,
) -> list[MapEntry]:
    """``qemu-img map`` records for ``path`` from ``start_offset`` (merged as qemu-img does)."""
    if start_offset < 0:
        raise ToolError(f"--start-offset must not be negative: {start_offset}")
    if max_length is not None and max_length < 0:
        raise ToolError(f"--max-length must not be negative: {max_length}")
    entries: list[MapEntry] = []
    with open_chain(path, impl=impl, fmt=fmt, force_share=force_share) as image:
        end = None if max_length is None else start_offset + max_length
        for entry in block_status(image, path, start_offset, end):
            if entries and entries[-1].merges_with(entry):
                entries[-1] = replace(entries[-1], length=entries[-1].length + entry.length)
            else:
                entries.append(entry)
    if not entries:
        # qemu-img prints its (empty) current record when the window holds nothing.
        entries.append(MapEntry(start_offset, 0, 0, False, False, False))
    return entries


def render_map(entries: list[MapEntry], *, output: str = "human") -> str:
    """What ``qemu-img map`` prints (``output``: json or human)."""
    if output == "json":
        lines = [json.dumps(e.to_json(), separators=(", ", ": ")) for e in entries]
        body = ",\n".join("{ " + line[1:-1] + "}" for line in lines)
        return f"[{body}]\n"
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and e.offset is None:
            raise ToolError("File contains external, encrypted or compressed clusters.")
        if e.data and not e.zero:
            out.append(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}"
                       f"{e.filename or ''}")
    return "\n".join(out) + "\n"


def _hex(value: int) -> str:
    # printf's %#x prints 0 without the 0x prefix.
    return f"{value:#x}" if value else "0"

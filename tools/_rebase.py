"""``rebase``: give a qcow2 overlay a new backing file, in place, as qemu-img rebase does.

qemu-img.c img_rebase: in safe mode every range the overlay does not hold itself and the new
backing file reads differently is first written into the overlay (through the
implementation's FormatAccess, so the write order stays crash safe), then the header's
backing file name and backing-format extension are rewritten (bdrv_change_backing_file ->
qcow2_update_header, which writes the whole header cluster in one write).  Only the active
layer is rebased: internal snapshots keep their own L1 tables, and what they do not hold
themselves reads from the new backing file afterwards, as it does after qemu-img rebase.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from pyimago.reference import FileStorage, IndirectMapping, PyimagoError, Storage
from pyimago.reference.qcow2.constants import (
    BACKING_FILE_NAME_MAX,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
)
from pyimago.reference.qcow2.extensions import (
    HeaderExtension,
    pack_extensions,
    parse_extensions,
)
from pyimago.reference.qcow2.header import pack_header, parse_header

from ._common import (
    Impl,
    ToolError,
    backing_path,
    check_format,
    implementation,
    open_chain,
    open_file_for_writing,
    same_file,
)
from ._progress import Progress, progress

__all__ = ["rebase"]

#: Bytes compared at a time, at most (and never across an overlay cluster).
_CHUNK = 1 << 20


def rebase(path: str, new_backing: str, *, new_fmt: str | None = None,
           unsafe: bool = False, fmt: str | None = None, impl: Impl = "fast",
           show_progress: bool = False) -> None:
    """Give the qcow2 overlay ``path`` the backing file ``new_backing`` ("" for none).

    Safe mode keeps the guest contents of the active layer: ranges the overlay does not hold
    and the new backing reads differently are copied into the overlay first.  ``unsafe``
    only changes the name (the old backing file is not even opened).  Internal snapshots
    stay; what they do not hold reads from the new backing file afterwards (as with QEMU).
    """
    module = implementation(impl)
    check_format(new_fmt, "backing format")
    if new_backing and new_fmt is None:
        raise ToolError(f"{path}: backing file {new_backing!r} specified without backing "
                        "format (-F)")
    new_path = backing_path(path, new_backing) if new_backing else None
    if new_path is not None and os.path.exists(path) and same_file(path, new_path):
        # qemu-img fails on the lock in safe mode ("Could not open new backing file") and
        # writes the loop with -u; neither leaves an image that opens.
        raise ToolError(f"{path}: the new backing file {new_backing!r} is the image itself")
    with open_chain(path, impl=module, fmt=fmt, force_share=True, no_backing=unsafe) as probe:
        info = probe.info()
        if info.format != "qcow2" or info.qcow2 is None:
            raise ToolError(f"{path}: only qcow2 images have a backing file to rebase")
    # Up front: the new name must fit in the header cluster, the new backing must open.
    _new_header_cluster(path, new_backing, new_fmt)
    if new_path is not None and not unsafe:
        with open_chain(new_path, impl=module, fmt=new_fmt):
            pass
    if not unsafe:
        with open_chain(path, impl=module, fmt=fmt, writable=True) as top:
            new = (None if new_path is None else
                   module.open_image(new_path, format=new_fmt))
            try:
                with progress(show_progress, top.size, "rebase") as bar:
                    _copy_differences(top, new, bar)
            finally:
                if new is not None:
                    new.close()
            top.flush()
            top.sync()
    else:
        # qemu-img rebase -u opens the overlay writable without its backing file (a dirty
        # image is repaired by that open, as QEMU's open repairs it).
        with open_chain(path, impl=module, fmt=fmt, writable=True, no_backing=True) as top:
            top.flush()
    _rewrite_header(path, new_backing, new_fmt)


def _copy_differences(top: Any, new: Any | None, bar: Progress) -> None:
    """Write into ``top`` what it shows through its old backing chain and the ``new``
    backing (None: no backing, all zeroes) would show differently."""
    cluster = top.info().cluster_size or 65536
    step = max(cluster, _CHUNK // cluster * cluster)
    pos = 0
    while pos < top.size:
        mapping, n = top.get_shallow_mapping(pos, top.size - pos)
        if isinstance(mapping, IndirectMapping):
            at = pos
            while at < pos + n:
                m = min(step - at % step, pos + n - at)
                old = top.read(at, m)
                if old != _read_new(new, at, m):
                    # Cluster by cluster: only the clusters that differ are allocated.
                    _write_differing(top, new, old, at, cluster)
                at += m
        bar.advance(n)
        pos += n


def _read_new(new: Any | None, offset: int, length: int) -> bytes:
    """``length`` bytes of the new backing from ``offset``: zeroes past its end (or without
    one), as the overlay reads past a shorter backing file."""
    if new is None or offset >= new.size:
        return bytes(length)
    n = min(length, new.size - offset)
    data: bytes = new.read(offset, n)
    return data + bytes(length - n)


def _write_differing(top: Any, new: Any | None, old: bytes, offset: int, cluster: int) -> None:
    pos = 0
    while pos < len(old):
        at = offset + pos
        m = min(cluster - at % cluster, len(old) - pos)
        piece = old[pos : pos + m]
        if piece != _read_new(new, at, m):
            top.write(piece, at)
        pos += m


def _read_header_cluster(storage: Storage, path: str) -> tuple[Any, bytes]:
    try:
        header = parse_header(storage.read(0, 4096))
        return header, storage.read(0, header.cluster_size)
    except PyimagoError as exc:
        raise ToolError(f"{path}: {exc}") from exc


def _new_header_cluster(path: str, name: str, fmt: str | None,
                        storage: Storage | None = None) -> bytes:
    """The image's header cluster with backing file ``name`` ("" for none) of format ``fmt``,
    laid out as qcow2_update_header lays it out: header, extensions (the backing format
    first), end marker, backing file name, zeroes to the cluster's end."""
    if storage is None:
        # Up front, before any work: a look at the header, no lock taken.
        own = FileStorage(path, locking="off")
        try:
            header, cluster = _read_header_cluster(own, path)
        finally:
            own.close()
    else:
        header, cluster = _read_header_cluster(storage, path)
    ext_end = header.backing_file_offset or header.cluster_size
    try:
        exts = parse_extensions(cluster, header.header_length, ext_end)
    except PyimagoError as exc:
        raise ToolError(f"{path}: {exc}") from exc
    kept = [e for e in exts if e.type != QCOW2_EXT_MAGIC_BACKING_FORMAT]
    raw_name = name.encode("utf-8", "surrogateescape")
    if raw_name and fmt:
        kept.insert(0, HeaderExtension(QCOW2_EXT_MAGIC_BACKING_FORMAT, fmt.encode("ascii")))
    if len(raw_name) > BACKING_FILE_NAME_MAX:
        raise ToolError(f"backing file name {name!r} is longer than {BACKING_FILE_NAME_MAX} "
                        "bytes")
    packed = pack_header(replace(header, backing_file_offset=0, backing_file_size=0))
    # Header bytes past the fields pyimago knows (up to header_length) are kept as they are.
    fixed = packed + cluster[len(packed) : header.header_length]
    ext_bytes = pack_extensions(kept)
    name_at = len(fixed) + len(ext_bytes)
    if name_at + len(raw_name) > header.cluster_size:
        # qcow2_update_header: -ENOSPC when the name does not fit in the header cluster.
        raise ToolError(f"backing file name {name!r} does not fit in the "
                        f"{header.cluster_size}-byte header cluster of {path}")
    new_header = replace(header, backing_file_offset=name_at if raw_name else 0,
                         backing_file_size=len(raw_name))
    out = pack_header(new_header) + cluster[len(packed) : header.header_length]
    out += ext_bytes + raw_name
    return out + bytes(header.cluster_size - len(out))


def _rewrite_header(path: str, name: str, fmt: str | None) -> None:
    """Write the new header cluster in one write (then sync), holding the image's write
    lock as QEMU's writable open would.

    The write goes through a Storage (the reference's FileStorage), so that power-cut
    recordings see it as what it is: one storage mutation, after the copied ranges were
    synced (crash.power-cut: the guest view is the same before and after it)."""
    storage = open_file_for_writing(path)
    try:
        data = _new_header_cluster(path, name, fmt, storage)
        storage.write(data, 0)
        storage.sync()
    finally:
        storage.close()

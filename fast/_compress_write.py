"""Compressed cluster writes for pyimago.fast, as QEMU's qcow2 driver makes them.

QEMU's ``qcow2_co_pwritev_compressed_task`` compresses one whole cluster (the disk's last
cluster, when partial, zero-padded to a whole one) into a buffer of ``cluster_size - 1``
bytes; what does not fit there is written as a plain cluster instead.  What fits is placed
by ``qcow2_alloc_compressed_cluster_offset`` / ``qcow2_alloc_bytes``: at byte granularity,
right after the previous compressed cluster while it has room (spilling into the next host
cluster when that one is the next free cluster too), every host cluster it touches gaining a
reference; the L2 entry then holds the byte offset and the count of 512-byte sectors it
spans beyond the first.

Compression is pure and releases the GIL (zlib, zstd): :func:`compress_cluster` runs on any
thread; :func:`place_compressed` changes metadata and runs under the layer's lock.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from pyimago.reference._errors import InvalidRequestError, UnsupportedError

from ._entries import COMPRESSED, HOST_MASK

if TYPE_CHECKING:
    from ._qcow2 import Qcow2Layer

__all__ = ["compress_cluster", "place_compressed", "refuse_compressed"]

#: QEMU's deflate settings (qcow2_zlib_compress): default level, raw deflate with a 4 KiB
#: window (wbits -12), memLevel 9.
_ZLIB_ARGS = (zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY)
#: ZSTD_CLEVEL_DEFAULT: QEMU's zstd context is created with no level set.
_ZSTD_LEVEL = 3
_SECTOR_BITS = 9


def compress_cluster(data: bytes | memoryview, cluster_size: int, ctype: int) -> bytes | None:
    """The compressed form of ``data`` (one cluster, or the disk's partial last one) by
    compression type ``ctype`` (0 zlib, 1 zstd); None where it does not pay.

    qcow2_co_pwritev_compressed_task: "out_len = qcow2_co_compress(bs, out_buf,
    s->cluster_size - 1, buf, s->cluster_size); if (out_len == -ENOMEM) { /* could not
    compress: write normal cluster */" -- a form of cluster_size bytes or more does not fit.
    """
    buf = bytes(data)
    if len(buf) < cluster_size:
        # "Zero-pad last write if image size is not cluster aligned"
        buf = buf.ljust(cluster_size, b"\0")
    if ctype == 0:
        packer = zlib.compressobj(*_ZLIB_ARGS)
        out = packer.compress(buf) + packer.flush()
    else:
        import zstandard

        out = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(buf)
    return out if len(out) <= cluster_size - 1 else None


def refuse_compressed(layer: Qcow2Layer, offset: int, length: int) -> None:
    """Check a compressed write of ``length`` bytes at guest ``offset`` before any work:
    cluster-aligned, one whole cluster or the disk's partial last one, an image that can
    hold compressed clusters."""
    cs = layer.cluster_size
    if layer.hdr.has_data_file:
        # qcow2_co_pwritev_compressed_task: "if (has_data_file(bs)) return -ENOTSUP;"
        raise UnsupportedError(
            f"write_compressed: {layer} keeps its data in an external data file, which "
            "cannot hold compressed clusters (QEMU refuses them too)"
        )
    if offset % cs:
        raise InvalidRequestError(
            f"write_compressed: offset {offset} is not a multiple of the cluster size {cs}"
        )
    if length != cs and not (0 < length < cs and offset + length == layer.size):
        raise InvalidRequestError(
            f"write_compressed: {length} bytes at {offset}: a compressed write is one whole "
            f"cluster ({cs} bytes), or the rest of the disk's partial last cluster"
        )


def _entry_index(layer: Qcow2Layer, c: int) -> int:
    return (c & layer._l2mask) << layer._ext


def place_compressed(layer: Qcow2Layer, offset: int, blob: bytes) -> None:
    """Store ``blob`` (a compressed cluster) for guest cluster at ``offset`` and map it.

    Order (crash.order.data-before-entry, crash.order.refcount-before-reference): the bytes
    go to storage first; the entry changes in the cached L2 table, which is written only
    after the refcounts counting the clusters it now references.
    """
    cb = layer._cbits
    c = offset >> cb
    l1i = c >> layer._l2bits
    cur = layer._l2_table(l1i)
    e = cur[_entry_index(layer, c)] if cur is not None else 0
    layer._check_entry(c, e)
    if e & (HOST_MASK | COMPRESSED):
        # qcow2_alloc_compressed_cluster_offset: "Compression can't overwrite anything.
        # Fail if the cluster was already allocated." (-EIO)
        raise InvalidRequestError(
            f"write_compressed: guest cluster at {offset} is already allocated; compressed "
            "data can only go to unallocated or zero clusters (QEMU fails with EIO too)"
        )
    # The table first (get_cluster_table), then the bytes: QEMU's placement.
    tofs, tbl = layer._writable_l2(l1i, cur)
    at = _alloc_bytes(layer, len(blob))
    layer.storage.write(blob, at)
    extra = ((at + len(blob) - 1) >> _SECTOR_BITS) - (at >> _SECTOR_BITS)
    # "compressed clusters never have the copied flag"
    entry = at | COMPRESSED | (extra << layer._comp_shift)
    j = _entry_index(layer, c)
    tbl[j] = entry
    if layer._ext:
        # "if (has_subclusters(s)) set_l2_bitmap(s, l2_slice, l2_index, 0);"
        tbl[j + 1] = 0
    layer._l2.touch(tofs, tbl)
    # The bytes at a reused offset are new: a cluster inflated from there before is stale.
    layer._last_inflated = None


def _alloc_bytes(layer: Qcow2Layer, size: int) -> int:
    """QEMU's qcow2_alloc_bytes: ``size`` bytes right after the last compressed cluster
    when they fit in its host cluster (or that host cluster and the next free one, when
    they are adjacent), else from the start of a new cluster; one reference more for every
    host cluster the bytes touch."""
    refs = layer.refs
    cb = layer._cbits
    cs = layer._cs
    offset = layer.comp_next
    if offset and refs.count(offset >> cb) >= refs.ceiling:
        # "if (refcount == s->refcount_max) offset = 0;"
        offset = 0
    free_in_cluster = cs - (offset & (cs - 1)) if offset else 0
    if not offset or free_in_cluster < size:
        new, _ = refs.allocate(1, exact=True)  # the new cluster's reference, already
        new_at = new << cb
        if offset and -(-offset >> cb) << cb == new_at:
            refs.incref(offset >> cb)
        else:
            offset = new_at
    else:
        refs.incref(offset >> cb)
    if offset + size > layer._comp_host:
        raise UnsupportedError(
            f"write_compressed: host offset 0x{offset:x} does not fit a compressed cluster "
            "descriptor"
        )
    nxt = offset + size
    layer.comp_next = nxt if nxt & (cs - 1) else 0
    return offset

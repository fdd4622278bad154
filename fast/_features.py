"""Mapping runs for qcow2 images with extended L2 entries or an external data file.

Such images take this general path instead of :meth:`Qcow2Layer.map_run`'s tuned loops: it
walks allocation units (subclusters of 1/32 cluster with extended L2 entries, clusters
otherwise) and merges the units that continue one run; their writes are in :mod:`._general`.

* Extended L2: an entry is two words, the standard descriptor (bit 0 unused) and a bitmap
  whose bit x marks subcluster x allocated and bit 32 + x marks it zero.
* External data file: host offsets are data file offsets, and offset 0 is a real cluster
  when COPIED is set (every data file cluster has refcount 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyimago.reference._errors import CorruptImageError, InvalidRequestError

from ._runs import K_COMP, K_DATA, K_DATA_RO, K_EOF, K_UNALLOC, K_ZERO

if TYPE_CHECKING:
    from ._qcow2 import Qcow2Layer

__all__ = ["map_run_general"]

_COPIED = 1 << 63
_COMPRESSED = 1 << 62
_ZERO_FLAG = 1
_HOST = 0x00FFFFFFFFFFFE00
_LOW32 = 0xFFFFFFFF


def _data_kind(layer: Qcow2Layer, e: int) -> int:
    """Data written in place when the image is writable and the cluster ours alone."""
    return K_DATA if layer.writable and e & _COPIED else K_DATA_RO


def _unit(layer: Qcow2Layer, pos: int) -> tuple[int, int, int]:
    """``(kind, host, end)``: what the unit at guest ``pos`` is, the host offset of ``pos``
    for data, and where the uniform piece starting at ``pos`` ends at the latest."""
    cbits = layer._cbits
    c = pos >> cbits
    l1i = c >> layer._l2bits
    tbl = layer._l2_table(l1i)
    if tbl is None:
        return K_UNALLOC, 0, (l1i + 1) << (layer._l2bits + cbits)
    ext = layer._ext
    j = (c & layer._l2mask) << ext
    e = tbl[j]
    cluster_end = (c + 1) << cbits
    if e & _COMPRESSED:
        if layer.hdr.has_data_file:
            raise CorruptImageError(
                f"qcow2: compressed cluster at guest offset {c << cbits} in an image with an "
                "external data file"
            )
        return K_COMP, 0, cluster_end
    if e & layer._l2_bad:
        raise layer._corrupt_entry(c, e)
    host = e & _HOST
    has_host = bool(host) or (layer.hdr.has_data_file and bool(e & _COPIED))
    if not ext:
        if e & _ZERO_FLAG:
            return K_ZERO, 0, cluster_end
        if has_host:
            return _data_kind(layer, e), host + (pos & layer._cmask), cluster_end
        return K_UNALLOC, 0, cluster_end
    bitmap = tbl[j + 1]
    sbits = cbits - 5
    sc = (pos >> sbits) & 31
    alloc, zero = bitmap & _LOW32, bitmap >> 32
    if has_host:
        if alloc & zero:
            raise CorruptImageError(
                f"qcow2: extended L2 bitmap 0x{bitmap:016x} of guest cluster {c} marks a "
                "subcluster both allocated and zero"
            )
    elif alloc:
        raise CorruptImageError(
            f"qcow2: extended L2 bitmap 0x{bitmap:016x} of guest cluster {c} marks subclusters "
            "allocated, but the entry has no host cluster"
        )
    # The piece ends where the run of subclusters in this state does (one call per run,
    # not per subcluster).
    first = (pos >> sbits) << sbits
    if zero >> sc & 1:
        return K_ZERO, 0, first + (_run_of_ones(zero >> sc, 32 - sc) << sbits)
    if alloc >> sc & 1:
        run_end = first + (_run_of_ones(alloc >> sc, 32 - sc) << sbits)
        return _data_kind(layer, e), host + (pos & layer._cmask), run_end
    free = ~(alloc | zero) & _LOW32
    return K_UNALLOC, 0, first + (_run_of_ones(free >> sc, 32 - sc) << sbits)


def _run_of_ones(bits: int, limit: int) -> int:
    """How many low bits of ``bits`` are set in a row (at most ``limit``)."""
    run = ((bits + 1) & ~bits).bit_length() - 1
    return min(run, limit)


def map_run_general(layer: Qcow2Layer, offset: int, max_len: int) -> tuple[int, int, int]:
    """:meth:`Qcow2Layer.map_run` for images with extended L2 entries or a data file."""
    if not layer.data_attached:
        raise InvalidRequestError(f"{layer}: its external data file is not attached")
    size = layer.size
    if offset >= size:
        return K_EOF, 0, 0
    end = min(offset + max_len, size)
    kind, host, pos = _unit(layer, offset)
    if kind != K_COMP:
        while pos < end:
            k2, h2, nxt = _unit(layer, pos)
            if k2 != kind or (kind <= K_DATA_RO and h2 != host + (pos - offset)):
                break
            pos = nxt
    return kind, host, min(pos, end) - offset

"""Writes, zeroing, discards and preallocation for qcow2 images with extended L2 entries or
an external data file: the write side of :func:`._features.map_run_general`.

Such images change a cluster at a time, per subcluster where the image has them (a cluster
without extended L2 entries is one "subcluster" here, see :mod:`._subcluster`):

* a write allocates a host cluster only where the guest cluster has none it may write in
  place, and copies (COW) only the subclusters QEMU copies (block/qcow2-cluster.c,
  calculate_l2_meta): the untouched subclusters of a new cluster stay unallocated;
* zeroing and discards work on whole subclusters; the partial ones at either end of a
  zeroing are written with zeroes;
* with an external data file, guest data lies at its guest offset in the data file (QEMU's
  do_alloc_cluster_offset: "*host_offset = start_of_cluster(s, guest_offset)"), no
  refcount counts it, and with ``data_file_raw`` every range that comes to read zero is
  zeroed in the data file as well, so that it stays the raw disk.

The write-back order of :class:`~._qcow2.Qcow2Layer` covers the bitmaps: they live in the
same L2 tables as the entries, written after the data they map and after the refcounts of
any new host cluster (specs/crash.toml).
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from pyimago.reference._errors import CorruptImageError
from pyimago.reference._prealloc import PreallocateMode

from ._entries import COMPRESSED, COPIED, HOST_MASK, ZERO_FLAG
from ._header import AUTOCLEAR_DATA_FILE_RAW
from ._layer import Clear
from ._runs import K_UNALLOC, K_ZERO
from ._subcluster import ALL_ALLOC, ALL_ZERO, alloc_range, cow_span, sc_type, zero_range

if TYPE_CHECKING:
    from ._qcow2 import Qcow2Layer

__all__ = [
    "clear_general",
    "grow_general",
    "prepare_general",
    "shrink_general",
]

_ZERO_BIT = 1 << 32


# -- one cluster's state ------------------------------------------------------------------


def _geometry(layer: Qcow2Layer) -> tuple[int, int]:
    """``(subcluster bits, subclusters per cluster)``."""
    return (layer._cbits - 5, 32) if layer._ext else (layer._cbits, 1)


def _raw_data_file(layer: Qcow2Layer) -> bool:
    hdr = layer.hdr
    return hdr.has_data_file and bool(hdr.features.autoclear & AUTOCLEAR_DATA_FILE_RAW)


def _state(layer: Qcow2Layer, c: int, e: int, word: int) -> tuple[bool, bool, int]:
    """``(has_host, compressed, bitmap)`` of guest cluster ``c`` (entry ``e``, bitmap word
    ``word`` with extended L2 entries); without extended L2 entries the bitmap is made up:
    bit 32 for the zero flag, bit 0 for a host cluster."""
    if e & COMPRESSED:
        if layer.hdr.has_data_file:
            raise CorruptImageError(
                f"qcow2: compressed cluster at guest offset {c << layer._cbits} in an image "
                "with an external data file"
            )
        return False, True, 0
    if e & layer._l2_bad:
        raise layer._corrupt_entry(c, e)
    has_host = bool(e & HOST_MASK) or (layer.hdr.has_data_file and bool(e & COPIED))
    if not layer._ext:
        if e & ZERO_FLAG:
            return has_host, False, _ZERO_BIT
        return has_host, False, 1 if has_host else 0
    # qcow2.extended-l2.bitmap: QEMU's QCOW2_SUBCLUSTER_INVALID combinations.
    # qcow2.extended-l2.invalid-write: QEMU's "Invalid cluster entry found" marks the image
    # corrupt before anything is written.
    if word & ALL_ALLOC & (word >> 32):
        raise layer.mark_corrupt(
            f"qcow2: extended L2 bitmap 0x{word:016x} of guest cluster {c} marks a "
            "subcluster both allocated and zero"
        )
    if word & ALL_ALLOC and not has_host:
        raise layer.mark_corrupt(
            f"qcow2: extended L2 bitmap 0x{word:016x} of guest cluster {c} marks subclusters "
            "allocated, but the entry has no host cluster"
        )
    return has_host, False, word


def _load(layer: Qcow2Layer, c: int) -> tuple[array[int] | None, int, int, int]:
    """``(table, index of the entry in it, entry, bitmap word)`` of guest cluster ``c``."""
    tbl = layer._l2_table(c >> layer._l2bits)
    j = (c & layer._l2mask) << layer._ext
    if tbl is None:
        return None, j, 0, 0
    return tbl, j, tbl[j], tbl[j + 1] if layer._ext else 0


def _encode(layer: Qcow2Layer, host_bits: int, bitmap: int) -> tuple[int, int]:
    """The entry and bitmap word standing for a host (``host_bits``: offset and COPIED, or
    0) and a (made-up, without extended L2 entries) bitmap."""
    if layer._ext:
        return host_bits, bitmap
    if bitmap & _ZERO_BIT:
        return host_bits | ZERO_FLAG, 0
    return (host_bits, 0) if bitmap & 1 else (0, 0)


def _store(
    layer: Qcow2Layer, c: int, cur: array[int] | None, j: int, entry: int, word: int
) -> int:
    """Give guest cluster ``c`` its new entry (and bitmap); returns the table's offset."""
    tofs, tbl = layer._writable_l2(c >> layer._l2bits, cur)
    tbl[j] = entry
    if layer._ext:
        tbl[j + 1] = word
    layer._l2.touch(tofs, tbl)
    return tofs


def _holds(layer: Qcow2Layer, e: int) -> bool:
    """Whether entry ``e`` holds a refcounted cluster (data file clusters have none)."""
    if e & COMPRESSED:
        return True
    return bool(e & HOST_MASK) and not layer.hdr.has_data_file


# -- writes -------------------------------------------------------------------------------


def _all_normal(bitmap: int, lo: int, hi: int, sub_bits: int) -> bool:
    need = alloc_range(lo >> sub_bits, ((hi - 1) >> sub_bits) + 1)
    return bitmap & need == need


def prepare_general(
    layer: Qcow2Layer, offset: int, length: int, overwrite: bool, data: memoryview | None
) -> tuple[int, int, bool]:
    """:meth:`Qcow2Layer.prepare` for these images: ``(host, n, written)``, ``n`` reaching at
    most the end of the guest cluster at ``offset`` unless the following ones are written
    in place too."""
    with layer._lock:
        return _prepare(layer, offset, length, overwrite, data)


def _prepare(
    layer: Qcow2Layer, offset: int, length: int, overwrite: bool, data: memoryview | None
) -> tuple[int, int, bool]:
    cb, cs = layer._cbits, layer._cs
    sbits, nsub = _geometry(layer)
    dfile = layer.hdr.has_data_file
    c = offset >> cb
    g0 = c << cb
    lo = offset - g0
    hi = min(lo + length, cs)
    cur, j, e, word = _load(layer, c)
    has_host, comp, bm = _state(layer, c, e, word)
    host = e & HOST_MASK
    keep = has_host and bool(e & COPIED)
    if keep and _all_normal(bm, lo, hi, sbits):
        return host + lo, _in_place(layer, c, cur, j, host, lo, offset + length), False
    first = sc_type(has_host, comp, bm, lo >> sbits)
    last = sc_type(has_host, comp, bm, (hi - 1) >> sbits)
    start, end = cow_span(lo, hi, first, last, bm & ALL_ALLOC, keep, sbits, cb, nsub)
    if dfile:
        # Nothing past the disk end goes into the data file: it stays the disk's size.
        end = max(hi, min(end, layer.size - g0))
    held = [e] if not keep and _holds(layer, e) else []
    layer._vet_releases(held)
    more = 0
    if not keep and overwrite and data is not None and hi == cs:
        more = _fresh_after(layer, cur, j, c, (offset + length) >> cb)
    if keep:
        new_host = host
        if not dfile:
            layer._vet_in_place(host, cs)
    elif dfile:
        new_host = g0
    else:
        hc, m = layer.refs.allocate(1 + more, exact=not more)
        more = m - 1
        new_host = hc << cb
    if more:
        return _fresh_run(layer, c, cur, j, e, bm, comp, new_host, start, lo, more, held)
    written = _write_span(layer, new_host, g0, start, end, lo, hi, overwrite, data)
    sa, sb = start >> sbits, ((end - 1) >> sbits) + 1
    new_bm = ((0 if comp else bm) | alloc_range(sa, sb)) & ~zero_range(sa, sb)
    entry, new_word = _encode(layer, new_host | COPIED, new_bm)
    tofs = _store(layer, c, cur, j, entry, new_word)
    if held:
        layer._drop_refs(tofs, held)
    return new_host + lo, hi - lo, written


def _fresh_after(
    layer: Qcow2Layer, tbl: array[int] | None, j: int, c: int, stop: int
) -> int:
    """How many guest clusters after ``c`` (before ``stop``, in the same L2 table) have no
    host cluster and no allocated subcluster: a write covering them wholly maps them to
    fresh host clusters with ``c``'s, in one run."""
    stop = min(stop, ((c >> layer._l2bits) + 1) << layer._l2bits)
    if tbl is None:
        return max(0, stop - c - 1)
    ext = layer._ext
    step = 1 << ext
    jj = j + step
    k = 0
    while c + 1 + k < stop and tbl[jj] == 0 and not (ext and tbl[jj + 1] & ALL_ALLOC):
        k += 1
        jj += step
    return k


def _fresh_run(
    layer: Qcow2Layer, c: int, cur: array[int] | None, j: int, e: int, bm: int, comp: bool,
    host: int, start: int, lo: int, more: int, held: list[int],
) -> tuple[int, int, bool]:
    """Map guest cluster ``c`` (written from ``lo`` to its end, copied on write from
    ``start``) and the ``more`` unallocated clusters after it (written wholly) to the host
    run at ``host``; the caller writes its data there."""
    cb, cs = layer._cbits, layer._cs
    sbits, _ = _geometry(layer)
    g0 = c << cb
    if lo > start:
        # Not mapped yet: the copy and the caller's data may go in separate writes.
        head = memoryview(bytearray(lo - start))
        layer.readinto(head, g0 + start)
        layer.data.write(head, host + start)
    sa = start >> sbits
    new_bm = ((0 if comp else bm) | alloc_range(sa, 32 if layer._ext else 1))
    new_bm &= ~zero_range(sa, 32 if layer._ext else 1)
    tofs, tbl = layer._writable_l2(c >> layer._l2bits, cur)
    step = 1 << layer._ext
    for t in range(more + 1):
        entry, word = _encode(layer, (host + t * cs) | COPIED, ALL_ALLOC if t else new_bm)
        tbl[j + t * step] = entry
        if layer._ext:
            tbl[j + t * step + 1] = word
    layer._l2.touch(tofs, tbl)
    if held:
        layer._drop_refs(tofs, held)
    return host + lo, (more + 1) * cs - lo, False


def _in_place(
    layer: Qcow2Layer, c: int, tbl: array[int] | None, j: int, host: int, lo: int, stop: int
) -> int:
    """Guest cluster ``c`` is written in place from ``lo``: how far (up to guest ``stop``)
    the following clusters continue it (contiguous host clusters, every subcluster the
    write touches allocated)."""
    assert tbl is not None
    cb, cs = layer._cbits, layer._cs
    sbits, _ = _geometry(layer)
    ext = layer._ext
    pos = (c + 1) << cb
    want = host + cs
    jj = j + (1 << ext)
    span = len(tbl)
    while pos < stop and jj < span and tbl[jj] == want | COPIED:
        hi = min(stop - pos, cs)
        if ext:
            word = tbl[jj + 1]
            if not _all_normal(word, 0, hi, sbits) or word & ALL_ALLOC & (word >> 32):
                break
        pos += hi
        want += cs
        jj += 1 << ext
    if not layer.hdr.has_data_file:
        layer._vet_in_place(host, pos - (c << cb))
    return min(pos, stop) - ((c << cb) + lo)


def _write_span(
    layer: Qcow2Layer, host: int, g0: int, start: int, end: int, lo: int, hi: int,
    overwrite: bool, data: memoryview | None,
) -> bool:
    """Store ``[start, end)`` of the guest cluster at ``g0`` into the host cluster ``host``:
    the guest's current view around the caller's ``[lo, hi)``, and the caller's ``data``
    with it when given (True: it was written).

    Without ``data`` the whole span, ``[lo, hi)`` too, gets the current view: a cut before
    the caller's own write then leaves what the guest saw, never a sector split between an
    old and a new value (crash.power-cut)."""
    buf = memoryview(bytearray(end - start))
    if overwrite and data is not None:
        if lo > start:
            layer.readinto(buf[: lo - start], g0 + start)
        buf[lo - start : hi - start] = data[: hi - lo]
        if end > hi:
            layer.readinto(buf[hi - start :], g0 + hi)
        layer.data.write(buf, host + start)
        return True
    layer.readinto(buf, g0 + start)
    layer.data.write(buf, host + start)
    return False


# -- zeroing and discarding ---------------------------------------------------------------


def clear_general(layer: Qcow2Layer, offset: int, length: int, how: Clear) -> None:
    """:meth:`Qcow2Layer.clear` at subcluster granularity (clusters without extended L2
    entries): whole subclusters change through their bitmap bits, whole clusters through
    their entry; zeroing writes zeroes into the partial subclusters at either end."""
    sbits, _ = _geometry(layer)
    discard = how is Clear.ANY or how is Clear.BACKING
    # qcow2.extended-l2.clear: zeroing and discards work on whole subclusters (issue 13;
    # QEMU 9.1's discard_l2_subclusters).
    gbits = sbits
    u = 1 << gbits
    end = offset + length
    size = layer.size
    first_g = -(-offset // u)
    stop_g = -(-end // u) if end >= size else end // u
    # Whole units [a, b); the partial ones before and after (a range inside one unit, or
    # across one boundary, has none whole).
    a = first_g << gbits
    b = max(a, min(stop_g << gbits, size))
    first_u, stop_u = a >> sbits, -(-b >> sbits)
    with layer._lock:
        if how is Clear.ZERO_KEEP or how is Clear.ZERO_FREE:
            # access.write-zeroes.soft: the partial units at either end come first (QEMU's
            # bdrv_co_do_pwrite_zeroes does the head before the aligned middle; the tail
            # here too).  Writing one may copy a shared cluster on write, and the copy
            # spans from its first allocated subcluster to its last (calculate_l2_meta):
            # subclusters zeroed before it would map as data again.
            for lo, hi in ((offset, min(end, a)), (max(offset, b), end)):
                if lo < hi:
                    _zero_edge(layer, lo, hi)
        if a < b and discard and layer.backing is not None and _raw_data_file(layer):
            # qcow2.data-file.raw-cleared: the backing shows through where the data file
            # holds zeroes, so the data file stops being the raw disk first.
            feats = layer.hdr.features
            layer.hdr = layer.hdr.cleared_autoclear(
                keep=feats.autoclear & ~AUTOCLEAR_DATA_FILE_RAW)
            layer._write_header()
        if a < b:
            if _raw_data_file(layer):
                # qcow2.data-file.raw: "zero out s->data_file first" (QEMU's
                # qcow2_subcluster_zeroize); a discard leaves zeroes too (no backing file).
                layer.data.write_zeroes(a, b - a)
            _apply_units(layer, first_u, stop_u, how)


def _zero_edge(layer: Qcow2Layer, lo: int, hi: int) -> None:
    """Zero ``[lo, hi)``, part of one subcluster: already zero stays; unallocated whose rest
    reads zero becomes a zero subcluster; anything else gets zeroes written."""
    sbits, _ = _geometry(layer)
    kind, _, _ = layer.map_run(lo, hi - lo)
    if kind == K_ZERO:
        return
    u0 = lo >> sbits << sbits
    u1 = min(u0 + (1 << sbits), layer.size)
    if kind == K_UNALLOC and layer._backing_zero(u0, lo) and layer._backing_zero(hi, u1):
        _apply_units(layer, u0 >> sbits, (u0 >> sbits) + 1, Clear.ZERO_KEEP)
    else:
        layer._zero_by_writing(lo, hi)


def _apply_units(layer: Qcow2Layer, first_u: int, stop_u: int, how: Clear) -> None:
    """Clear whole subclusters ``[first_u, stop_u)`` (numbered across the disk)."""
    sbits, nsub = _geometry(layer)
    cb = layer._cbits
    per = cb - sbits
    u = first_u
    while u < stop_u:
        c = u >> per
        a = u - (c << per)
        b = min(stop_u - (c << per), nsub)
        u = (c + 1) << per
        cur, j, e, word = _load(layer, c)
        if cur is None and (how is Clear.ANY or how is Clear.BACKING):
            continue
        has_host, comp, bm = _state(layer, c, e, word)
        # The disk's last cluster is whole when the range reaches the disk end.
        whole = a == 0 and (b == nsub or (((c << per) + b) << sbits) >= layer.size)
        if comp and not whole:
            if how is not Clear.ZERO_KEEP and how is not Clear.ZERO_FREE:
                continue
            # A compressed cluster cannot be zeroed in part: the write makes it a normal
            # cluster (copied on write whole), whose subclusters then get their zero bits
            # like any other (qcow2.extended-l2.clear, as the reference does).
            g = c << cb
            layer._zero_by_writing(g + (a << sbits), min(g + (b << sbits), layer.size))
            cur, j, e, word = _load(layer, c)
            has_host, comp, bm = _state(layer, c, e, word)
            if comp:
                continue
        host_bits = e & (HOST_MASK | COPIED) if has_host else 0
        drop = False
        zero, alloc = zero_range(a, b), alloc_range(a, b)
        if how is Clear.ZERO_KEEP:
            # Data keeps its host cluster if it is ours alone; a shared one is let go.
            drop = whole and (comp or (has_host and not e & COPIED))
            new_bm = (bm | zero) & ~alloc
        elif how is Clear.ZERO_FREE:
            drop = whole
            new_bm = (bm | zero) & ~alloc
        else:
            drop = whole
            new_bm = bm & ~(zero | alloc)
        if drop:
            host_bits = 0
            new_bm &= ~ALL_ALLOC
        entry, new_word = _encode(layer, host_bits, new_bm)
        if (entry, new_word) == (e, word):
            continue
        held = [e] if drop and _holds(layer, e) else []
        layer._vet_releases(held)
        tofs = _store(layer, c, cur, j, entry, new_word)
        if held:
            layer._drop_refs(tofs, held)


# -- resize -------------------------------------------------------------------------------


def _reads_zero(layer: Qcow2Layer, start: int, end: int) -> bool:
    """Whether ``[start, end)`` is marked zero (or unallocated without a backing image)."""
    while start < end:
        kind, _, n = layer.map_run(start, end - start)
        if kind != K_ZERO and not (kind == K_UNALLOC and layer.backing is None):
            return False
        start += n
    return True


def grow_general(layer: Qcow2Layer, old: int, prealloc: PreallocateMode) -> None:
    """Make ``[old, size)`` read zero (the size is new in memory already); all modes but
    NONE and ZERO also map it to host clusters.  The data file grows with the disk."""
    cb = layer._cbits
    new_size = layer.size
    if layer.hdr.has_data_file:
        have = layer.data.size()
        if _raw_data_file(layer) and prealloc is PreallocateMode.NONE:
            # qcow2.data-file.raw: the grown area is mapped over the grown data file.
            prealloc = PreallocateMode.FORMAT_ALLOCATE
        if _raw_data_file(layer) and have > old:
            # Bytes a longer data file holds past the old end would show in the raw disk.
            layer.data.write_zeroes(old, min(have, new_size) - old)
        if have < new_size:
            full = (PreallocateMode.FULL_ALLOCATE, PreallocateMode.WRITE_DATA)
            layer.data.resize(new_size, prealloc if prealloc in full else PreallocateMode.NONE)
    if prealloc is PreallocateMode.NONE:
        # As the plain path: the new area is left unallocated.
        return
    head_end = min(-(-old >> cb) << cb, new_size)
    # Judged on the whole cluster, as the plain path's _reads_zero.
    if head_end > old and not _reads_zero(layer, old >> cb << cb, head_end):
        # The cluster the old end cut short may hold stale bytes past it: zeroes are written
        # to the subcluster the old end cuts (as the plain path and the reference do, the
        # range becomes data); the whole subclusters past it get their zero bits (QEMU's
        # qcow2_co_truncate: "Use zero clusters as much as we can"), so that a COW of a
        # shared cluster does not turn the old range's zero subclusters into data.
        sbits = _geometry(layer)[0]
        zero_from = min(-(-old >> sbits) << sbits, head_end)
        if zero_from > old and not _reads_zero(layer, old, zero_from):
            # A cut subcluster that reads zero holds no stale bytes: it is left as it is, as
            # QEMU's truncate and preallocation leave it.
            _zero_cut_unit(layer, old, zero_from, sbits)
        if head_end > zero_from:
            _apply_units(layer, zero_from >> sbits, -(-head_end >> sbits), Clear.ZERO_KEEP)
    if head_end == new_size:
        return
    first, stop = head_end >> cb, -(-new_size >> cb)
    per = cb - _geometry(layer)[0]
    if prealloc is PreallocateMode.ZERO:
        _apply_units(layer, first << per, stop << per, Clear.ZERO_FREE)
    else:
        _preallocate(layer, first, stop, prealloc, _grown_bitmap(layer, old, prealloc))


def _zero_cut_unit(layer: Qcow2Layer, old: int, end: int, sbits: int) -> None:
    """Write zeroes to ``[old, end)``, the rest of the subcluster the old end cuts.  The
    write's COW of a shared cluster copies every subcluster from the first allocated one
    (QEMU's calculate_l2_meta): those of the old range that were zero or unallocated get that
    state back, so that a grow changes the old range only in the subcluster the old end cuts."""
    first_u = (old >> layer._cbits << layer._cbits) >> sbits
    before = [(u, layer.map_run(u << sbits, 1 << sbits)[0]) for u in range(first_u, old >> sbits)]
    pos = old
    while pos < end:
        host, n, _ = layer.prepare(pos, end - pos, True)
        layer.data.write_zeroes(host, n)
        pos += n
    for u, was in before:
        if was in (K_ZERO, K_UNALLOC) and layer.map_run(u << sbits, 1 << sbits)[0] != was:
            _apply_units(layer, u, u + 1, Clear.ZERO_KEEP if was == K_ZERO else Clear.BACKING)


def _grown_bitmap(layer: Qcow2Layer, old: int, prealloc: PreallocateMode) -> int | None:
    """The bitmap of the preallocated clusters past the old end ``old`` (None: keep it).

    access.resize.grow-format-allocate: "the new range reads zero and the backing never
    shows through".  Left unallocated, the subclusters would show a backing that reaches past
    the old end; QEMU then truncates with BDRV_REQ_ZERO_WRITE and its images come out with
    the zero bits set (preallocation=metadata) or the allocation bits set over zeroed host
    clusters (falloc/full).  An external data file may hold stale bytes there: zero bits.
    """
    backing = layer.backing
    if not layer._ext or backing is None or backing.size <= old:
        return None
    if prealloc is PreallocateMode.FORMAT_ALLOCATE or layer.hdr.has_data_file:
        return ALL_ZERO
    return ALL_ALLOC


def _preallocate(
    layer: Qcow2Layer, first: int, stop: int, prealloc: PreallocateMode, bitmap: int | None
) -> None:
    """Map clusters ``[first, stop)`` (new, past the old end) to host clusters that read as
    zero.  With extended L2 entries their bitmaps become ``bitmap``, or (None) stay as they
    are (QEMU's preallocate_co links them with ``m->prealloc``: no subcluster marked
    allocated)."""
    cb, cs = layer._cbits, layer._cs
    dfile = layer.hdr.has_data_file
    mode = PreallocateMode.NONE if prealloc is PreallocateMode.FORMAT_ALLOCATE else prealloc
    c = first
    while c < stop:
        l1i = c >> layer._l2bits
        run = min(stop, (l1i + 1) << layer._l2bits) - c
        if dfile:
            m, host = run, c << cb
        else:
            hc, m = layer.refs.allocate(run)
            host = hc << cb
            if host < layer.storage.size():
                layer.storage.write_zeroes(host, m * cs)
            if layer.storage.size() < host + m * cs:
                layer.storage.resize(host + m * cs, mode)
        for t in range(m):
            cur, j, e, word = _load(layer, c + t)
            _, _, bm = _state(layer, c + t, e, word)
            held = [e] if _holds(layer, e) else []
            layer._vet_releases(held)
            new_bm = (bm if bitmap is None else bitmap) if layer._ext else 1
            entry, new_word = _encode(layer, (host + t * cs) | COPIED, new_bm)
            tofs = _store(layer, c + t, cur, j, entry, new_word)
            if held:
                layer._drop_refs(tofs, held)
        c += m


def shrink_general(layer: Qcow2Layer, new_size: int) -> None:
    """Unmap the clusters wholly past ``new_size`` (the caller unhooks their tables)."""
    cb = layer._cbits
    per = cb - _geometry(layer)[0]
    first, stop = -(-new_size >> cb), -(-layer.size >> cb)
    if first < stop:
        _apply_units(layer, first << per, stop << per, Clear.BACKING)
    if layer.hdr.has_data_file and layer.data.size() > new_size:
        # The data file shrinks with the disk (a raw data file stays the raw disk).
        layer.data.resize(new_size)

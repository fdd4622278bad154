"""Mutants of pyimago.fast: its qcow2 layer, its caches, its refcounts and its FormatAccess.

Each overrides one small piece of ``Qcow2Layer`` (or of the ``TableCache`` / ``Refcounts``
it owns, swapped in by ``_mutate``), or of fast's ``FormatAccess``, the way a real bug
would look.  ``fast_mutant_target`` drives them as the machines drive ``pyimago.fast``
(default chains, power cuts checked, file chains through fast's own file storage).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

from pyimago import fast
from pyimago.fast._access import FormatAccess
from pyimago.fast._cache import TableCache
from pyimago.fast._entries import COMPRESSED, COPIED, HOST_MASK, ZERO_FLAG
from pyimago.fast._layer import Clear
from pyimago.fast._qcow2 import Qcow2Layer
from pyimago.fast._refcounts import REFTABLE_OFFSET_MASK, Refcounts
from pyimago.fast._runs import K_ZERO
from pyimago.oracle.targets import ImplementationTarget

__all__ = ["SMALL_PARALLEL_PIECES", "fast_mutant_target"]

#: fast splits only reads of 128 KiB and writes of 16 MiB into parallel jobs (a thread
#: hand-off costs more below that), of 64 KiB pieces at least: sizes the machines' disks
#: (at most a few MiB) never give a write, so the kill-rate runs fast's mutants with these
#: instead (module globals of ``pyimago.fast._access``, read at each call), and a request of
#: 8 KiB with parallelization > 1 runs as two jobs or more (issue 9: "the thread pool and
#: job splitting are exercised with at least two jobs").
SMALL_PARALLEL_PIECES = {"_PARALLEL_MIN": 8 << 10, "_PARALLEL_WRITE_MIN": 8 << 10,
                         "_CHUNK_MIN": 4 << 10}


# -- the L2 and refcount caches ---------------------------------------------------------------


class _LossyCache(TableCache):
    def add(self, ofs: int, tbl: array[int], *, dirty: bool = False) -> None:
        self.tables[ofs] = tbl
        self.tables.move_to_end(ofs)
        if self._flag:
            self.by_entry[ofs] = self.by_entry[ofs | self._flag] = tbl
        if dirty:
            self.dirty.add(ofs)
        while len(self.tables) > self.limit:
            old, _ = self.tables.popitem(last=False)
            self._unalias(old)
            self.dirty.discard(old)


class EvictionDropsDirtyL2(Qcow2Layer):
    """fast's L2 cache drops a dirty table it evicts instead of writing it back."""

    def _mutate(self) -> None:
        self._l2.__class__ = _LossyCache


class _UnorderedEviction(TableCache):
    def _write(self, ofs: int, tbl: array[int]) -> None:
        self._store(ofs, tbl)
        self.dirty.discard(ofs)
        if self._after_store is not None:
            self._after_store(ofs)


class EvictedL2BeforeRefcounts(Qcow2Layer):
    """An L2 table evicted from fast's cache is written without first writing the refcounts
    and pending data it depends on (crash.order.refcount-before-reference)."""

    def _mutate(self) -> None:
        self._l2.__class__ = _UnorderedEviction


class _ReleaseFirst(TableCache):
    def write_back(self) -> None:
        if not self.dirty:
            return
        if self._after_store is not None:
            for ofs in sorted(self.dirty):
                self._after_store(ofs)
        if self._before_store is not None:
            self._before_store()
        for ofs in sorted(self.dirty):
            tbl = self.tables.get(ofs)
            if tbl is not None:
                self._store(ofs, tbl)
        self.dirty = set()


class ReleaseBeforeL2Store(Qcow2Layer):
    """Write-back releases what the tables' old entries held before the tables are written
    (crash.order.unref-after-entry)."""

    def _mutate(self) -> None:
        self._l2.__class__ = _ReleaseFirst


class _LossyBlockCache(TableCache):
    def add(self, ofs: int, tbl: array[int], *, dirty: bool = False) -> None:
        self.limit = 2  # (as a small cache budget gives it)
        _LossyCache.add(self, ofs, tbl, dirty=dirty)  # type: ignore[arg-type]


class RefcountEvictionDropsDirty(Qcow2Layer):
    """fast's refcount-block cache drops a dirty block it evicts instead of writing it
    back (with a cache small enough to evict: two blocks)."""

    def _mutate(self) -> None:
        self.refs.blocks.__class__ = _LossyBlockCache


class _TableFirstRefcounts(Refcounts):
    def write_back(self) -> None:
        if self._table_dirty:
            from pyimago.fast._codec import encode_u64_table

            self._storage.write(encode_u64_table(self.table), self.span.at)
            self._table_dirty = False
        super().write_back()


class RefcountTableBeforeBlocks(Qcow2Layer):
    """Refcount write-back writes the table (pointing at new blocks) before the blocks
    (crash.order.new-structure-before-pointer)."""

    def _mutate(self) -> None:
        self.refs.__class__ = _TableFirstRefcounts


def _swap_refcounts(layer: Qcow2Layer, refcounts: type[Refcounts]) -> None:
    layer.refs.__class__ = refcounts
    # The block cache was handed the bound store method when the layer opened.
    layer.refs.blocks._store = layer.refs._store_block


# -- refcounts ----------------------------------------------------------------------------------


class _SubByteMsbRefcounts(Refcounts):
    def _store_block(self, ofs: int, blk: array[int]) -> None:
        if self._width >= 8:
            super()._store_block(ofs, blk)
            return
        per = 8 // self._width
        mirrored = array(blk.typecode, blk)
        for i in range(0, len(blk), per):
            mirrored[i : i + per] = blk[i : i + per][::-1]
        super()._store_block(ofs, mirrored)


class SubByteRefcountsMsbFirst(Qcow2Layer):
    """fast packs refcounts of 1, 2 and 4 bits from the most significant bit of each byte
    (QEMU: from the least); its cache reads its own values back until reopened."""

    def _mutate(self) -> None:
        _swap_refcounts(self, _SubByteMsbRefcounts)


class _LittleEndianRefcounts(Refcounts):
    def _store_block(self, ofs: int, blk: array[int]) -> None:
        if self._width < 16:
            super()._store_block(ofs, blk)
            return
        out = array(blk.typecode, blk)
        out.byteswap()  # (encode_refblock swaps again: the block lands little-endian)
        super()._store_block(ofs, out)


class WideRefcountsLittleEndian(Qcow2Layer):
    """Refcount blocks of 16, 32 and 64 bits are stored little-endian."""

    def _mutate(self) -> None:
        _swap_refcounts(self, _LittleEndianRefcounts)


class _SelfUncountedBlocks(Refcounts):
    def _add_block(self, i: int) -> None:
        super()._add_block(i)
        ofs = self.table[i] & REFTABLE_OFFSET_MASK if i < len(self.table) else 0
        home = ofs >> self._cbits
        if ofs and home >> self._shift == i:
            blk = self.blocks.get(ofs)
            if blk is not None:
                blk[home & (self._per_block - 1)] = 0


class NewRefcountBlockUncounted(Qcow2Layer):
    """A new refcount block that covers its own cluster does not count itself: the block
    reads as free and may be handed out as data."""

    def _mutate(self) -> None:
        self.refs.__class__ = _SelfUncountedBlocks


class _OldTableKept(Refcounts):
    def free(self, first: int, n: int = 1) -> None:
        if getattr(self, "_moving", False):
            return
        super().free(first, n)

    def _grow_table(self, entries: int) -> None:
        self._moving = True
        try:
            super()._grow_table(entries)
        finally:
            self._moving = False


class MovedRefcountTableLeaks(Qcow2Layer):
    """A refcount table that moves never frees its old clusters (a leak ``qemu-img check``
    reports)."""

    def _mutate(self) -> None:
        self.refs.__class__ = _OldTableKept


# -- write, mapping and zeroing paths ---------------------------------------------------------


class ZeroRunSwallowsCompressed(Qcow2Layer):
    """A zero run goes on over any entry with bit 0 set: a compressed cluster whose
    descriptor's lowest bit is 1 reads as zeroes."""

    def map_run(self, offset: int, max_len: int) -> tuple[int, int, int]:
        kind, host, n = super().map_run(offset, max_len)
        if kind != K_ZERO or self._general:
            return kind, host, n
        end = min(offset + max_len, self.size)
        pos = offset + n
        while pos < end:
            c = pos >> self._cbits
            tbl = self._l2_table(c >> self._l2bits)
            if tbl is None or not tbl[c & self._l2mask] & ZERO_FLAG:
                break
            pos = min((c + 1) << self._cbits, end)
        return kind, host, pos - offset


class MapRunPastMaxLength(Qcow2Layer):
    """An unallocated or zero run is reported to the end of its table, past ``max_len``."""

    def map_run(self, offset: int, max_len: int) -> tuple[int, int, int]:
        kind, host, n = super().map_run(offset, max_len)
        if kind == K_ZERO and n == max_len and not self._general:
            table_end = ((offset >> self._cbits >> self._l2bits) + 1) << (
                self._l2bits + self._cbits)
            more = super().map_run(offset, min(table_end, self.size) - offset)
            if more[0] == kind:
                return kind, host, more[2]
        return kind, host, n


class ZeroEdgeHidesBacking(Qcow2Layer):
    """Zeroing part of an unallocated cluster turns all of it into a zero cluster without
    asking whether the backing shows data in the rest of it."""

    def _backing_zero(self, start: int, end: int) -> bool:
        return True


class DiscardHeadClusterWhole(Qcow2Layer):
    """A discard or zeroing takes the cluster its range starts in as whole (floor for
    ceiling): the bytes before the range's start in that cluster are lost."""

    def clear(self, offset: int, length: int, how: Clear) -> None:
        in_c = offset & self._cmask
        if in_c and length:
            length += in_c
            offset -= in_c
        super().clear(offset, length, how)


class PreallocReusedStale(Qcow2Layer):
    """A preallocating grow does not zero the host clusters it reuses (freed earlier,
    inside the file): their stale data shows in the grown area."""

    def _preallocate(self, first: int, stop: int, prealloc: Any) -> None:
        storage = self.storage
        real = storage.write_zeroes
        end = storage.size()

        def skip_inside(offset: int, length: int) -> None:
            if offset + length > end:
                real(offset, length)

        storage.write_zeroes = skip_inside  # type: ignore[method-assign]
        try:
            super()._preallocate(first, stop, prealloc)
        finally:
            del storage.write_zeroes


class InflatedCacheIgnoresEntry(Qcow2Layer):
    """The last-decompressed-cluster cache is hit on the host offset alone: two compressed
    clusters that share a host cluster read as the same one."""

    def _inflated(self, e: int) -> bytes:
        last = self._last_inflated
        if last is not None and (last[0] & ~0x1FF & self._comp_host) == (
            e & ~0x1FF & self._comp_host
        ):
            return last[1]
        return super()._inflated(e)


class CowTailFromHead(Qcow2Layer):
    """A write that allocates several clusters copies the tail's old content from the
    first cluster's entry, not the last's."""

    def _old_content(self, buf: memoryview, guest: int, e: int) -> None:
        olds = getattr(self, "_mutant_olds", None)
        super()._old_content(buf, guest, olds[0] if olds else e)

    def _fresh_run(self, tbl: Any, c: int, stop: int) -> tuple[int, list[int]]:
        k, olds = super()._fresh_run(tbl, c, stop)
        self._mutant_olds = olds if len(olds) > 1 else None
        return k, olds


class GrowHeaderFirst(Qcow2Layer):
    """A grow writes the new size into the header before the new area is prepared
    (crash.order.grow-size-last)."""

    def resize_grow(self, new_size: int, prealloc: Any) -> None:
        old = self.size
        if new_size > old and self.writable:
            self._check_new_size(new_size)
            self.hdr = self.hdr.resized(new_size)
            self._write_header()
            self.hdr = self.hdr.resized(old)
        super().resize_grow(new_size, prealloc)


class L1BeforeL2Tables(Qcow2Layer):
    """The L1 table is written before the L2 tables it points at
    (crash.order.new-structure-before-pointer)."""

    def _store_l1(self) -> None:
        if self.hdr.l1.n:
            from pyimago.fast._codec import encode_u64_table

            self.refs.write_back()
            self.storage.write(encode_u64_table(self._l1[: self.hdr.l1.n]), self.hdr.l1.at)
        super()._store_l1()


class ZeroClusterSectorSplit(Qcow2Layer):
    """A partial write into a reused zero cluster zeroes around the caller's range, not
    around the sectors it touches: a 512-byte sector is split between two writes."""

    def _fill_zero_cluster(self, h: int, in_c: int, n: int, data: Any, overwrite: bool) -> bool:
        cs = self._cs
        stop = in_c + n
        if not overwrite or data is None:
            return super()._fill_zero_cluster(h, in_c, n, data, overwrite)
        if in_c:
            self.storage.write_zeroes(h, in_c)
        if stop < cs:
            self.storage.write_zeroes(h + stop, cs - stop)
        self.storage.write(bytes(data[:n]), h + in_c)
        return True


class KeepsSharedOnWriteZeroes(Qcow2Layer):
    """write_zeroes keeps a host cluster that is not this image's alone (COPIED clear:
    shared with a snapshot) under the zero flag; a later write reuses it in place."""

    def _new_entry(self, x: int, target: int, c: int) -> int:
        if target == -1 and x & HOST_MASK and not x & (COMPRESSED | ZERO_FLAG):
            self._check_entry(c, x)
            return x | ZERO_FLAG | COPIED
        return super()._new_entry(x, target, c)


# -- FormatAccess -----------------------------------------------------------------------------


class ReadvAdvancesByFirst(FormatAccess):
    """readv advances by the first buffer's size after every buffer."""

    def readv(self, buffers: Any, offset: int) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        step = len(views[0]) if views else 0
        total = sum(map(len, views))
        if offset + total > (1 << 64) - 1:
            super().readv(views, offset)
            return
        for view in views:
            self.readinto(view, offset)
            offset += step


class SpreadLosesFirstHand(FormatAccess):
    """With parallelization > 1 the calling thread runs the second hand of jobs, not the
    first: the first hand never runs and the second runs twice."""

    def _spread(self, jobs: list[Callable[[], None]], n: int) -> None:
        n = min(n, len(jobs))
        if n <= 1:
            super()._spread(jobs, n)
            return
        for job in jobs[1::n]:
            job()
        for i in range(1, n):
            for job in jobs[i::n]:
                job()


class WritevReordersBuffers(FormatAccess):
    """writev joins the buffers after the first in reverse order."""

    def writev(self, buffers: Any, offset: int) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        super().writev(views[:1] + views[1:][::-1], offset)


# -- the target -----------------------------------------------------------------------------


def _swap(access: Any, layer_mutant: type[Qcow2Layer] | None,
          access_mutant: type[FormatAccess] | None) -> None:
    while isinstance(access, FormatAccess):
        layer = access.driver
        if access_mutant is not None and type(access) is FormatAccess:
            access.__class__ = access_mutant
            # The hot read / write paths are bound per instance: the mutant's methods win.
            for name in ("readinto", "write"):
                if name in vars(access_mutant):
                    vars(access).pop(name, None)
        if layer_mutant is not None and type(layer) is Qcow2Layer:
            layer.__class__ = layer_mutant
            hook = getattr(layer, "_mutate", None)
            if hook is not None:
                hook()
        access = getattr(layer, "backing", None)


def fast_mutant_target(
    name: str,
    layer: type[Qcow2Layer] | None = None,
    access: type[FormatAccess] | None = None,
) -> ImplementationTarget:
    """pyimago.fast with its qcow2 layers (and / or FormatAccess objects) mutated, driven as
    the machines drive fast."""

    def open_mutant(location: Any, **kwargs: Any) -> Any:
        opened = fast.open_image(location, **kwargs)
        _swap(opened, layer, access)
        backing = kwargs.get("backing")
        if isinstance(backing, FormatAccess):
            _swap(backing, layer, access)
        return opened

    return ImplementationTarget(
        name=f"mutant:{name}",
        open_image=open_mutant,
        create_image=fast.create_image,
        l2_cache_option=True,
        crash_safe=True,
        file_storage=fast.FastFileStorage,
    )


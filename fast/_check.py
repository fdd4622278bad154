"""check() for pyimago.fast: rebuild every refcount from the metadata, compare, repair.

The walk and the counts are QEMU's (block/qcow2-refcount.c, ``qcow2_check_refcounts``), so
that a :class:`CheckResult` says what ``qemu-img check --output=json`` says:

1. count a reference for the header, the active L1 table, every L2 table and data cluster
   it reaches (checking entries on the way), every snapshot's L1 and L2 tables and data
   clusters, the snapshot table, the refcount table and every refcount block;
2. compare each cluster's refcount on storage with the count: higher is a leak, lower a
   corruption (a referenced cluster with refcount 0 also needs the refcount structure
   rebuilt);
3. check the COPIED flags of the active tables (set exactly where the refcount is 1).

Repair (qcow2.corrupt.repair) follows ``qemu-img check -r``: ``"leaks"`` lowers refcounts
to the count; ``"all"`` also raises refcounts, fixes COPIED flags and, where needed, builds
a new refcount structure.  Repairs are ordered as crash.order.* asks: refcounts that rise
reach storage before anything else; a new refcount structure is written completely before
the header points at it.  Like qemu-img, the result of a repair is the count of a second,
read-only check, with what the repair fixed.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

from pyimago.reference._check import CheckProblem, CheckResult, ProblemKind, RepairMode
from pyimago.reference._errors import (
    CorruptImageError,
    ImageNotFoundError,
    InvalidRequestError,
    PyimagoError,
    UnsupportedError,
)
from pyimago.reference._storage import Storage

from ._access import FormatAccess
from ._bitmaps import read_directory
from ._codec import (
    decode_refblock,
    decode_u64_table,
    encode_refblock,
    encode_u64_table,
    refblock_typecode,
)
from ._entries import (
    COMPRESSED,
    COPIED,
    HOST_MASK,
    L1_RESERVED,
    L2_RESERVED,
    REFT_OFFSET_MASK,
    REFT_RESERVED,
    ZERO_FLAG,
)
from ._header import (
    MAGIC,
    Extension,
    Header,
    Incompat,
    Span,
    parse_header,
)
from ._overlap import MetadataIndex, clusters_of
from ._qcow2 import Qcow2Layer
from ._snapshots import Snapshot, read_snapshot_table
from ._storage import FastFileStorage
from ._subcluster import ALL_ALLOC as _ALL_ALLOC
from ._subcluster import ALL_ZERO as _ALL_ZERO

__all__ = ["check"]

#: QCOW_MAX_L1_SIZE / 8
_MAX_L1_ENTRIES = (32 << 20) // 8

#: Repair flags (QEMU's BDRV_FIX_LEAKS, BDRV_FIX_ERRORS).
_LEAKS = 1
_ERRORS = 2


#: The most clusters a file may hold for check() (QEMU's INT_MAX).
_MAX_CLUSTERS = (1 << 31) - 1


def _zeros(n: int) -> array[int]:
    return array("Q", bytes(8 * n))


class _CannotCheck(Exception):
    """The check cannot be done at all (qemu-img: "Check failed")."""


class _RepairRefused(Exception):
    """A repair write would land on other metadata: the image is marked corrupt."""


class _Unreadable(Exception):
    """A refcount that cannot be read (its refcount block offset is unaligned)."""


@dataclass
class _Result:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    allocated: int = 0
    fragmented: int = 0
    compressed: int = 0
    highest: int = 0
    problems: list[CheckProblem] = field(default_factory=list)

    def note(self, kind: ProblemKind, offset: int | None, msg: str, repaired: bool = False) -> None:
        self.problems.append(CheckProblem(kind, offset, msg, repaired))
        if repaired:
            return
        if kind is ProblemKind.CORRUPTION:
            self.corruptions += 1
        elif kind is ProblemKind.LEAK:
            self.leaks += 1
        else:
            self.check_errors += 1

    def copy(self) -> _Result:
        return _Result(self.corruptions, self.leaks, self.check_errors, self.corruptions_fixed,
                       self.leaks_fixed, self.allocated, self.fragmented, self.compressed,
                       self.highest, list(self.problems))


_C = ProblemKind.CORRUPTION


class _Checker:
    """One pass of QEMU's check over one image."""

    #: check()'s progress callback: (L1 entries walked, L1 entries of all L1 tables).
    progress: Callable[[int, int], None] | None = None
    walked = to_walk = 0

    def __init__(self, storage: Storage, hdr: Header, snaps: list[Snapshot], snaps_bytes: int,
                 exts: Sequence[Extension] = ()) -> None:
        self.st = storage
        self.hdr = hdr
        self.exts = exts
        self.snaps = snaps
        self.snaps_bytes = snaps_bytes
        self.cb = hdr.cluster_bits
        self.cs = 1 << self.cb
        self.width = 1 << hdr.refcount_order
        self.refmax = (1 << self.width) - 1
        self.per_block_bits = self.cb + 3 - hdr.refcount_order
        self.comp_shift = 62 - (self.cb - 8)
        self.comp_mask = (1 << self.comp_shift) - 1
        self.comp_sectors = (1 << (self.cb - 8)) - 1
        self.reload()

    def reload(self) -> None:
        """(Re)read what QEMU keeps in memory from opening: L1 and refcount tables."""
        hdr = self.hdr
        self.file_size = self.st.size()
        self.l1 = decode_u64_table(self.read(hdr.l1.at, 8 * hdr.l1.n))
        self.reftable = decode_u64_table(self.read(hdr.reftable.at, hdr.reftable.n * self.cs))
        self.blocks: dict[int, array[int]] = {}
        self.dirty: set[int] = set()

    def read(self, at: int, n: int) -> bytes:
        """``n`` bytes from ``at``; past the file end they read as zeroes (as QEMU's)."""
        have = max(0, min(n, self.file_size - at))
        data = self.st.read(at, have) if have else b""
        return data + bytes(n - len(data))

    # -- the stored refcounts -------------------------------------------------------------

    def _block(self, i: int) -> array[int] | None:
        if i >= len(self.reftable):
            return None
        ofs = self.reftable[i] & REFT_OFFSET_MASK
        if not ofs:
            return None
        if ofs & (self.cs - 1):
            raise _Unreadable(f"refcount block {i} at 0x{ofs:x} is not cluster-aligned")
        blk = self.blocks.get(ofs)
        if blk is None:
            blk = self.blocks[ofs] = decode_refblock(self.read(ofs, self.cs), self.width)
        return blk

    def stored(self, cluster: int) -> int:
        blk = self._block(cluster >> self.per_block_bits)
        return 0 if blk is None else blk[cluster & ((1 << self.per_block_bits) - 1)]

    def set_stored(self, cluster: int, value: int) -> None:
        i = cluster >> self.per_block_bits
        blk = self._block(i)
        assert blk is not None
        blk[cluster & ((1 << self.per_block_bits) - 1)] = value
        self.dirty.add(self.reftable[i] & REFT_OFFSET_MASK)

    def write_blocks(self) -> None:
        for ofs in sorted(self.dirty):
            self.st.write(encode_refblock(self.blocks[ofs], self.width), ofs)
        self.dirty.clear()

    # -- repair writes: QEMU's overlap check ----------------------------------------------

    def write_meta(self, at: int, data: bytes, own: str) -> None:
        """Write a repaired table (or entry) of kind ``own``; if it would land on any other
        metadata, refuse as qemu-img does (qcow2_pre_write_overlap_check)."""
        index = self._index(own)
        clash = index.first_hit(at >> self.cb, (at + len(data) - 1) >> self.cb)
        if clash is not None:
            raise _RepairRefused(
                f"repairing the {own} at 0x{at:x} would overwrite the {index.what(clash)}: "
                "metadata overlap check failed"
            )
        self.st.write(data, at)

    def _index(self, skip: str) -> MetadataIndex:
        cb, cs, hdr = self.cb, self.cs, self.hdr
        parts = [
            (range(1), "header"),
            (clusters_of(hdr.l1.at, 8 * hdr.l1.n, cb), "active L1 table"),
            (clusters_of(hdr.reftable.at, hdr.reftable.n * cs, cb), "refcount table"),
            (clusters_of(hdr.snapshots.at, self.snaps_bytes, cb), "snapshot table"),
        ]
        parts += [(range(e >> cb, (e >> cb) + 1), "refcount block") for e in
                  (x & REFT_OFFSET_MASK for x in self.reftable) if e and not e & (cs - 1)]
        parts += [(range(e >> cb, (e >> cb) + 1), "active L2 table") for e in
                  (x & HOST_MASK for x in self.l1) if e]
        for sn in self.snaps:
            if sn.l1.at & (cs - 1) or sn.l1.n > _MAX_L1_ENTRIES:
                continue
            parts.append((clusters_of(sn.l1.at, 8 * sn.l1.n, cb), "inactive L1 table"))
            parts += [(range(e >> cb, (e >> cb) + 1), "inactive L2 table") for e in
                      (x & HOST_MASK for x in decode_u64_table(self.read(sn.l1.at, 8 * sn.l1.n)))
                      if e]
        return MetadataIndex((r, what) for r, what in parts if what != skip)

    # -- counting references (calculate_refcounts) ----------------------------------------

    def calculate(self, res: _Result, fix: int) -> tuple[array[int], bool]:
        nb = -(-self.file_size // self.cs)
        if nb > _MAX_CLUSTERS:
            # QEMU's limit too (qcow2_check_refcounts: nb_clusters > INT_MAX is -EFBIG).
            raise _CannotCheck(f"the file holds {nb} clusters, more than {_MAX_CLUSTERS}")
        self.counts = _zeros(nb)
        self.rebuild = False
        hdr = self.hdr
        self.walked, self.to_walk = 0, hdr.l1.n + sum(sn.l1.n for sn in self.snaps)
        self.inc(res, 0, self.cs)
        self.check_l1(res, hdr.l1.at, hdr.l1.n, fix, active=True)
        for sn in self.snaps:
            if sn.l1.at & (self.cs - 1):
                res.note(_C, sn.l1.at, f"snapshot {sn.id} ({sn.name}) l1_offset=0x{sn.l1.at:x}: "
                         "L1 table is not cluster aligned; snapshot table entry corrupted")
                continue
            if sn.l1.n > _MAX_L1_ENTRIES:
                res.note(_C, sn.l1.at, f"snapshot {sn.id} ({sn.name}) l1_size=0x{sn.l1.n:x}: "
                         "L1 table is too large; snapshot table entry corrupted")
                continue
            self.check_l1(res, sn.l1.at, sn.l1.n, fix, active=False)
        self.inc(res, hdr.snapshots.at, self.snaps_bytes)
        self.count_bitmaps(res)
        self.inc(res, hdr.reftable.at, hdr.reftable.n * self.cs)
        self.check_refblocks(res, fix)
        if self.progress is not None:
            self.progress(self.to_walk, self.to_walk)
        return self.counts, self.rebuild

    def count_bitmaps(self, res: _Result) -> None:
        """qcow2_check_bitmaps_refcounts: while the bitmaps autoclear bit is set, the bitmap
        directory, tables and data clusters hold references too (qcow2.bitmaps.in-use), so
        check never calls them leaks and repair never frees them."""
        try:
            directory = read_directory(self.st, self.hdr, self.exts)
            regions = directory.regions(self.st, self.cs) if directory is not None else []
        except CorruptImageError as exc:
            res.note(_C, None, str(exc))
            return
        for offset, length in regions:
            self.inc(res, offset, length)

    def inc(self, res: _Result, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt: one reference to every cluster of the range."""
        if size <= 0:
            return
        # "it may be OK to reference some space after file end but it should be less
        # than one cluster"
        if offset + size - self.file_size >= self.cs:
            res.note(_C, offset, "counting reference for region exceeding the end of the "
                     f"file by one cluster or more: offset 0x{offset:x} size 0x{size:x}")
            return
        counts = self.counts
        for k in range(offset >> self.cb, ((offset + size - 1) >> self.cb) + 1):
            if k >= len(counts):
                counts.extend(_zeros(k + 1 - len(counts)))
            if counts[k] == self.refmax:
                res.note(_C, k << self.cb, f"overflow cluster offset=0x{k << self.cb:x}")
                continue
            counts[k] += 1

    def check_l1(self, res: _Result, at: int, n: int, fix: int, *, active: bool) -> None:
        if not n:
            return
        self.inc(res, at, 8 * n)
        for i, e in enumerate(decode_u64_table(self.read(at, 8 * n))):
            if not e:
                continue
            if self.progress is not None:
                self.progress(self.walked + i, self.to_walk)
            if e & L1_RESERVED:
                res.note(_C, at, f"found L1 entry with reserved bits set: {e:x}")
            l2 = e & HOST_MASK
            self.inc(res, l2, self.cs)
            if l2 & (self.cs - 1):
                res.note(_C, l2, f"l2_offset={l2:x}: Table is not cluster aligned; L1 entry "
                         "corrupted")
            self.check_l2(res, l2, fix, active)
        self.walked += n

    def check_l2(self, res: _Result, ofs: int, fix: int, active: bool) -> None:
        cs = self.cs
        next_contiguous = 0
        # Extended L2 entries: (entry, subcluster bitmap) pairs (qcow2.check.extended-l2).
        ext = self.hdr.extended_l2
        dfile = self.hdr.has_data_file
        words = decode_u64_table(self.read(ofs, cs))
        for i in range(0, len(words), 2 if ext else 1):
            e = words[i]
            bitmap = words[i + 1] if ext else 0
            if not e and not bitmap & _ALL_ALLOC:
                continue
            if e & COMPRESSED:
                if e & COPIED:
                    res.note(_C, ofs, f"coffset=0x{e & self.comp_mask:x}: copied flag must "
                             "never be set for compressed clusters")
                    e &= ~COPIED
                if dfile:
                    res.note(_C, ofs, f"compressed cluster {i >> ext} with data file, "
                             f"entry=0x{e:x}")
                    continue
                if bitmap:
                    res.note(_C, ofs, f"compressed cluster {i >> ext} with non-zero subcluster "
                             f"allocation bitmap, entry=0x{e:x}")
                    continue
                coffset = e & self.comp_mask
                nsec = ((e >> self.comp_shift) & self.comp_sectors) + 1
                csize = nsec * 512 - (coffset & 511)
                self.inc(res, coffset, csize)
                if active:
                    res.allocated += 1
                    res.compressed += 1
                    res.fragmented += 1
                continue
            if e & L2_RESERVED:
                res.note(_C, ofs, f"found l2 entry with reserved bits set: {e:x}")
            host = e & HOST_MASK
            if not host and not (dfile and e & COPIED):
                # Unallocated or a plain zero cluster (offset 0 with COPIED is the data
                # file's first cluster).
                if bitmap & _ALL_ALLOC:
                    res.note(_C, ofs, "Unallocated cluster has non-zero subcluster "
                             "allocation map")
                continue
            if bitmap & _ALL_ALLOC & (bitmap >> 32):
                res.note(_C, host, f"offset={host:x}: Allocated cluster has corrupted "
                         "subcluster allocation bitmap")
            if host & (cs - 1):
                data = bool(bitmap & _ALL_ALLOC) if ext else not e & ZERO_FLAG
                what = "Data" if data else "Preallocated"
                msg = (f"offset={host:x}: {what} cluster is not properly aligned; L2 entry "
                       "corrupted.")
                if not data and fix & _ERRORS:
                    # fix_l2_entry_by_zero: the entry becomes a plain zero cluster, and the
                    # cluster is not counted (it is unused now).
                    fixed = (bytes(8) + _ALL_ZERO.to_bytes(8, "big") if ext
                             else ZERO_FLAG.to_bytes(8, "big"))
                    self.write_meta(ofs + 8 * i, fixed,
                                    "inactive L2 table" if not active else "active L2 table")
                    res.corruptions_fixed += 1
                    res.note(_C, host, msg, repaired=True)
                    continue
                res.note(_C, host, msg)
            if active:
                res.allocated += 1
                if next_contiguous and host != next_contiguous:
                    res.fragmented += 1
                next_contiguous = host + cs
            if not dfile:
                # Data file clusters are not refcounted (qcow2.data-file.write).
                self.inc(res, host, cs)

    def check_refblocks(self, res: _Result, fix: int) -> None:
        nb = len(self.counts)
        for i, e in enumerate(self.reftable):
            ofs = e & REFT_OFFSET_MASK
            if e & REFT_RESERVED:
                res.note(_C, None, f"refcount table entry {i} has reserved bits set")
                self.rebuild = True
                continue
            if ofs & (self.cs - 1):
                res.note(_C, ofs, f"refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                self.rebuild = True
                continue
            if ofs >> self.cb >= nb:
                res.note(_C, ofs, f"refcount block {i} is outside image")
                if fix & _ERRORS:
                    # qemu-img check -r all extends the file up to the block (however far
                    # away); we build a new refcount structure instead (a recorded
                    # divergence of qcow2.corrupt.check).
                    self.rebuild = True
                continue
            if ofs:
                self.inc(res, ofs, self.cs)
                n = self.counts[ofs >> self.cb]
                if n != 1:
                    res.note(_C, ofs, f"refcount block {i} refcount={n}")
                    self.rebuild = True

    # -- comparing (compare_refcounts) ----------------------------------------------------

    def compare(self, res: _Result, fix: int) -> bool:
        """Compare stored refcounts with the counts; returns whether a rebuild is needed."""
        rebuild = False
        res.highest = 0
        for i, want in enumerate(self.counts):
            try:
                have = self.stored(i)
            except _Unreadable as exc:
                res.note(ProblemKind.CHECK_ERROR, i << self.cb,
                         f"Can't get refcount for cluster {i}: {exc}")
                continue
            if have or want:
                res.highest = i
            if have == want:
                continue
            kind = _C if have < want else ProblemKind.LEAK
            msg = f"cluster {i} refcount={have} reference={want}"
            fixed = False
            if have == 0:
                rebuild = True
            elif (have > want and fix & _LEAKS) or (have < want and fix & _ERRORS):
                self.set_stored(i, want)
                fixed = True
                if have > want:
                    res.leaks_fixed += 1
                else:
                    res.corruptions_fixed += 1
            res.note(kind, i << self.cb, msg, repaired=fixed)
        self.write_blocks()
        return rebuild

    # -- COPIED flags (check_oflag_copied) ------------------------------------------------

    def oflag_copied(self, res: _Result, fix: int) -> None:
        if fix & _ERRORS:
            repair = True
        elif fix & _LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        for i, e in enumerate(self.l1):
            l2 = e & HOST_MASK
            if not l2:
                continue
            try:
                n = self.stored(l2 >> self.cb)
            except _Unreadable:
                continue
            if (n == 1) != bool(e & COPIED):
                msg = f"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={n}"
                if repair:
                    self.l1[i] = e | COPIED if n == 1 else e & ~COPIED
                    self.write_meta(self.hdr.l1.at + 8 * i, self.l1[i].to_bytes(8, "big"),
                                    "active L1 table")
                    res.corruptions_fixed += 1
                res.note(_C, l2, msg, repaired=repair)
            tbl = decode_u64_table(self.read(l2, self.cs))
            dirty = 0
            dfile = self.hdr.has_data_file
            for j in range(0, len(tbl), 2 if self.hdr.extended_l2 else 1):
                x = tbl[j]
                host = x & HOST_MASK
                if x & COMPRESSED or not (host or (dfile and x & COPIED)):
                    continue
                try:
                    # "if (has_data_file(bs)) refcount = 1"
                    n = 1 if dfile else self.stored(host >> self.cb)
                except _Unreadable:
                    continue
                if (n == 1) != bool(x & COPIED):
                    res.note(_C, host, f"OFLAG_COPIED data cluster: l2_entry={x:x} refcount={n}",
                             repaired=repair)
                    if repair:
                        tbl[j] = x | COPIED if n == 1 else x & ~COPIED
                        dirty += 1
            if dirty:
                self.write_meta(l2, encode_u64_table(tbl), "active L2 table")
                res.corruptions_fixed += dirty

    # -- rebuilding the refcount structure ------------------------------------------------

    def rebuild_structure(self) -> None:
        """Write a new refcount table and blocks holding ``self.counts`` (the old structure
        stays counted: the next pass finds it leaked), then point the header at them."""
        counts = self.counts
        per = 1 << self.per_block_bits
        cs = self.cs
        first_free = 0

        def alloc(n: int) -> int:
            nonlocal first_free
            c, run = first_free, 0
            while run < n:
                if c >= len(counts):
                    counts.extend(_zeros(c + 1 - len(counts)))
                run = run + 1 if counts[c] == 0 else 0
                c += 1
            start = c - n
            for k in range(start, c):
                counts[k] = 1
            while first_free < len(counts) and counts[first_free]:
                first_free += 1
            return start

        where: dict[int, int] = {}
        table_at, table_clusters = 0, 0
        while True:
            for i in range(-(-len(counts) // per)):
                if i not in where and any(counts[i * per : (i + 1) * per]):
                    where[i] = alloc(1)
            need = -(-(max(where) + 1) * 8 // cs) if where else 1
            if need > table_clusters:
                table_at, table_clusters = alloc(need), need
                continue
            if all(i in where for i in range(-(-len(counts) // per))
                   if any(counts[i * per : (i + 1) * per])):
                break
        # crash.order.new-structure-before-pointer: blocks, then the table, then the header.
        for i, c in sorted(where.items()):
            blk = array(refblock_typecode(self.width), counts[i * per : (i + 1) * per])
            blk.extend(array(blk.typecode, bytes(blk.itemsize * (per - len(blk)))))
            self.st.write(encode_refblock(blk, self.width), c << self.cb)
        table = array("Q", bytes(table_clusters * cs))
        for i, c in where.items():
            table[i] = c << self.cb
        self.st.write(encode_u64_table(table), table_at << self.cb)
        self.st.flush()
        head = (table_at << self.cb).to_bytes(8, "big") + table_clusters.to_bytes(4, "big")
        self.st.write(head, 48)
        self.st.flush()
        self.hdr = self.hdr.moved(reftable=Span(table_at << self.cb, table_clusters))
        self.reload()


def _run(storage: Storage, hdr: Header, fix: int, exts: Sequence[Extension] = (),
         progress: Callable[[int, int], None] | None = None) -> tuple[_Result, Header]:
    """qcow2_check_refcounts, then check_oflag_copied; returns the result and the header
    (a rebuild moves the refcount table)."""
    if hdr.snapshots.n:
        snaps, snaps_bytes = read_snapshot_table(storage.read, hdr.snapshots, storage.size())
    else:
        snaps, snaps_bytes = [], 0
    chk = _Checker(storage, hdr, snaps, snaps_bytes, exts)
    chk.progress = progress
    res = _Result()
    try:
        return _passes(storage, chk, res, fix)
    except (_CannotCheck, MemoryError) as exc:
        why = str(exc) or "out of memory"
        res.note(ProblemKind.CHECK_ERROR, None, f"the check failed: {why}")
        return res, chk.hdr


def _passes(storage: Storage, chk: _Checker, res: _Result, fix: int) -> tuple[_Result, Header]:
    chk.calculate(res, fix)
    before = res.copy()
    rebuild = chk.compare(res, 0) or chk.rebuild
    if rebuild and fix & _ERRORS:
        old = res
        chk.rebuild_structure()
        res = _Result(corruptions_fixed=old.corruptions_fixed, leaks_fixed=old.leaks_fixed,
                      problems=[replace(p, repaired=True) for p in old.problems])
        chk.calculate(res, 0)
        saved = res.copy()
        fresh = _Result()
        chk.compare(fresh, _LEAKS)
        res = saved
        res.highest = fresh.highest
        res.corruptions_fixed += max(0, old.corruptions - res.corruptions)
        res.leaks_fixed += max(0, old.leaks - res.leaks)
        res.leaks += fresh.leaks
    elif fix:
        if rebuild:
            res.note(ProblemKind.CHECK_ERROR, None, "need to rebuild refcount structures")
            return res, chk.hdr
        if res.leaks or res.corruptions:
            res = before
            chk.compare(res, fix)
    chk.oflag_copied(res, fix)
    if fix and not res.check_errors and not res.corruptions:
        flags = Incompat.CORRUPT | Incompat.DIRTY
        if chk.hdr.version >= 3 and chk.hdr.features.incompatible & flags:
            bits = chk.hdr.features.incompatible & ~flags
            storage.write(bits.to_bytes(8, "big"), 72)
    storage.flush()
    return res, chk.hdr


def check(image: object, *, repair: RepairMode | None = None,
          progress: Callable[[int, int], None] | None = None) -> CheckResult:
    """Check a qcow2 image (a path, a Storage, or an open FormatAccess) as ``qemu-img
    check`` does, and with ``repair="leaks"`` or ``"all"`` repair it as ``qemu-img check -r``
    does (a path is then opened writable; an open FormatAccess cannot be repaired).
    ``progress``, if given, is called as the walk goes with (L1 entries walked, L1 entries
    of the active and the snapshots' L1 tables), from 0 again in each pass of a repair.

    The counts in the result are what is still wrong (after a repair: what a second check
    finds); ``leaks_fixed`` and ``corruptions_fixed`` what the repair fixed.  An image that
    cannot be opened at all is one check error (qemu-img: "Check failed", exit code 1).
    """
    if repair not in (None, "leaks", "all"):
        raise InvalidRequestError(f"check: repair must be None, 'leaks' or 'all', not {repair!r}")
    owned = False
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise ImageNotFoundError(f"check: image file {path!r} not found", filename=path)
        storage: Storage = FastFileStorage(path, writable=repair is not None, use_mmap=False)
        owned = True
    elif isinstance(image, FormatAccess):
        if repair is not None:
            raise InvalidRequestError("check: close the image before repairing it")
        image.flush()
        storage = image.driver.storage
    elif all(hasattr(image, a) for a in ("read", "write", "size", "writable")):
        storage = cast(Storage, image)
        if repair is not None and not storage.writable:
            raise InvalidRequestError(f"check: cannot repair read-only {storage}")
    else:
        raise InvalidRequestError(f"check: not an image, path or Storage: {image!r}")
    try:
        result = _check(storage, repair, progress)
        if repair is not None:
            # crash.power-cut: what the repair wrote is durable when check returns (qemu-img
            # check -r flushes the image to disk as it closes it).
            storage.sync()
        return result
    finally:
        if owned:
            storage.close()


def _mark_corrupt(storage: Storage) -> None:
    hdr = parse_header(storage.read(0, 512))
    if hdr.version >= 3:
        bits = hdr.features.incompatible | Incompat.CORRUPT
        storage.write(bits.to_bytes(8, "big"), 72)


def _check(storage: Storage, repair: RepairMode | None,
           progress: Callable[[int, int], None] | None = None) -> CheckResult:
    name = str(getattr(storage, "path", None) or storage.name)
    head = storage.read(0, min(512, storage.size()))
    if head[:4] != MAGIC:
        raise UnsupportedError(f"check: {name} is not a qcow2 image (qemu-img: this image "
                               "format does not support checks)")
    fix = 0 if repair is None else _LEAKS if repair == "leaks" else _LEAKS | _ERRORS
    try:
        # qemu-img check opens the image first: what our open refuses (header, extensions,
        # backing name, table placement, unknown or unsupported incompatible features) is
        # not checked.  The corrupt and dirty bits are what check is for: they do not stop it.
        layer = Qcow2Layer(storage, writable=False)
        hdr, exts = layer.hdr, layer.extensions
        layer.detach()
        res, hdr = _run(storage, hdr, fix, exts, progress)
    except (PyimagoError, _RepairRefused) as exc:
        failed = _Result()
        if isinstance(exc, _RepairRefused):
            # qcow2.corrupt.mark: as QEMU (qcow2_signal_corruption), the image gets the
            # corrupt bit and the check fails.
            failed.note(ProblemKind.CHECK_ERROR, None, str(exc))
            _mark_corrupt(storage)
        else:
            failed.note(ProblemKind.CHECK_ERROR, None, f"the image cannot be checked: {exc}")
        return CheckResult(filename=name, format="qcow2", check_errors=1,
                           problems=tuple(failed.problems))
    if res.leaks_fixed or res.corruptions_fixed:
        # As qemu-img: what is still wrong is what a second, read-only check finds.
        again, hdr = _run(storage, hdr, 0, exts, progress)
        again.leaks_fixed, again.corruptions_fixed = res.leaks_fixed, res.corruptions_fixed
        again.problems = [p for p in res.problems if p.repaired] + again.problems
        res = again
    cs = hdr.cluster_size
    return CheckResult(
        filename=name,
        format="qcow2",
        corruptions=res.corruptions,
        leaks=res.leaks,
        check_errors=res.check_errors,
        corruptions_fixed=res.corruptions_fixed,
        leaks_fixed=res.leaks_fixed,
        image_end_offset=(res.highest + 1) * cs,
        total_clusters=-(-hdr.size // cs),
        allocated_clusters=res.allocated,
        fragmented_clusters=res.fragmented,
        compressed_clusters=res.compressed,
        problems=tuple(res.problems),
    )

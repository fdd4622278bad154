"""Consistency check and repair of a qcow2 image, as ``qemu-img check [-r leaks|all]``.

qcow2.corrupt.check: "check(image) rebuilds every refcount from all metadata (active and
snapshot tables) and reports leaks, corruptions (refcount lower than the references,
overlapping metadata, wrong COPIED flags, entries outside the file) and check errors with the
counts, offsets and exit code qemu-img check gives for the same image."

The steps and counts follow QEMU's block/qcow2-refcount.c (``qcow2_check_refcounts``:
``calculate_refcounts``, ``check_refcounts_l1/l2``, ``check_refblocks``,
``compare_refcounts``, ``check_oflag_copied``) and qemu-img's ``img_check`` (after a repair
that fixed something, the image is checked once more and that second result is reported,
with the first one's fixed counts).

qcow2.corrupt.repair: "repair="leaks" frees leaked clusters; repair="all" also fixes
refcounts that are too low and COPIED flags".  Every repair step is safe to cut short: a
refcount is only raised to the references that exist, or lowered to them; COPIED flags change
no mapping; the corrupt bit is cleared last.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import cast

from .._check import CheckProblem, CheckResult, ProblemKind, RepairMode
from .._errors import CorruptImageError, InvalidRequestError, UnsupportedError
from .._open import probe_format
from .._storage import FileStorage, Storage
from .bitmaps import bitmap_extension, bitmap_regions
from .constants import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
)
from .driver import Qcow2Driver
from .extensions import parse_extensions
from .header import FIELD_OFFSETS, QCowHeader, parse_header
from .overlap import (
    ACTIVE_L1,
    ACTIVE_L2,
    HEADER,
    REFCOUNT_BLOCK,
    REFCOUNT_TABLE,
    MetadataRegion,
    first_overlap,
)
from .rebuild import rebuild_refcount_structure
from .refcounts import get_block_entry, refcount_block_entries, set_block_entry
from .snapshots import read_snapshot_table
from .subclusters import QCOW_L2_BITMAP_ALL_ALLOC
from .tables import decode_l2_entry, unpack_table

__all__ = ["check", "check_image"]

#: Runs of L2 entries tested for all-zero at once (see ``l2_entries``).
_ZERO_RUN = 4096


class _CheckFailed(Exception):
    """The check (or repair) cannot go on: qemu-img says "Check failed" (exit 1)."""


@dataclass(slots=True)
class _Tally:
    """QEMU's BdrvCheckResult while a pass runs."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    allocated: int = 0
    fragmented: int = 0
    compressed: int = 0
    image_end_offset: int = 0
    problems: list[CheckProblem] = field(default_factory=list)

    def corrupt(self, offset: int | None, message: str) -> None:
        self.corruptions += 1
        self.problems.append(CheckProblem(ProblemKind.CORRUPTION, offset, message))

    def fixed(self, kind: ProblemKind, offset: int | None, message: str) -> None:
        if kind is ProblemKind.LEAK:
            self.leaks_fixed += 1
        else:
            self.corruptions_fixed += 1
        self.problems.append(CheckProblem(kind, offset, message, repaired=True))


class _Checker:
    """One pass over one image: the references counted from all metadata, compared with the
    stored refcounts (and repaired, when asked)."""

    #: check()'s progress callback: (L1 entries walked, L1 entries of all L1 tables).
    progress: Callable[[int, int], None] | None = None
    walked = to_walk = 0

    def __init__(self, storage: Storage, header: QCowHeader) -> None:
        self.storage = storage
        self.h = header
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.file_size = storage.size()
        self.nb_clusters = -(-self.file_size // self.cs)
        self.refs: Counter[int] = Counter()
        self.reftable = self._read_u64s(header.refcount_table_offset,
                                        header.refcount_table_clusters * self.cs)
        self.entries = refcount_block_entries(self.cb, header.refcount_order)
        self.rebuild = False
        self.blocks: dict[int, bytearray] = {}
        #: Words per L2 entry: 2 with extended L2 entries (entry, subcluster bitmap).
        self.stride = header.l2_entry_bytes // 8
        #: qcow2.data-file.write: data clusters live in the data file, uncounted.
        self.data_file = header.has_data_file

    def l2_entries(self, l2_offset: int) -> list[tuple[int, int]]:
        """The (entry, bitmap) pairs of an L2 table (bitmap 0 without extended entries),
        leaving out the all-zero ones: an unallocated cluster with an empty bitmap has
        nothing to count and nothing to check.  (Why not every pair: a 2 MiB-cluster table
        holds 262,144 of them, and the oracle checks images after every session.)"""
        table = self.storage.read(l2_offset, self.cs)
        words: list[int] = []
        # Whole 4 KiB runs of zero entries are skipped at C speed; 4 KiB holds whole
        # (entry, bitmap) pairs, so a pair is never split between a kept and a skipped run.
        for at in range(0, len(table), _ZERO_RUN):
            run = table[at:at + _ZERO_RUN]
            if run.count(0) != len(run):
                words.extend(unpack_table(run))
        if self.stride == 1:
            return [(w, 0) for w in words if w]
        return [(w, b) for w, b in zip(words[::2], words[1::2], strict=True) if w or b]

    def _read_u64s(self, offset: int, length: int) -> list[int]:
        return unpack_table(self.storage.read(offset, length))

    # -- calculate_refcounts ------------------------------------------------------------------

    def count(self, t: _Tally, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt: one reference to each cluster ``[offset, +size)`` holds."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            t.corrupt(offset, "counting reference for region exceeding the end of the file "
                              f"by one cluster or more: offset 0x{offset:x} size 0x{size:x}")
            return
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        for k in range(first, last + 1):
            self.refs[k] += 1
        self.nb_clusters = max(self.nb_clusters, last + 1)

    def calculate(self, t: _Tally) -> None:
        h, cs = self.h, self.cs
        self.count(t, 0, cs)
        snapshots, table_size = read_snapshot_table(self.storage, h.snapshots_offset,
                                                    h.nb_snapshots)
        self.walked, self.to_walk = 0, h.l1_size + sum(sn.l1_size for sn in snapshots)
        self.check_l1(t, h.l1_table_offset, h.l1_size, active=True)
        for sn in snapshots:
            label = f"snapshot {sn.id_str} ({sn.name})"
            if sn.l1_table_offset % cs:
                t.corrupt(sn.l1_table_offset, f"{label} l1_offset=0x{sn.l1_table_offset:x}: L1 "
                          "table is not cluster aligned; snapshot table entry corrupted")
                continue
            if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
                t.corrupt(sn.l1_table_offset, f"{label} l1_size=0x{sn.l1_size:x}: L1 table is "
                          "too large; snapshot table entry corrupted")
                continue
            self.check_l1(t, sn.l1_table_offset, sn.l1_size, active=False)
        self.count(t, h.snapshots_offset, table_size)
        self.count_bitmaps(t)
        self.count(t, h.refcount_table_offset, h.refcount_table_clusters * cs)
        self.check_refblocks(t)
        if self.progress is not None:
            self.progress(self.to_walk, self.to_walk)

    def count_bitmaps(self, t: _Tally) -> None:
        """qcow2_check_bitmaps_refcounts: with the bitmaps autoclear bit set, the bitmap
        directory, tables and data clusters hold references too (qcow2.bitmaps.in-use)."""
        h = self.h
        cluster = self.storage.read(0, self.cs)
        try:
            exts = parse_extensions(cluster, h.header_length, h.backing_file_offset or self.cs)
            ext = bitmap_extension(h, exts)
            regions = bitmap_regions(self.storage, self.cs, ext) if ext is not None else []
        except CorruptImageError as exc:
            t.corrupt(None, str(exc))
            return
        for offset, length in regions:
            self.count(t, offset, length)

    def check_l1(self, t: _Tally, offset: int, size: int, *, active: bool) -> None:
        if not size:
            return
        self.count(t, offset, size * 8)
        for index, raw in enumerate(self._read_u64s(offset, size * 8)):
            if not raw:
                continue
            if self.progress is not None:
                self.progress(self.walked + index, self.to_walk)
            if raw & L1E_RESERVED_MASK:
                t.corrupt(None, f"found L1 entry with reserved bits set: {raw:x}")
            l2_offset = raw & L1E_OFFSET_MASK
            self.count(t, l2_offset, self.cs)
            if l2_offset % self.cs:
                t.corrupt(l2_offset, f"l2_offset={l2_offset:x}: Table is not cluster aligned; "
                          "L1 entry corrupted")
            self.check_l2(t, l2_offset, active=active)
        self.walked += size

    def check_l2(self, t: _Tally, l2_offset: int, *, active: bool) -> None:
        next_contiguous = 0
        for raw, bitmap in self.l2_entries(l2_offset):
            if raw & QCOW_OFLAG_COMPRESSED:
                if raw & QCOW_OFLAG_COPIED:
                    t.corrupt(None, "copied flag must never be set for compressed clusters")
                    raw &= ~QCOW_OFLAG_COPIED
                # qcow2.check.features: as QEMU's check_refcounts_l2, a compressed cluster in
                # a data file image, or with a subcluster bitmap, is one corruption, uncounted.
                if self.data_file:
                    t.corrupt(None, f"Compressed cluster {raw:x} with data file")
                    continue
                if bitmap:
                    t.corrupt(None, f"Compressed cluster {raw:x} has non-zero subcluster "
                                    "allocation bitmap")
                    continue
                entry = decode_l2_entry(raw, self.cb)
                self.count(t, entry.host_offset, entry.compressed_length)
                if active:
                    t.allocated += 1
                    t.compressed += 1
                    t.fragmented += 1
                continue
            if raw & L2E_STD_RESERVED_MASK:
                t.corrupt(None, f"found l2 entry with reserved bits set: {raw:x}")
            host = raw & L2E_OFFSET_MASK
            # qcow2.data-file.offsets: host offset 0 with COPIED is a data file cluster.
            if not host and not (self.data_file and raw & QCOW_OFLAG_COPIED):
                if bitmap & QCOW_L2_BITMAP_ALL_ALLOC:
                    # qcow2.check.features: as QEMU's check_refcounts_l2.
                    t.corrupt(None, "Unallocated cluster has non-zero subcluster allocation "
                                    "map")
                continue  # unallocated or a plain zero cluster
            if bitmap & (bitmap >> 32) & QCOW_L2_BITMAP_ALL_ALLOC:
                t.corrupt(host, f"offset={host:x}: Allocated cluster has corrupted subcluster "
                                "allocation bitmap")
            if host % self.cs:
                kind = "Preallocated" if raw & QCOW_OFLAG_ZERO and self.stride == 1 else "Data"
                t.corrupt(host, f"offset={host:x}: {kind} cluster is not properly aligned; L2 "
                          "entry corrupted.")
            if active:
                t.allocated += 1
                if next_contiguous and host != next_contiguous:
                    t.fragmented += 1
                next_contiguous = host + self.cs
            if not self.data_file:
                self.count(t, host, self.cs)

    def check_refblocks(self, t: _Tally) -> None:
        for i, raw in enumerate(self.reftable):
            offset = raw & REFT_OFFSET_MASK
            if raw & REFT_RESERVED_MASK:
                t.corrupt(None, f"refcount table entry {i} has reserved bits set")
                self.rebuild = True
                continue
            if offset % self.cs:
                t.corrupt(offset, f"refcount block {i} is not cluster aligned; refcount table "
                          "entry corrupted")
                self.rebuild = True
                continue
            if (offset >> self.cb) >= self.nb_clusters:
                t.corrupt(offset, f"refcount block {i} is outside image")
                continue
            if offset:
                self.count(t, offset, self.cs)
                if self.refs[offset >> self.cb] != 1:
                    t.corrupt(offset, f"refcount block {i} refcount="
                              f"{self.refs[offset >> self.cb]}")
                    self.rebuild = True

    # -- stored refcounts -----------------------------------------------------------------------

    def block_of(self, cluster: int) -> int | None:
        """The refcount block offset for ``cluster`` (0: none); None when it is unreadable
        (qcow2_get_refcount fails: a misaligned block)."""
        ti = cluster // self.entries
        if ti >= len(self.reftable):
            return 0
        offset = self.reftable[ti] & REFT_OFFSET_MASK
        if offset % self.cs:
            return None
        return offset

    def _block(self, offset: int) -> bytearray:
        block = self.blocks.get(offset)
        if block is None:
            block = self.blocks[offset] = bytearray(self.storage.read(offset, self.cs))
        return block

    def stored(self, cluster: int) -> int | None:
        block = self.block_of(cluster)
        if block is None:
            return None
        if not block:
            return 0
        return get_block_entry(self._block(block), cluster % self.entries, self.h.refcount_order)

    def set_stored(self, cluster: int, value: int) -> None:
        """Repair one refcount (the block exists: its stored refcount is not 0)."""
        offset = self.block_of(cluster)
        assert offset, "only clusters with a refcount block are repaired"
        block = self._block(offset)
        index = cluster % self.entries
        set_block_entry(block, index, self.h.refcount_order, value)
        # Write back the bytes that hold this entry only, as RefcountTable.set does.
        bits = 1 << self.h.refcount_order
        width = max(1, bits // 8)
        start = (index * bits) // 8
        start -= start % width
        self.storage.write(block[start : start + width], offset + start)

    # -- compare_refcounts ----------------------------------------------------------------------

    def compare(self, t: _Tally, fix: RepairMode | None) -> None:
        highest = 0
        for i in range(self.nb_clusters):
            stored = self.stored(i)
            if stored is None:
                t.check_errors += 1
                t.problems.append(CheckProblem(ProblemKind.CHECK_ERROR, i << self.cb,
                                               f"Can't get refcount for cluster {i}"))
                continue
            counted = self.refs[i]
            if stored or counted:
                highest = i
            if stored == counted:
                continue
            kind = ProblemKind.CORRUPTION if stored < counted else ProblemKind.LEAK
            message = f"cluster {i} refcount={stored} reference={counted}"
            if stored == 0:
                self.rebuild = True
            elif (kind is ProblemKind.LEAK and fix is not None) or (
                kind is ProblemKind.CORRUPTION and fix == "all"
            ):
                self.set_stored(i, counted)
                t.fixed(kind, i << self.cb, message)
                continue
            if kind is ProblemKind.CORRUPTION:
                t.corrupt(i << self.cb, message)
            else:
                t.leaks += 1
                t.problems.append(CheckProblem(ProblemKind.LEAK, i << self.cb, message))
        t.image_end_offset = (highest + 1) * self.cs

    def _refuse_overlap(self, offset: int, length: int, what: str, l1: list[int]) -> None:
        """qcow2_pre_write_overlap_check before a repair rewrites an L1 entry (``what`` is
        the active L1 table) or an L2 table (an active L2 table): the range must not be any
        other metadata, or QEMU gives up ("Check failed") and marks the image corrupt."""
        h, cs = self.h, self.cs
        regions = [
            MetadataRegion(HEADER, 0, cs),
            MetadataRegion(ACTIVE_L1, h.l1_table_offset, h.l1_size * 8),
            MetadataRegion(REFCOUNT_TABLE, h.refcount_table_offset,
                           h.refcount_table_clusters * cs),
            *(MetadataRegion(REFCOUNT_BLOCK, e & REFT_OFFSET_MASK, cs)
              for e in self.reftable if e & REFT_OFFSET_MASK),
            *(MetadataRegion(ACTIVE_L2, e & L1E_OFFSET_MASK, cs)
              for e in l1 if e & L1E_OFFSET_MASK),
        ]
        region = first_overlap((r for r in regions if r.name != what), offset, length)
        if region is not None:
            raise _CheckFailed(f"Could not write the {what} at 0x{offset:x}; metadata overlap "
                               f"check failed: it overlaps the {region}")

    # -- check_oflag_copied ---------------------------------------------------------------------

    def check_copied(self, t: _Tally, fix: RepairMode | None) -> None:
        if fix == "all":
            repair = True
        elif fix == "leaks":
            repair = not (t.check_errors or t.corruptions or t.leaks)
        else:
            repair = False
        h = self.h
        l1 = self._read_u64s(h.l1_table_offset, h.l1_size * 8) if h.l1_size else []
        for i, l1e in enumerate(l1):
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self.stored(l2_offset >> self.cb)
            if refcount is None:
                continue
            message = (f"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                       f"refcount={refcount}")
            if (refcount == 1) != bool(l1e & QCOW_OFLAG_COPIED):
                if repair:
                    # QEMU writes the 512-byte sector of the L1 table holding the entry.
                    sector = (h.l1_table_offset + 8 * i) & ~511
                    self._refuse_overlap(sector, 512, ACTIVE_L1, l1)
                    fixed = l1e | QCOW_OFLAG_COPIED if refcount == 1 else l1e & ~QCOW_OFLAG_COPIED
                    self.storage.write(struct.pack(">Q", fixed), h.l1_table_offset + 8 * i)
                    t.fixed(ProblemKind.CORRUPTION, l2_offset, message)
                else:
                    t.corrupt(l2_offset, message)
            table = self._read_u64s(l2_offset, self.cs)
            dirty: list[str] = []
            for j in range(0, len(table), self.stride):
                raw = table[j]
                if raw & QCOW_OFLAG_COMPRESSED or not (
                    raw & L2E_OFFSET_MASK or (self.data_file and raw & QCOW_OFLAG_COPIED)
                ):
                    continue
                # QEMU's check_oflag_copied: data file clusters count as refcount 1.
                refcount = 1 if self.data_file else self.stored(
                    (raw & L2E_OFFSET_MASK) >> self.cb)
                if refcount is None:
                    continue
                if (refcount == 1) != bool(raw & QCOW_OFLAG_COPIED):
                    message = f"OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={refcount}"
                    if repair:
                        table[j] = (raw | QCOW_OFLAG_COPIED if refcount == 1
                                    else raw & ~QCOW_OFLAG_COPIED)
                        dirty.append(message)
                    else:
                        t.corrupt(raw & L2E_OFFSET_MASK, message)
            if dirty:
                self._refuse_overlap(l2_offset, self.cs, ACTIVE_L2, l1)
                self.storage.write(struct.pack(f">{len(table)}Q", *table), l2_offset)
                for message in dirty:
                    t.fixed(ProblemKind.CORRUPTION, l2_offset, message)


def _one_pass(storage: Storage, header: QCowHeader, fix: RepairMode | None,
              progress: Callable[[int, int], None] | None = None) -> _Tally:
    t = _Tally()
    checker = _Checker(storage, header)
    checker.progress = progress
    checker.calculate(t)
    before = replace(t, problems=list(t.problems))
    # A first comparison only looks (and finds whether the refcount structure itself must
    # be rebuilt); the repair compares again from the same start, fixing.
    checker.compare(t, None)
    if fix == "all" and checker.rebuild:
        t, checker = _rebuild(storage, checker, t)
    elif fix is not None:
        if checker.rebuild:
            t.check_errors += 1
            t.problems.append(CheckProblem(ProblemKind.CHECK_ERROR, None,
                                           "need to rebuild refcount structures"))
            return t
        if t.leaks or t.corruptions:
            t = replace(before, problems=list(before.problems))
            checker.compare(t, fix)
    checker.check_copied(t, fix)
    return t


def _rebuild(storage: Storage, checker: _Checker, old: _Tally) -> tuple[_Tally, _Checker]:
    """The refcount structure cannot be trusted: rebuild it, count again, free what the old
    structure leaves leaked, and report as QEMU does (what the rebuild fixed)."""
    checker.nb_clusters = rebuild_refcount_structure(storage, checker.h, checker.refs,
                                                     checker.nb_clusters)
    header = _read_header(storage)
    t = _Tally(problems=list(old.problems))
    t.problems.append(CheckProblem(ProblemKind.CORRUPTION, None,
                                   "refcount structure rebuilt", repaired=True))
    again = _Checker(storage, header)
    again.calculate(t)
    leak_pass = _Tally()
    again.compare(leak_pass, "leaks")
    t.image_end_offset = leak_pass.image_end_offset
    t.corruptions_fixed = old.corruptions_fixed + max(0, old.corruptions - t.corruptions)
    t.leaks_fixed = old.leaks_fixed + max(0, old.leaks - t.leaks)
    t.leaks += leak_pass.leaks
    return t, again


def _mark_consistent(storage: Storage, header: QCowHeader) -> None:
    """qcow2_mark_clean + qcow2_mark_consistent: after a repair that left no corruption,
    the dirty and corrupt bits go (last, so that a cut before leaves them set)."""
    flags = header.incompatible_features
    cleared = flags & ~(QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY)
    if header.version >= 3 and cleared != flags:
        storage.write(struct.pack(">Q", cleared), FIELD_OFFSETS["incompatible_features"])


def _result(name: str, t: _Tally, header: QCowHeader | None) -> CheckResult:
    total = None
    if header is not None:
        total = -(-header.size // header.cluster_size)
    return CheckResult(
        filename=name,
        format="qcow2",
        corruptions=t.corruptions,
        leaks=t.leaks,
        check_errors=t.check_errors,
        corruptions_fixed=t.corruptions_fixed,
        leaks_fixed=t.leaks_fixed,
        image_end_offset=t.image_end_offset or None,
        total_clusters=total,
        allocated_clusters=t.allocated,
        fragmented_clusters=t.fragmented,
        compressed_clusters=t.compressed,
        problems=tuple(t.problems),
    )


def _read_header(storage: Storage) -> QCowHeader:
    head = parse_header(storage.read(0, 4096))
    header = parse_header(storage.read(0, head.cluster_size))
    if header.refcount_table_clusters * header.cluster_size > QCOW_MAX_REFTABLE_SIZE:
        raise CorruptImageError("qcow2 refcount table too large")
    return header


def check_image(storage: Storage, name: str, repair: RepairMode | None,
                progress: Callable[[int, int], None] | None = None) -> CheckResult:
    """Check (and, with ``repair``, repair) the qcow2 image on ``storage``; ``progress`` as
    :func:`check` takes it."""
    try:
        # qemu-img check opens the image first: what our open refuses, QEMU's refuses too
        # (header, extensions, backing name, table offsets, unsupported features).
        Qcow2Driver(storage, writable=False)
        header = _read_header(storage)
        first = _one_pass(storage, header, repair, progress)
    except _CheckFailed as exc:
        # A repair that would have written over metadata: QEMU marks the image corrupt.
        header = _read_header(storage)
        if header.version >= 3:
            flags = header.incompatible_features | QCOW2_INCOMPAT_CORRUPT
            storage.write(struct.pack(">Q", flags), FIELD_OFFSETS["incompatible_features"])
        t = _Tally(check_errors=1)
        t.problems.append(CheckProblem(ProblemKind.CHECK_ERROR, None, str(exc)))
        return _result(name, t, None)
    except (CorruptImageError, UnsupportedError) as exc:
        # The image cannot be checked at all (qemu-img: "Check failed", exit 1).
        t = _Tally(check_errors=1)
        t.problems.append(CheckProblem(ProblemKind.CHECK_ERROR, None, str(exc)))
        return _result(name, t, None)
    if repair is not None and not first.check_errors and not first.corruptions:
        _mark_consistent(storage, header)
    if not (first.corruptions_fixed or first.leaks_fixed):
        return _result(name, first, header)
    # qemu-img check -r: "the image is checked once more" and that result is shown, with the
    # counts of what the repair fixed.
    again = _one_pass(storage, _read_header(storage), None, progress)
    again.corruptions_fixed, again.leaks_fixed = first.corruptions_fixed, first.leaks_fixed
    again.problems = [*first.problems, *again.problems]
    return _result(name, again, header)


def open_for_check(target: object, repair: RepairMode | None) -> tuple[Storage, str, bool]:
    """The storage to check, its name, and whether we opened it (and must close it)."""
    if repair not in (None, "leaks", "all"):
        raise InvalidRequestError(f"check: repair must be None, 'leaks' or 'all', not {repair!r}")
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        return FileStorage(path, writable=repair is not None), path, True
    from ..access import FormatAccess

    if isinstance(target, FormatAccess):
        if repair is not None:
            raise InvalidRequestError("check: close the image before repairing it")
        target.flush()
        storage = target.driver.storage_dependencies()[0]
        return storage, str(storage), False
    if all(hasattr(target, a) for a in ("read", "write", "size", "writable")):
        storage = cast(Storage, target)
        if repair is not None and not storage.writable:
            raise InvalidRequestError(f"check: cannot repair read-only {storage}")
        return storage, str(storage), False
    raise UnsupportedError(f"check: not an image, path or storage: {target!r}")


def check(image: object, *, repair: RepairMode | None = None,
          progress: Callable[[int, int], None] | None = None) -> CheckResult:
    """Check a qcow2 image (a path, a Storage, or an open FormatAccess) as ``qemu-img
    check`` does, and with ``repair="leaks"`` or ``"all"`` repair it as ``qemu-img check -r``
    does (a path is then opened writable; an open FormatAccess cannot be repaired).

    The result's counts, ``exit_code`` and ``to_json()`` mean what qemu-img's do.
    ``progress``, if given, is called as the walk goes with (L1 entries walked, L1 entries
    of the active and the snapshots' L1 tables), from 0 again in each pass of a repair.
    """
    storage, name, owned = open_for_check(image, repair)
    try:
        if probe_format(storage) != "qcow2":
            raise UnsupportedError(f"check: {name} is not a qcow2 image (qemu-img: this image "
                                   "format does not support checks)")
        result = check_image(storage, name, repair, progress)
        if repair is not None:
            # crash.power-cut: what the repair wrote is durable when check returns (qemu-img
            # check -r flushes the image to disk as it closes it).
            storage.sync()
        return result
    finally:
        if owned:
            storage.close()

"""The qcow2 layer of pyimago.fast: cached metadata, coalesced runs, contiguous allocation.

L2 tables live decoded in a bounded :class:`TableCache`; the L1 table is kept whole (QEMU
bounds it to 32 MiB); refcounts and allocation are :class:`Refcounts`.  Write-back order
keeps the image consistent at every moment a power cut could hit it (specs/crash.toml):

* guest data reaches storage before the L2 entry that maps it: the L2 cache writes any data
  still pending (parallel writes) before a table (``_before_l2_store``);
* a refcount reaches storage before any entry that uses the cluster it counts: the L2 cache
  writes the refcounts before any table, and the L1 table is written only after every L2
  table (``_store_l1``);
* a refcount drops only once no table on storage refers to the cluster: what an entry held
  is released after the table holding its new value is written (``_release_after``);
* a grow writes the new size last, once the new area is on storage.

A cut in between leaks clusters at worst; it never leaves a cluster in use with a refcount
that allows reuse, nor an entry pointing at data that is not there yet.

Zeroing and discarding happen here, natively: whole clusters change through their L2
entries, a table at a time; a partial cluster at the head or tail of the range becomes a
zero cluster when the rest of it already reads zero, else zeroes are written into it through
the ordinary copy-on-write path.
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from pyimago.reference._errors import CorruptImageError, InvalidRequestError, UnsupportedError
from pyimago.reference._info import ImageInfo, Qcow2Info
from pyimago.reference._mapping import (
    EofMapping,
    IndirectMapping,
    RawMapping,
    ShallowMapping,
    SpecialMapping,
    ZeroMapping,
)
from pyimago.reference._prealloc import PreallocateMode
from pyimago.reference._snapshot import SnapshotInfo
from pyimago.reference._storage import Storage, WritableBuffer

from ._bitmaps import autoclear_for_writing
from ._cache import TableCache
from ._codec import clear_top_bit, decode_u64_table, encode_u64_table
from ._compress_write import place_compressed
from ._entries import COMPRESSED, COPIED, HOST_MASK, L1_RESERVED, L2_RESERVED, ZERO_FLAG
from ._features import map_run_general
from ._general import clear_general, grow_general, prepare_general, shrink_general
from ._guard import MetadataGuard
from ._header import (
    AUTOCLEAR_DATA_FILE_RAW,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    MAGIC,
    MAX_L1_ENTRIES,
    Extension,
    Incompat,
    Span,
    check_features,
    decode_extensions,
    feature_names,
    parse_header,
)
from ._inflate import inflate_cluster
from ._layer import Clear, LayerBase
from ._probe import SECTOR
from ._refcounts import Refcounts
from ._runs import K_COMP, K_DATA, K_DATA_RO, K_EOF, K_UNALLOC, K_ZERO
from ._snapshots import Snapshot, pick, read_snapshot_table
from ._storage import fill_zero

__all__ = ["COPIED", "DEFAULT_CACHE_BYTES", "Qcow2Layer", "backing_readers"]

#: Every bit of an entry but COPIED: an entry without any of them is unallocated.
_NOT_COPIED = COPIED - 1

#: Fills a view from a guest offset.
Reader: TypeAlias = Callable[[memoryview, int], None]
#: Fills a view from a guest offset, leaving CPU-bound pieces as jobs (view, offset, jobs,
#: the piece size parallel jobs should have).
Planner: TypeAlias = Callable[[memoryview, int, list[Callable[[], None]], int], None]

#: Default metadata cache budget (L2 tables + refcount blocks), independent of image size.
DEFAULT_CACHE_BYTES = 40 << 20
#: A copy-on-write of up to this many bytes is done as one write with the caller's data.
_COW_IN_ONE = 4 << 20
#: ``_rewrite``'s target for write_zeroes: zero flag, any host cluster kept.
_ZERO_KEEPING = -1
#: ``_release_after``'s key for "once the L1 table is on storage".
_AFTER_L1 = -1


class Qcow2Layer(MetadataGuard, LayerBase):
    """One qcow2 image (v2 or v3) in a storage, optionally over a backing image."""

    format_name = "qcow2"

    def __init__(
        self,
        storage: Storage,
        *,
        writable: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        l2_cache_tables: int | None = None,
        snapshot: str | None = None,
    ) -> None:
        """``snapshot`` (an ID or name) opens that internal snapshot, read-only."""
        if snapshot is not None and writable:
            raise InvalidRequestError(f"qcow2: snapshot {snapshot!r} can only be opened read-only")
        super().__init__(storage, writable)
        # Tables are decoded once, so they are read with pread, not through the data map:
        # mapped pages would count in the process's RSS long after the table was decoded.
        self._meta_read: Callable[[int, int], bytes] = getattr(storage, "pread", storage.read)
        self._lock = threading.RLock()
        self._bread: Reader | None = None
        self._bplan: Planner | None = None
        self._owns_backing = False
        self._file_end = storage.size()

        cluster0 = self._first_cluster()
        hdr = parse_header(cluster0, self._file_end)
        self.hdr = hdr
        area_end = hdr.backing.at or hdr.cluster_size
        self.extensions: list[Extension] = decode_extensions(
            cluster0, hdr.header_length, area_end
        )
        check_features(hdr, feature_names(self.extensions), writable=writable)
        self.backing_file: str | None = None
        if hdr.backing.at:
            name = cluster0[hdr.backing.at : hdr.backing.at + hdr.backing.n]
            if b"\0" in name:
                raise CorruptImageError(
                    f"qcow2: the backing file name at byte {hdr.backing.at} holds a NUL byte"
                )
            self.backing_file = bytes(name).decode("utf-8", "surrogateescape")
        self.backing_format: str | None = next(
            (e.data.decode("utf-8", "surrogateescape") for e in self.extensions
             if e.kind == EXT_BACKING_FORMAT),
            None,
        )
        #: The external data file's name from its header extension (None: not named).
        self.data_file: str | None = None
        if hdr.has_data_file:
            name_ext = next((e.data for e in self.extensions if e.kind == EXT_DATA_FILE), b"")
            if b"\0" in name_ext:
                raise CorruptImageError(f"qcow2: data file name {name_ext!r} holds a NUL byte")
            self.data_file = name_ext.decode("utf-8", "surrogateescape") or None
        # Guest data lives in self.data (LayerBase: the image's storage) unless an external
        # data file is attached; until then an image that needs one cannot be read.
        self.data_attached = not hdr.has_data_file
        self._owns_data = False
        self._snapshots: list[Snapshot] | None = None
        self.snapshot: SnapshotInfo | None = None
        if snapshot is not None:
            self.snapshot = pick(self._snapshot_table(), snapshot).info
            self._switch_to_snapshot()
        # Images with extended L2 entries or an external data file map through the general
        # (per-unit) path of _features; the plain path below handles everything else.
        self._general = hdr.extended_l2 or hdr.has_data_file

        cbits = hdr.cluster_bits
        self._cbits = cbits
        self._cs = cs = 1 << cbits
        self._cmask = cs - 1
        # Extended L2 entries take two words (entry, subcluster bitmap): half as many a table.
        self._ext = 1 if hdr.extended_l2 else 0
        self._l2bits = cbits - 3 - self._ext
        self._l2n = cs // (8 << self._ext)
        self._l2mask = self._l2n - 1
        self.size = hdr.size
        # Compressed descriptors: x = 62 - (cluster_bits - 8) bits of host offset, then the
        # count of additional 512-byte sectors.
        self._comp_shift = 70 - cbits
        self._comp_sectors = (1 << (cbits - 8)) - 1
        self._comp_host = (1 << self._comp_shift) - 1
        # An entry with any of these bits is corrupt (reserved bits, or a host offset that
        # is not cluster-aligned): one AND tells.
        self._l2_bad = L2_RESERVED | (HOST_MASK & self._cmask)
        self._l1_bad = L1_RESERVED | (HOST_MASK & self._cmask)
        self._zero_run_mask = ZERO_FLAG | COMPRESSED | self._l2_bad
        self._plain_mask = COPIED | ZERO_FLAG | COMPRESSED | self._l2_bad

        self._l1 = self._read_l1()
        self._l1_dirty = False
        budget = max(cache_bytes, 4 * cs)
        self.refs = Refcounts(
            storage,
            self._meta_read,
            cluster_bits=cbits,
            order=hdr.refcount_order,
            table=hdr.reftable,
            cache_bytes=budget // 5,
            moved=self._reftable_moved,
            vet_block=self._vet_block,
            vet_alloc=self._vet_alloc,
            placed_block=self._meta_add_block,
        )
        l2_limit = l2_cache_tables if l2_cache_tables is not None else (budget - budget // 5) // cs
        self._l2 = TableCache(l2_limit, self._store_l2, self._before_l2_store,
                              self._release_pending, entry_flag=COPIED)
        #: Clusters (first, count) to release once the table at a key (an L2 table's offset,
        #: or _AFTER_L1) is on storage.
        self._pending_frees: dict[int, list[tuple[int, int]]] = {}
        #: New L2 tables the L1 table on storage does not point at yet.
        self._unlinked: set[int] = set()
        #: Data writes a parallel write has promised but not done yet (host, bytes).
        self._unsettled: list[tuple[int, memoryview]] | None = None
        self._init_guard()
        self._last_inflated: tuple[int, bytes] | None = None
        #: Where the next compressed cluster may go: the byte after the last one, inside a
        #: host cluster it shares (QEMU's free_byte_offset; 0: start a new cluster).
        self.comp_next = 0
        if writable and hdr.version >= 3 and hdr.features.autoclear:
            # Before the first write: bitmaps are flagged in use (their bit stays), unknown
            # autoclear bits go, and the raw data file bit stays (qcow2.data-file.raw).
            kept = autoclear_for_writing(storage, hdr, self.extensions)
            if kept != hdr.features.autoclear:
                self.hdr = hdr.cleared_autoclear(keep=kept)
                self._write_header()

    # -- opening --------------------------------------------------------------------------

    def _first_cluster(self) -> bytes:
        head = self.storage.read(0, 512)
        if head[:4] == MAGIC:
            (bits,) = struct.unpack_from(">I", head, 20)
            if 9 <= bits <= 21:
                return self.storage.read(0, 1 << bits)
        return head

    def _snapshot_table(self) -> list[Snapshot]:
        if self._snapshots is None:
            snaps = self.hdr.snapshots
            self._snapshots = (
                read_snapshot_table(self._meta_read, snaps, self._file_end, self.hdr.size)[0]
                if snaps.n else []
            )
        return self._snapshots

    @property
    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """The image's internal snapshots, in table order."""
        return tuple(s.info for s in self._snapshot_table())

    def _switch_to_snapshot(self) -> None:
        """Read through the chosen snapshot's L1 table (at the image's size: what
        ``qemu-img convert -l`` reads)."""
        assert self.snapshot is not None
        snap = pick(self._snapshot_table(), self.snapshot.id)
        cs = self.hdr.cluster_size
        at, n = snap.l1.at, snap.l1.n
        if n and (at % cs or at < cs or at >= self._file_end):
            raise CorruptImageError(
                f"qcow2: snapshot {snap.id!r} has its L1 table at 0x{at:x}, not a cluster of "
                "the file past the header"
            )
        if n > MAX_L1_ENTRIES:
            raise CorruptImageError(
                f"qcow2: snapshot {snap.id!r} has an L1 table of {n} entries (more than "
                f"{MAX_L1_ENTRIES})"
            )
        self.hdr = self.hdr.moved(l1=snap.l1)

    def set_data_file(self, storage: Storage, *, owned: bool = False) -> None:
        """Attach the external data file."""
        self.data = storage
        self.data_attached = True
        self._owns_data = owned

    def close_data_file(self) -> None:
        """Close the external data file if this layer opened it."""
        if self._owns_data:
            self._owns_data = False
            self.data.close()

    def storage_dependencies(self) -> list[Storage]:
        found = super().storage_dependencies()
        if self.data is not self.storage:
            found.insert(1, self.data)
        return found

    def _read_l1(self) -> array[int]:
        n = self.hdr.l1.n
        return decode_u64_table(self._meta_read(self.hdr.l1.at, n * 8) if n else b"")

    def set_backing(self, backing: Any, *, owned: bool = False) -> None:
        """Attach the backing image (a FormatAccess of pyimago.fast or any other)."""
        self.backing = backing
        self._owns_backing = owned
        self._bread, self._bplan = backing_readers(backing)

    @property
    def cluster_size(self) -> int:
        return self._cs

    def info(self) -> ImageInfo:
        """This layer's header facts, as ``qemu-img info`` reports them."""
        hdr = self.hdr
        bits = hdr.features.incompatible
        return ImageInfo(
            format="qcow2",
            virtual_size=self.size,
            cluster_size=self._cs,
            backing_file=self.backing_file,
            backing_format=self.backing_format,
            dirty=bool(bits & Incompat.DIRTY),
            qcow2=Qcow2Info(
                compat="1.1" if hdr.version >= 3 else "0.10",
                refcount_bits=1 << hdr.refcount_order,
                lazy_refcounts=bool(hdr.features.compatible & 1),
                corrupt=bool(bits & Incompat.CORRUPT),
                extended_l2=bool(bits & Incompat.EXTL2),
                compression_type="zstd" if hdr.compression_type == 1 else "zlib",
                data_file=self.data_file,
                data_file_raw=(bool(hdr.features.autoclear & AUTOCLEAR_DATA_FILE_RAW)
                               if hdr.has_data_file else None),
            ),
            snapshots=self.snapshots,
        )

    # -- metadata placement ---------------------------------------------------------------

    def _held(self, e: int) -> range:
        """Host cluster numbers an L2 entry holds a reference to."""
        cb = self._cbits
        if e & COMPRESSED:
            at = e & self._comp_host
            last = (at - at % 512) + (((e >> self._comp_shift) & self._comp_sectors) + 1) * 512
            return range(at >> cb, ((last - 1) >> cb) + 1)
        host = e & HOST_MASK
        if not host or self.hdr.has_data_file:
            # Data file clusters have no refcounts (qcow2.data-file.refcounts).
            return range(0)
        return range(host >> cb, (host >> cb) + 1)

    def _check_entry(self, c: int, e: int) -> None:
        """Refuse the L2 entry ``e`` of guest cluster ``c`` if it is malformed."""
        if not e & COMPRESSED and e & self._l2_bad:
            raise self._corrupt_entry(c, e)

    def _corrupt_entry(self, c: int, e: int) -> CorruptImageError:
        return CorruptImageError(
            f"qcow2: L2 entry 0x{e:016x} of guest cluster {c} has reserved bits set or an "
            "unaligned host offset"
        )

    def _reftable_moved(self, span: Span) -> None:
        self.hdr = self.hdr.moved(reftable=span)
        self._write_header()
        self._meta_moved()

    # -- L2 tables ------------------------------------------------------------------------

    def _store_l2(self, ofs: int, tbl: array[int]) -> None:
        self.storage.write(encode_u64_table(tbl), ofs)

    def _l2_table(self, l1i: int) -> array[int] | None:
        """The L2 table of L1 index ``l1i`` (None when it has none)."""
        if l1i >= len(self._l1):
            return None
        e = self._l1[l1i]
        if e & self._l1_bad:
            raise CorruptImageError(
                f"qcow2: L1 entry {l1i} (0x{e:016x}) has reserved bits set or an unaligned "
                "L2 table offset"
            )
        ofs = e & HOST_MASK
        if not ofs:
            return None
        tbl = self._l2.tables.get(ofs)
        if tbl is None:
            return self._load_l2(ofs)
        # Another thread may evict it meanwhile.  (A plain try: contextlib.suppress costs a
        # context manager on the hottest path.)
        try:  # noqa: SIM105
            self._l2.tables.move_to_end(ofs)
        except KeyError:
            pass
        return tbl

    def _load_l2(self, ofs: int) -> array[int]:
        with self._lock:
            tbl = self._l2.get(ofs)
            if tbl is None:
                self._vet_table("L2 table", ofs)
                tbl = decode_u64_table(self._meta_read(ofs, self._cs))
                self._l2.add(ofs, tbl)
            return tbl

    def _entry(self, c: int) -> int:
        """The raw L2 entry of guest cluster ``c`` (0 where there is no table)."""
        tbl = self._l2_table(c >> self._l2bits)
        return tbl[(c & self._l2mask) << self._ext] if tbl is not None else 0

    def _writable_l2(self, l1i: int, old: array[int] | None) -> tuple[int, array[int]]:
        """The L2 table of ``l1i`` (``old``, as just looked up), allocated (or copied, if
        shared) so that it may change."""
        e = self._l1[l1i]
        ofs = e & HOST_MASK
        if old is not None and e & COPIED:
            return ofs, old
        if old is not None and self.refs.count(ofs >> self._cbits) == 1:
            # Only the flag was missing: nothing else refers to the table.
            self._l1[l1i] = ofs | COPIED
            self._l1_dirty = True
            return ofs, old
        if old is not None:
            # Shared with a snapshot: copy it.  Its data clusters need no new references:
            # QEMU counts one per L1 table reaching them when it takes the snapshot, so
            # the active table's is already there.  Still shared, none of them is COPIED.
            new = array(old.typecode, old)
            # (Extended L2: entry words only; bit 63 of a bitmap word is a zero bit.)
            clear_top_bit(new, 1 << self._ext)  # COPIED is bit 63
        else:
            new = array(self._l1.typecode, bytes(self._cs))
        c, _ = self.refs.allocate(1, exact=True)
        nofs = c << self._cbits
        self._l2.add(nofs, new, dirty=True)
        self._unlinked.add(nofs)
        self._meta_add_table(c)
        self._l1[l1i] = nofs | COPIED
        self._l1_dirty = True
        if old is not None:
            # crash.order.unref-after-entry: "the entry's new value is on storage before
            # the cluster's refcount drops": the old table loses its reference once the L1
            # table (written after the copy) points at the copy.
            if ofs not in self._l2.dirty:
                self._l2.forget(ofs)
            self._meta_drop_table(ofs >> self._cbits)
            self._release_after(_AFTER_L1, [(ofs >> self._cbits, 1)])
        return nofs, new

    # -- write-back order -----------------------------------------------------------------

    def _settle(self) -> None:
        """Do the data writes a parallel write promised (before any table maps them)."""
        pending = self._unsettled
        if pending:
            for host, view in pending:
                self.data.write(view, host)
            pending.clear()

    def _before_l2_store(self) -> None:
        # crash.order.data-before-entry: "An L2 entry that maps a guest cluster to a newly
        # allocated (or newly reused) host cluster is written to storage only after every
        # byte the guest will read through it [...] has been written there."
        self._settle()
        # crash.order.refcount-before-reference: "The refcount that counts a cluster is on
        # storage before any L1 or L2 entry [...] that refers to the cluster is written."
        self.refs.write_back()

    def _release_after(self, key: int, clusters: list[tuple[int, int]]) -> None:
        """Drop one reference to each run of ``clusters`` once the table ``key`` (an L2
        table's offset, or _AFTER_L1) is on storage."""
        if clusters:
            self._pending_frees.setdefault(key, []).extend(clusters)
            releasing = self._releasing
            for first, n in clusters:
                for c in range(first, first + n):
                    releasing[c] = releasing.get(c, 0) + 1

    def _release_pending(self, key: int) -> None:
        """The table ``key`` is on storage: what its old entries held may go now."""
        runs = self._pending_frees.pop(key, None)
        if runs:
            releasing = self._releasing
            for first, n in runs:
                for c in range(first, first + n):
                    left = releasing.pop(c, 0) - 1
                    if left > 0:
                        releasing[c] = left
                self.refs.free(first, n)
                if first <= self.comp_next >> self._cbits < first + n:
                    # A freed cluster may be handed out as anything: pack no more into it.
                    self.comp_next = 0

    def _store_l1(self) -> None:
        """Write the L1 table (and, first, every L2 table it may point at)."""
        # crash.order.new-structure-before-pointer: "A new L1 table, L2 table [...] is
        # written completely, and its clusters are counted in refcounts that are on storage,
        # before the header, L1 entry or refcount-table entry pointing at it is written."
        self._l2.write_back()
        self.refs.write_back()
        if self.hdr.l1.n:
            self.storage.write(encode_u64_table(self._l1[: self.hdr.l1.n]), self.hdr.l1.at)
        self._l1_dirty = False
        self._unlinked.clear()
        self._release_pending(_AFTER_L1)

    def _commit(self) -> None:
        """Put every cached change on storage, in an order a cut anywhere survives."""
        self._l2.write_back()
        if self._l1_dirty or _AFTER_L1 in self._pending_frees:
            self._store_l1()
        # Refcounts last: the releases the table writes allowed.
        self.refs.write_back()

    # -- mapping runs ---------------------------------------------------------------------

    def map_run(self, offset: int, max_len: int) -> tuple[int, int, int]:
        """``(kind, host, length)`` of the longest uniform run at ``offset`` (length <= max).

        Data runs coalesce adjacent host clusters; zero and unallocated runs coalesce across
        entries (unallocated ones across tables too); a compressed run is one cluster.
        ``host`` is meaningful for the data kinds.
        """
        if self._general:
            return map_run_general(self, offset, max_len)
        size = self.size
        if offset >= size:
            return K_EOF, 0, 0
        end = offset + max_len
        if end > size:
            end = size
        cbits = self._cbits
        c = offset >> cbits
        l1i = c >> self._l2bits
        tbl = self._l2_table(l1i)
        l2n = self._l2n
        cs = self._cs
        pos = (c + 1) << cbits
        if tbl is not None:
            j = c & self._l2mask
            e = tbl[j]
            if e & COMPRESSED:
                return K_COMP, 0, min(pos, end) - offset
            if e & self._l2_bad:
                raise self._corrupt_entry(c, e)
            j += 1
            if e & ZERO_FLAG:
                zmask = self._zero_run_mask
                while pos < end and j < l2n and tbl[j] & zmask == ZERO_FLAG:
                    pos += cs
                    j += 1
                return K_ZERO, 0, min(pos, end) - offset
            h = e & HOST_MASK
            if h:
                if pos < end:
                    # The entries that continue the run: ``e + cs`` and on (``e``, free of
                    # bad bits, is ``h`` plus perhaps COPIED).  Iterating a slice of the
                    # table costs two thirds of an indexed loop (a 1 MiB read: 16 entries).
                    want = e + cs
                    for nxt in tbl[j : j + ((end - pos + cs - 1) >> cbits)]:
                        if nxt != want:
                            break
                        want += cs
                    pos += want - e - cs
                kind = K_DATA if e & COPIED else K_DATA_RO
                return kind, h + (offset & self._cmask), min(pos, end) - offset
            while pos < end and j < l2n and not tbl[j] & _NOT_COPIED:
                pos += cs
                j += 1
            if pos >= end or j < l2n:
                return K_UNALLOC, 0, min(pos, end) - offset
        else:
            # A missing table is one unallocated run.
            pos = (l1i + 1) << (self._l2bits + cbits)
        # An unallocated run goes on into the following tables.
        while pos < end:
            l1i += 1
            tbl = self._l2_table(l1i)
            if tbl is None:
                pos = (l1i + 1) << (self._l2bits + cbits)
                continue
            j = 0
            while pos < end and j < l2n and not tbl[j] & _NOT_COPIED:
                pos += cs
                j += 1
            if j < l2n:
                break
        return K_UNALLOC, 0, min(pos, end) - offset

    def to_mapping(self, kind: int, host: int, offset: int, ln: int) -> ShallowMapping:
        """The mapping object a run stands for (``SpecialMapping.layer`` left None)."""
        if kind == K_DATA:
            return RawMapping(self.data, host, self.writable)
        if kind == K_DATA_RO:
            return RawMapping(self.data, host, False)
        if kind == K_ZERO:
            return ZeroMapping(True)
        if kind == K_COMP:
            return SpecialMapping(None, offset)
        if kind == K_UNALLOC:
            if self.backing is not None:
                return IndirectMapping(self.backing, offset, False)
            return ZeroMapping(False)
        return EofMapping()

    # -- reads ----------------------------------------------------------------------------

    def _inflated(self, e: int) -> bytes:
        last = self._last_inflated
        if last is not None and last[0] == e:
            return last[1]
        at = e & self._comp_host
        n = (((e >> self._comp_shift) & self._comp_sectors) + 1) * 512 - at % 512
        out = inflate_cluster(self.storage.read(at, n), self._cs, self.hdr.compression_type)
        self._last_inflated = (e, out)
        return out

    def read_compressed(self, view: memoryview, offset: int, entry: int | None = None) -> None:
        """Fill ``view`` (inside one cluster) from the compressed cluster at ``offset``
        (whose L2 entry the caller may pass, so worker threads need not look it up)."""
        e = self._entry(offset >> self._cbits) if entry is None else entry
        if not e & COMPRESSED:
            raise UnsupportedError(f"{self}: no compressed data at guest offset {offset}")
        at = offset & self._cmask
        if at + len(view) > self._cs:
            raise InvalidRequestError(f"{self}: special read at {offset} crosses a cluster end")
        view[:] = memoryview(self._inflated(e))[at : at + len(view)]

    def readv_special(self, buffers: Sequence[WritableBuffer], offset: int) -> None:
        """Read behind a SpecialMapping (compressed cluster data, decompressed)."""
        for buf in buffers:
            view = memoryview(buf).cast("B")
            self.read_compressed(view, offset)
            offset += len(view)

    def readinto(
        self,
        view: memoryview,
        offset: int,
        jobs: list[Callable[[], None]] | None = None,
        chunk: int = 0,
    ) -> None:
        """Fill ``view`` from guest ``offset`` (this layer and its backing chain).

        With ``jobs``, the CPU-bound pieces (decompression) are left there for the caller's
        threads (see :meth:`plan_read`).
        """
        n = len(view)
        done = 0
        while done < n:
            at = offset + done
            kind, host, ln = self.map_run(at, n - done)
            if kind == K_EOF:
                fill_zero(view[done:])
                return
            part = view if ln == n else view[done : done + ln]
            if kind <= K_DATA_RO:
                self.data.readinto(part, host)
            elif kind == K_COMP:
                if jobs is None:
                    self.read_compressed(part, at)
                else:
                    jobs.append(_bind_comp(self, part, at, self._entry(at >> self._cbits)))
            elif kind != K_UNALLOC or self._bread is None:
                fill_zero(part)
            elif jobs is None:
                self._bread(part, at)
            else:
                assert self._bplan is not None
                self._bplan(part, at, jobs, chunk)
            done += ln

    def plan_read(
        self, view: memoryview, offset: int, jobs: list[Callable[[], None]], chunk: int
    ) -> None:
        """Fill ``view``, leaving the CPU-bound pieces (decompression) to ``jobs``.

        Plain data is copied right away in the calling thread: measured on 2 cores, splitting
        page-cache copies over threads was slower (the copy is memory-bound and the hand-off
        costs more than it saves), while zlib and zstd release the GIL and do scale.
        """
        self.readinto(view, offset, jobs, chunk)

    # -- writes ---------------------------------------------------------------------------

    def _old_content(self, buf: memoryview, guest: int, e: int) -> None:
        """What the guest sees now at ``guest`` (inside one cluster whose entry is ``e``)."""
        if e & COMPRESSED:
            at = guest & self._cmask
            buf[:] = memoryview(self._inflated(e))[at : at + len(buf)]
        elif e & ZERO_FLAG:
            fill_zero(buf)
        elif e & HOST_MASK:
            self.storage.readinto(buf, (e & HOST_MASK) + (guest & self._cmask))
        elif self._bread is not None:
            self._bread(buf, guest)
        else:
            fill_zero(buf)

    def prepare(
        self, offset: int, length: int, overwrite: bool, data: memoryview | None = None
    ) -> tuple[int, int, bool]:
        """Make ``[offset, offset+n)`` writable data for the longest ``n <= length`` we can.

        Returns ``(host, n, written)``: ``written`` when ``data`` (the caller's bytes for
        the range) was already stored as part of a combined copy-on-write write.
        """
        if self._general:
            return prepare_general(self, offset, length, overwrite, data)
        cbits = self._cbits
        c = offset >> cbits
        tbl = self._l2_table(c >> self._l2bits)
        if tbl is not None:
            j = c & self._l2mask
            e = tbl[j]
            h = e & HOST_MASK
            if e & self._plain_mask == COPIED and h:
                cs = self._cs
                pos = (c + 1) << cbits
                end = offset + length
                want = (h + cs) | COPIED
                j += 1
                l2n = self._l2n
                while pos < end and j < l2n and tbl[j] == want:
                    pos += cs
                    want += cs
                    j += 1
                self._vet_in_place(h, pos - (c << cbits))
                return h + (offset & self._cmask), min(pos, end) - offset, False
        with self._lock:
            return self._prepare_alloc(offset, length, overwrite, data)

    def _prepare_alloc(
        self, offset: int, length: int, overwrite: bool, data: memoryview | None
    ) -> tuple[int, int, bool]:
        cbits = self._cbits
        cs = self._cs
        c = offset >> cbits
        l1i = c >> self._l2bits
        l2i = c & self._l2mask
        in_c = offset & self._cmask
        end = offset + length
        # Every entry this call may replace is checked before anything changes.
        stop = min(((end - 1) >> cbits) + 1, (l1i + 1) << self._l2bits)
        cur = self._l2_table(l1i)
        k, olds = self._fresh_run(cur, c, stop)
        held = [x for x in olds if x & (HOST_MASK | COMPRESSED)]
        if held:
            self._vet_releases(held)
        tofs, tbl = self._writable_l2(l1i, cur)
        e = tbl[l2i]
        h = e & HOST_MASK
        if e & (COMPRESSED | ZERO_FLAG) == 0 and e & COPIED and h:
            # Only the table needed copying (or its L1 flag fixing).
            self._vet_in_place(h, cs)
            return h + in_c, min(end, (c + 1) << cbits) - offset, False
        if e & (COMPRESSED | ZERO_FLAG) == ZERO_FLAG and e & COPIED and h:
            # A zero cluster that kept its host cluster is reused in place; what the caller
            # does not overwrite is zeroed.
            self._vet_in_place(h, cs)
            n = min(end, (c + 1) << cbits) - offset
            written = self._fill_zero_cluster(h, in_c, n, data, overwrite)
            tbl[l2i] = h | COPIED
            self._l2.touch(tofs, tbl)
            return h + in_c, n, written
        hc, m = self.refs.allocate(k)
        if m < k:
            olds = olds[:m]
            held = [x for x in olds if x & (HOST_MASK | COMPRESSED)]
        host = hc << cbits
        g0 = c << cbits
        wend = min(end, (c + m) << cbits)
        written = False
        # Clusters past the end of the file were never written: they read as zero already,
        # so old content that reads zero is not copied there (16 times the bytes of a 4 KiB
        # write into a fresh 64 KiB cluster); the file is only extended over them.
        fresh = host >= self.storage.size()
        head = in_c
        tail = ((c + m) << cbits) - wend
        if not overwrite:
            if fresh and all(map(self._entry_reads_zero, olds)):
                self.storage.write_zeroes(host, m * cs)
            else:
                buf = memoryview(bytearray(m * cs))
                for t in range(m):
                    self._old_content(buf[t * cs : (t + 1) * cs], g0 + t * cs, olds[t])
                self.storage.write(buf, host)
        elif (head or tail) and fresh and self._entry_reads_zero(olds[0]) and (
            self._entry_reads_zero(olds[-1])
        ):
            if tail:
                self.storage.write_zeroes(host + (m * cs - tail), tail)
        else:
            if (head or tail) and data is not None and m * cs <= _COW_IN_ONE:
                buf = memoryview(bytearray(m * cs))
                if head:
                    self._old_content(buf[:head], g0, olds[0])
                buf[head : head + (wend - offset)] = data[: wend - offset]
                if tail:
                    self._old_content(buf[m * cs - tail :], wend, olds[-1])
                self.storage.write(buf, host)
                written = True
            else:
                if head:
                    hb = memoryview(bytearray(head))
                    self._old_content(hb, g0, olds[0])
                    self.storage.write(hb, host)
                if tail:
                    tb = memoryview(bytearray(tail))
                    self._old_content(tb, wend, olds[-1])
                    self.storage.write(tb, host + (m * cs - tail))
        self._map_fresh(tofs, tbl, l2i, host, m)
        if held:
            self._drop_refs(tofs, held)
        return host + in_c, wend - offset, written

    def _fill_zero_cluster(
        self, h: int, in_c: int, n: int, data: memoryview | None, overwrite: bool
    ) -> bool:
        """Zero the host cluster ``h`` of a zero cluster reused in place, except the
        ``[in_c, in_c + n)`` the caller overwrites; with ``data`` (the caller's bytes),
        write them too and return True.

        The on-disk entry may still map ``h`` as the data it held before the zeroing (the
        zero flag lives in the cache until the table is written), so these writes show
        through right away.  crash.power-cut: "every sector changed since reads either its
        durable value or a value a later operation gave it" -- so no 512-byte sector may be
        split between two storage writes: the partial sectors at either end of the
        caller's range go out in one write with the caller's data (QEMU merges its
        copy-on-write with the guest data the same way), the whole sectors around it are
        zeroed.
        """
        cs = self._cs
        stop = in_c + n
        if not overwrite or (data is None and (in_c or stop < cs)):
            # Nothing to merge with: the whole cluster is zeroed in one write.
            self.storage.write_zeroes(h, cs)
            return False
        lo = in_c - in_c % SECTOR
        hi = min(cs, -(-stop // SECTOR) * SECTOR)
        if lo:
            self.storage.write_zeroes(h, lo)
        if hi < cs:
            self.storage.write_zeroes(h + hi, cs - hi)
        if data is None or (lo == in_c and hi == stop):
            return False
        buf = bytearray(hi - lo)
        buf[in_c - lo : stop - lo] = data[:n]
        self.storage.write(buf, h + lo)
        return True

    def _fresh_run(self, tbl: array[int] | None, c: int, stop: int) -> tuple[int, list[int]]:
        """How many guest clusters from ``c`` (before ``stop``, in one table) need a new host
        cluster (at least one: ``c`` itself), and their current entries."""
        if tbl is None:
            return stop - c, [0] * (stop - c)
        mask = self._l2mask
        seg = tbl[c & mask : ((stop - 1) & mask) + 1]
        if not any(seg):
            # All unallocated (the common case: a fresh area).
            return len(seg), [0] * len(seg)
        bad = self._l2_bad
        olds: list[int] = []
        for x in seg:
            if x & bad and not x & COMPRESSED:
                raise self._corrupt_entry(c + len(olds), x)
            if olds and x & COPIED and x & HOST_MASK and not x & COMPRESSED:
                break
            olds.append(x)
        return len(olds), olds

    def _map_fresh(self, tofs: int, tbl: array[int], idx: int, host: int, m: int) -> None:
        """Point ``m`` entries from ``idx`` at consecutive host clusters from ``host``, each
        ours alone (COPIED)."""
        first = host | COPIED
        if m == 1:
            tbl[idx] = first
        else:
            step = self._cs
            tbl[idx : idx + m] = array(tbl.typecode, range(first, first + m * step, step))
        self._l2.touch(tofs, tbl)

    def _drop_refs(self, tofs: int, entries: list[int]) -> None:
        """Free what ``entries`` (no longer in table ``tofs``) held, once the table is on
        storage (crash.order.unref-after-entry)."""
        if entries:
            held = [(r.start, len(r)) for r in map(self._held, entries)]
            # A copy of a shared table replaces the old one only once the L1 table points
            # at it: until then the old table's references stand.
            self._release_after(_AFTER_L1 if tofs in self._unlinked else tofs, held)

    def write(
        self, view: memoryview, offset: int, jobs: list[tuple[int, memoryview]] | None
    ) -> None:
        """Write ``view`` at guest ``offset``; with ``jobs``, data writes are deferred there."""
        self.refuse_corrupt("write")
        n = len(view)
        pos = 0
        storage = self.data
        # Deferred data writes are done before any table that maps them is written.
        self._unsettled = jobs
        try:
            while pos < n:
                host, ln, written = self.prepare(offset + pos, n - pos, True, view[pos:])
                if not written:
                    sub = view if ln == n else view[pos : pos + ln]
                    if jobs is None:
                        storage.write(sub, host)
                    else:
                        jobs.append((host, sub))
                pos += ln
        finally:
            self._unsettled = None

    def write_compressed(self, view: memoryview, offset: int, blob: bytes | None) -> None:
        """Write one cluster at guest ``offset`` (checked by the caller) as ``blob``, its
        compressed form, or plainly where ``blob`` is None (compression did not pay)."""
        self.refuse_corrupt("write_compressed")
        if blob is None:
            self.write(view, offset, None)
            return
        with self._lock:
            place_compressed(self, offset, blob)

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        self.refuse_read_only("ensure_data_mapping")
        self.refuse_corrupt("ensure_data_mapping")
        if offset >= self.size:
            raise InvalidRequestError(f"{self}: offset {offset} is past the disk end")
        host, n, _ = self.prepare(offset, min(length, self.size - offset), overwrite)
        return self.data, host, n

    # -- zeroing and discarding -----------------------------------------------------------

    def clear(self, offset: int, length: int, how: Clear) -> None:
        """Zero or discard ``[offset, offset+length)`` as ``how`` says (see :class:`Clear`).

        A cluster is whole when the range covers it; the disk's last cluster counts as whole
        when the range reaches the disk end.  Only whole clusters are discarded; zeroing also
        handles the partial clusters at the head and tail.
        """
        self.refuse_read_only(how.value)
        self.refuse_corrupt(how.value)
        if not length:
            return
        cb = self._cbits
        end = offset + length
        first = offset >> cb
        stop = (end + self._cmask) >> cb
        whole_from = (offset + self._cmask) >> cb
        whole_to = max(whole_from, stop if end >= self.size else end >> cb)
        if self._general:
            clear_general(self, offset, length, how)
            return
        with self._lock:
            if how is Clear.ANY or how is Clear.BACKING:
                self._rewrite(whole_from, whole_to, 0)
            elif self.hdr.version >= 3:
                target = _ZERO_KEEPING if how is Clear.ZERO_KEEP else ZERO_FLAG
                self._rewrite(whole_from, whole_to, target)
                edges = {c for c in (first, stop - 1) if not whole_from <= c < whole_to}
                for c in sorted(edges):
                    self._zero_edge(c, max(offset, c << cb), min(end, (c + 1) << cb))
            elif self.backing is not None:
                # v2 has no zero flag, and unallocated would show the backing.
                self._zero_by_writing(offset, end)
            else:
                if how is Clear.ZERO_FREE:
                    self._rewrite(whole_from, whole_to, 0)
                self._zero_v2_pieces(offset, end, whole_from << cb, whole_to << cb)

    def _rewrite(self, first: int, stop: int, target: int) -> None:
        """Give guest clusters ``[first, stop)`` the entry ``target`` (0: unallocated,
        ZERO_FLAG: zero, _ZERO_KEEPING: zero keeping any host cluster), a table at a time;
        what the old entries held is freed once the table is on disk."""
        c = first
        while c < stop:
            l1i = c >> self._l2bits
            chunk_end = min(stop, (l1i + 1) << self._l2bits)
            lo = c & self._l2mask
            hi = lo + (chunk_end - c)
            c = chunk_end
            tbl = self._l2_table(l1i)
            if tbl is None:
                if target == 0:
                    continue
                olds = [0] * (hi - lo)
            else:
                olds = tbl[lo:hi].tolist()
            base = (l1i << self._l2bits) + lo
            news = [self._new_entry(x, target, base + t) for t, x in enumerate(olds)]
            if news == olds:
                continue
            gone = [x for x, y in zip(olds, news, strict=True) if x & (HOST_MASK | COMPRESSED)
                    and (x & COMPRESSED or (x ^ y) & HOST_MASK)]
            self._vet_releases(gone)
            tofs, wt = self._writable_l2(l1i, tbl)
            wt[lo:hi] = array(wt.typecode, news)
            self._l2.touch(tofs, wt)
            self._drop_refs(tofs, gone)

    def _new_entry(self, x: int, target: int, c: int) -> int:
        """What ``_rewrite`` puts in place of guest cluster ``c``'s entry ``x``."""
        self._check_entry(c, x)
        if target != _ZERO_KEEPING:
            return target
        if x & COMPRESSED or not x & HOST_MASK:
            return ZERO_FLAG
        if x & ZERO_FLAG:
            return x
        # Data keeps its host cluster if it is ours alone; a shared one is let go.
        return x | ZERO_FLAG if x & COPIED else ZERO_FLAG

    def _zero_edge(self, c: int, lo: int, hi: int) -> None:
        """v3: zero ``[lo, hi)``, part of guest cluster ``c``: a zero cluster already reads
        zero; an unallocated one whose rest reads zero too (no backing data there) becomes
        a zero cluster; anything else gets zeroes written into it."""
        e = self._entry(c)
        self._check_entry(c, e)
        if e & (ZERO_FLAG | COMPRESSED) == ZERO_FLAG:
            return
        start = c << self._cbits
        end = min(start + self._cs, self.size)
        if not e & _NOT_COPIED and self._backing_zero(start, lo) and self._backing_zero(hi, end):
            self._rewrite(c, c + 1, ZERO_FLAG)
        else:
            self._zero_by_writing(lo, hi)

    def _backing_zero(self, start: int, end: int) -> bool:
        """Whether the backing chain maps ``[start, end)`` as zeroes (past its end, too)."""
        b = self.backing
        while b is not None and start < end:
            mapping, n = b.get_mapping(start, end - start)
            if isinstance(mapping, EofMapping):
                return True
            if not isinstance(mapping, ZeroMapping) or n <= 0:
                return False
            start += n
        return True

    def _zero_by_writing(self, start: int, end: int) -> None:
        """Write zeroes over ``[start, end)`` (copy-on-write where the cluster is not ours
        alone); stretches marked zero already are left alone."""
        while start < end:
            kind, _, n = self.map_run(start, end - start)
            if kind != K_ZERO:
                host, n, _ = self.prepare(start, n, True)
                self.data.write_zeroes(host, n)
            start += n

    def _zero_v2_pieces(self, start: int, end: int, whole_lo: int, whole_hi: int) -> None:
        """v2 without a backing image: unallocated reads zero, so whole unallocated clusters
        split the range into pieces.  A piece that holds anything allocated is zeroed by
        writing, all of it (its partial clusters included, as the stretch is written as
        one); a piece that is all unallocated already reads zero."""
        piece = start
        holds_data = False
        pos = start
        while pos < end:
            kind, _, n = self.map_run(pos, end - pos)
            if kind == K_UNALLOC:
                a = max(pos, whole_lo)
                b = min(pos + n, whole_hi)
                if a < b:
                    if holds_data:
                        self._zero_by_writing(piece, a)
                    piece = b
                    holds_data = False
            else:
                holds_data = True
            pos += n
        if holds_data:
            self._zero_by_writing(piece, end)

    # -- resize ---------------------------------------------------------------------------

    def _tables_for(self, size: int) -> int:
        return -(-size // (self._cs * self._l2n))

    def _check_new_size(self, new_size: int) -> None:
        if new_size % 512:
            raise InvalidRequestError(
                f"{self}: qcow2 disk size {new_size} is not a multiple of 512"
            )
        if self._tables_for(new_size) > MAX_L1_ENTRIES:
            raise InvalidRequestError(f"{self}: disk size {new_size} needs too large an L1 table")
        if self.hdr.version < 3 and self.hdr.snapshots.n:
            # qcow2.snapshots.v2-no-resize: "Can't resize a v2 image which has snapshots"
            # (QEMU's qcow2_co_truncate).
            raise UnsupportedError(f"{self}: a v2 image with snapshots cannot be resized")

    def grow_l1(self, entries: int) -> None:
        """Replace the L1 table by one of ``entries`` entries (used by image creation)."""
        with self._lock:
            self._grow_l1(entries)

    def _grow_l1(self, entries: int) -> None:
        cs = self._cs
        clusters = -(-entries * 8 // cs)
        first, _ = self.refs.allocate(clusters, exact=True)
        bigger = array(self._l1.typecode, self._l1)
        bigger.extend(array(self._l1.typecode, bytes(clusters * cs - 8 * len(bigger))))
        # crash.order.new-structure-before-pointer: the L2 tables the new L1 points at and
        # the refcounts counting them and the new L1 itself, then the new L1, then the
        # header; the old L1 is freed last.
        self._l2.write_back()
        self.refs.write_back()
        self.storage.write(encode_u64_table(bigger), first << self._cbits)
        old = self.hdr.l1
        self.hdr = self.hdr.moved(l1=Span(first << self._cbits, entries))
        self._write_header()
        self._l1 = bigger[:entries]
        self._l1_dirty = False
        self._unlinked.clear()
        self._meta_moved()
        self._release_pending(_AFTER_L1)
        if old.n:
            self.refs.free(old.at >> self._cbits, -(-old.n * 8 // cs))

    def _set_size(self, new_size: int) -> None:
        """Record a new disk size in the header (the L1 table already covers it)."""
        self.size = new_size
        self.hdr = self.hdr.resized(new_size)
        self._write_header()

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        """Grow the disk; ``prealloc`` says how the new area reads and what it allocates."""
        self._check_new_size(new_size)
        with self._lock:
            old = self.size
            if new_size <= old:
                return
            self.refuse_read_only("resize_grow")
            self.refuse_corrupt("resize_grow")
            tables = self._tables_for(new_size)
            if tables > self.hdr.l1.n:
                self._grow_l1(tables)
            # crash.order.grow-size-last: "Growing prepares the whole new area first [...]
            # and writes the new size into the header last": the size is new in memory only
            # (the header written meanwhile keeps the old one) until the area is on storage.
            self.size = new_size
            try:
                if self._general:
                    grow_general(self, old, prealloc)
                elif prealloc is not PreallocateMode.NONE:
                    self._prepare_new_area(old, prealloc)
                self._commit()
            except BaseException:
                self.size = old
                raise
            self._set_size(new_size)

    def _prepare_new_area(self, old: int, prealloc: PreallocateMode) -> None:
        """Make ``[old, size)`` read zero; all modes but ZERO also map it to host clusters."""
        cb = self._cbits
        new_size = self.size
        head_end = min(-(-old >> cb) << cb, new_size)
        if head_end > old and not self._reads_zero(old >> cb):
            # The cluster the old end cut short may hold stale bytes past it.
            host, n, _ = self.prepare(old, head_end - old, True)
            self.storage.write_zeroes(host, n)
        if head_end == new_size:
            return
        first = head_end >> cb
        stop = -(-new_size >> cb)
        if prealloc is not PreallocateMode.ZERO:
            self._preallocate(first, stop, prealloc)
        elif self.hdr.version >= 3:
            self._rewrite(first, stop, ZERO_FLAG)
        elif self.backing is not None:
            self._zero_by_writing(head_end, new_size)

    def _reads_zero(self, c: int) -> bool:
        return self._entry_reads_zero(self._entry(c))

    def _entry_reads_zero(self, e: int) -> bool:
        """Whether a cluster whose L2 entry is ``e`` reads as zero."""
        if e & COMPRESSED:
            return False
        return bool(e & ZERO_FLAG) or (not e & HOST_MASK and self.backing is None)

    def _preallocate(self, first: int, stop: int, prealloc: PreallocateMode) -> None:
        """Map clusters ``[first, stop)`` to host clusters that read as zero: plain data
        clusters, as QEMU's preallocation=metadata/falloc/full makes them."""
        cs = self._cs
        # FORMAT_ALLOCATE maps clusters without allocating them on storage (sparse).
        mode = PreallocateMode.NONE if prealloc is PreallocateMode.FORMAT_ALLOCATE else prealloc
        c = first
        while c < stop:
            l1i = c >> self._l2bits
            lo = c & self._l2mask
            want = min(stop, (l1i + 1) << self._l2bits) - c
            cur = self._l2_table(l1i)
            if cur is not None:
                for t, x in enumerate(cur[lo : lo + want]):
                    self._check_entry(c + t, x)
                self._vet_releases([x for x in cur[lo : lo + want] if x & (HOST_MASK | COMPRESSED)])
            tofs, tbl = self._writable_l2(l1i, cur)
            hc, m = self.refs.allocate(want)
            host = hc << self._cbits
            end = host + m * cs
            if host < self.storage.size():
                # Reused clusters may hold stale data; fresh ones past the end read as zero.
                self.storage.write_zeroes(host, m * cs)
            if self.storage.size() < end:
                self.storage.resize(end, mode)
            olds = [x for x in tbl[lo : lo + m] if x & (HOST_MASK | COMPRESSED)]
            self._map_fresh(tofs, tbl, lo, host, m)
            self._drop_refs(tofs, olds)
            c += m

    def resize_shrink(self, new_size: int) -> None:
        self.refuse_read_only("resize_shrink")
        self.refuse_corrupt("resize_shrink")
        self._check_new_size(new_size)
        if new_size >= self.size:
            return
        with self._lock:
            cb = self._cbits
            if self._general:
                shrink_general(self, new_size)
            else:
                self._rewrite(-(-new_size >> cb), -(-self.size >> cb), 0)
            # L2 tables wholly past the new end are unhooked and freed, as QEMU does: they
            # and what their old entries held go once the L1 table no longer points at them.
            for l1i in range(self._tables_for(new_size), self.hdr.l1.n):
                ofs = self._l1[l1i] & HOST_MASK
                if ofs:
                    self._l1[l1i] = 0
                    self._l1_dirty = True
                    self._l2.forget(ofs)
                    held = self._pending_frees.pop(ofs, [])
                    self._pending_frees.setdefault(_AFTER_L1, []).extend(held)
                    self._release_after(_AFTER_L1, [(ofs >> cb, 1)])
                    self._meta_drop_table(ofs >> cb)
            if self._l1_dirty:
                self._store_l1()
            self._set_size(new_size)

    # -- caches and lifetime --------------------------------------------------------------

    def flush(self) -> None:
        if self.data is not self.storage:
            # Guest data before the metadata that maps it.
            self.data.flush()
        if self.writable and not self.closed:
            with self._lock:
                self._commit()
        self.storage.flush()

    def sync(self) -> None:
        if self.data is not self.storage:
            self.data.sync()
        self.storage.sync()

    def invalidate_cache(self) -> None:
        with self._lock:
            self._l2.clear()
            self._pending_frees.clear()
            self._releasing.clear()
            self._unlinked.clear()
            self._last_inflated = None
            self.comp_next = 0
            self._meta_moved()
            self.storage.invalidate_cache()
            self._file_end = self.storage.size()
            self.hdr = parse_header(self._first_cluster(), self._file_end)
            self.size = self.hdr.size
            self._snapshots = None
            if self.snapshot is not None:
                self._switch_to_snapshot()
            self._l1 = self._read_l1()
            self._l1_dirty = False
            self.refs.span = self.hdr.reftable
            self.refs.reload()
            self._meta_moved()

    def _drop_caches(self) -> None:
        # The layer and its caches refer to each other (write-back callbacks): emptying them
        # frees the tables now rather than at the next garbage collection.
        self._l2.clear()
        self._pending_frees.clear()
        self._releasing.clear()
        self._unlinked.clear()
        self.refs.blocks.clear()
        self._meta_moved()
        self._last_inflated = None

    def detach(self) -> None:
        super().detach()
        self._drop_caches()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._drop_caches()
        try:
            self.storage.close()
        finally:
            try:
                self.close_data_file()
            finally:
                if self.backing is not None and self._owns_backing:
                    self.backing.close()


def backing_readers(backing: object) -> tuple[Reader | None, Planner | None]:
    """How a layer reads its backing: our own layers directly, anyone else's publicly."""
    if backing is None:
        return None, None
    drv = getattr(backing, "driver", None)
    if getattr(drv, "pyimago_fast_layer", False):
        return drv.readinto, drv.plan_read  # type: ignore[union-attr]
    public: Reader = backing.readinto  # type: ignore[attr-defined]

    def plan(view: memoryview, off: int, jobs: list[Callable[[], None]], chunk: int) -> None:
        jobs.append(lambda: public(view, off))

    return public, plan


def _bind_comp(layer: Qcow2Layer, view: memoryview, off: int, entry: int) -> Callable[[], None]:
    return lambda: layer.read_compressed(view, off, entry)

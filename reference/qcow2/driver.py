"""The qcow2 format driver of the reference implementation.

Plain and direct: one guest cluster per mapping, L1 table and refcounts written through, and
a small write-back cache of L2 tables (so that ``flush`` has something to do and cache
eviction is a real code path).  Comments cite the clause IDs of specs/.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .._errors import (
    CorruptImageError,
    InvalidRequestError,
    ReadOnlyError,
    UnsupportedError,
)
from .._info import ImageInfo, Qcow2Info
from .._mapping import (
    EofMapping,
    IndirectMapping,
    RawMapping,
    ShallowMapping,
    SpecialMapping,
    ZeroMapping,
)
from .._prealloc import PreallocateMode
from .._snapshot import SnapshotInfo
from .._storage import Storage, WritableBuffer
from .allocation import ClusterAllocator
from .bitmaps import autoclear_for_writing
from .compressed_write import CompressedWrites
from .compression import decompress_cluster
from .constants import (
    COMPRESSION_TYPES,
    L1E_OFFSET_MASK,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_INCOMPAT_EXTL2,
    QCOW_MAX_L1_SIZE,
    QCOW_OFLAG_COPIED,
    V2_HEADER_LENGTH,
)
from .data_file import data_file_name
from .dirty import repair_if_dirty
from .extensions import HeaderExtension, backing_format, feature_names, parse_extensions
from .features import check_features
from .guard import MetadataGuard
from .header import QCowHeader, l2_entries, parse_header, required_l1_size
from .l2cache import L2Cache
from .overlap import (
    MetadataRegion,
    first_overlap,
    snapshot_regions,
)
from .refcounts import RefcountTable
from .snapshot_write import SnapshotWrites
from .snapshots import SnapshotEntry, find_snapshot, read_snapshot_table
from .subcluster_write import (
    encode_extended_entry,
    subcluster_cow_range,
    written_bitmap,
    zeroed_bitmap,
)
from .subclusters import subcluster_entry
from .tables import (
    ClusterType,
    L2Entry,
    decode_l1_entry,
    decode_l2_entry,
    encode_l2_entry,
    l1_index,
    l2_index,
    offset_in_cluster,
    whole_clusters,
)

if TYPE_CHECKING:
    from ..access import FormatAccess

__all__ = ["DEFAULT_L2_CACHE_TABLES", "Qcow2Driver"]

#: L2 tables the reference keeps in memory; small on purpose, so eviction happens in tests.
DEFAULT_L2_CACHE_TABLES = 16

_ZERO_PLAIN = L2Entry(ClusterType.ZERO_PLAIN)
_UNALLOCATED = L2Entry(ClusterType.UNALLOCATED)


class Qcow2Driver(MetadataGuard, CompressedWrites, SnapshotWrites):
    """A qcow2 image (v2 or v3) on a storage, optionally over a backing ``FormatAccess``."""

    def __init__(
        self,
        storage: Storage,
        *,
        writable: bool = False,
        l2_cache_tables: int = DEFAULT_L2_CACHE_TABLES,
        snapshot: str | None = None,
    ) -> None:
        """Open the qcow2 image in ``storage``; ``snapshot`` (an ID or name) opens that
        internal snapshot instead of the active disk, read-only."""
        if snapshot is not None and writable:
            raise InvalidRequestError(f"snapshot {snapshot!r} can only be opened read-only")
        if writable and not storage.writable:
            raise ReadOnlyError(f"cannot open {storage} writable: the storage is read-only")
        if l2_cache_tables < 1:
            raise InvalidRequestError(f"l2_cache_tables must be >= 1, not {l2_cache_tables}")
        self._storage = storage
        self._writable = writable
        self._l2_cache_tables = l2_cache_tables
        self._backing: FormatAccess | None = None
        self._own_backing = False
        self._data_storage: Storage | None = None
        self._own_data = False

        if writable:
            repair_if_dirty(storage)
        head = storage.read(0, V2_HEADER_LENGTH + 40)
        header = parse_header(head)
        cs = header.cluster_size
        cluster = storage.read(0, cs)
        header = parse_header(cluster)
        self.header: QCowHeader = header
        ext_end = header.backing_file_offset if header.backing_file_offset else cs
        ext_start = header.header_length
        if header.backing_file_offset and header.backing_file_offset < ext_start:
            raise CorruptImageError(
                f"qcow2 backing file name offset {header.backing_file_offset} lies inside the "
                "header"
            )
        self.extensions: list[HeaderExtension] = (
            parse_extensions(cluster, ext_start, ext_end) if header.version >= 3 else
            parse_extensions(cluster, V2_HEADER_LENGTH, ext_end)
        )
        check_features(header, feature_names(self.extensions), writable=writable)
        self.backing_file: str | None = None
        if header.backing_file_offset and header.backing_file_size:
            raw = cluster[
                header.backing_file_offset : header.backing_file_offset + header.backing_file_size
            ]
            if b"\0" in raw:
                # QEMU reads the name as a C string and would open a different file; a name
                # no path can hold is corruption, not a ValueError from os.path later.
                raise CorruptImageError(
                    f"qcow2 backing file name {raw!r} (at offset "
                    f"{header.backing_file_offset}) holds a NUL byte"
                )
            self.backing_file = raw.decode("utf-8", "surrogateescape")
        self.backing_format: str | None = backing_format(self.extensions)
        #: The external data file's name from the header extension (None: the caller must
        #: name it); only meaningful when ``header.has_data_file``.
        self.data_file: str | None = (
            data_file_name(self.extensions) if header.has_data_file else None
        )

        self._cluster_bits = header.cluster_bits
        self._cluster_size = cs
        self._extended = header.extended_l2
        self._entry_bytes = header.l2_entry_bytes
        # qcow2.extended-l2.subclusters: the allocation unit is the subcluster (1/32 of a
        # cluster) with extended L2 entries, the cluster otherwise.
        self._unit_bits = header.cluster_bits - (5 if self._extended else 0)
        self._l2_entries = l2_entries(header.cluster_bits, self._entry_bytes)
        self._size = header.size
        self._l1_offset = header.l1_table_offset
        self._l1_size = header.l1_size
        self._snapshot_entries: list[SnapshotEntry] | None = None
        self.snapshot: SnapshotInfo | None = None
        if snapshot is not None:
            # qcow2.snapshots.open: a snapshot reads through its own L1 table, at the image's
            # size, as qemu-img convert -l does (qcow2_snapshot_load_tmp switches the L1 table
            # only); guest clusters past the snapshot's L1 table are unallocated.
            entry = find_snapshot(self._snapshots(), snapshot)
            self.snapshot = entry.info
            if entry.l1_size * 8 > QCOW_MAX_L1_SIZE:
                raise CorruptImageError(
                    f"qcow2 snapshot {entry.id_str!r}: its L1 table of {entry.l1_size} entries "
                    "exceeds QEMU's limit (32 MiB)"
                )
            self._l1_offset, self._l1_size = entry.l1_table_offset, entry.l1_size
        self._check_metadata_range(
            "L1 table", self._l1_offset, self._l1_size * 8, check_overlap=False
        )
        self._check_metadata_range(
            "refcount table",
            header.refcount_table_offset,
            header.refcount_table_clusters * cs,
            check_overlap=False,
        )
        self._l1 = self._load_l1()
        self._check_snapshot_table()
        #: qcow2.corrupt.mark: set once a write would have landed on metadata.
        self._corrupt = False
        # The snapshots' metadata, for the overlap checks of a writable image (read once;
        # the snapshot operations refresh it).
        self._snapshot_metadata: list[MetadataRegion] = []
        if writable:
            snapshots, table_length = read_snapshot_table(
                storage, header.snapshots_offset, header.nb_snapshots
            )
            self._snapshot_metadata = list(snapshot_regions(
                storage, cs, header.snapshots_offset, table_length, snapshots
            ))
        self._l2 = L2Cache(storage, cs, l2_cache_tables)
        # Host clusters to unreference once the pinned L2 tables (whose new entries replace
        # the references) are on storage (crash.order.unref-after-entry).
        self._pending_frees: list[int] = []

        self._allocator = ClusterAllocator(storage, self._cluster_bits)
        self._refcounts = RefcountTable(
            storage,
            cluster_bits=self._cluster_bits,
            refcount_order=header.refcount_order,
            table_offset=header.refcount_table_offset,
            table_clusters=header.refcount_table_clusters,
            bump=self._allocator.bump,
            peek_end=self._allocator.peek_end,
            write_header=self._write_refcount_table_pointer,
        )
        #: qcow2.data-file.raw: the raw external data bit holds, and we keep it so.
        self._data_file_raw = bool(
            header.has_data_file and header.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW
        )
        if writable:
            self._allocator.attach(self._refcounts)
            self._allocator.overlap_check = self._overlap_check
            if header.version >= 3 and header.autoclear_features:
                # qcow2.features.autoclear-clear, qcow2.bitmaps.in-use: unknown bits go,
                # bitmaps are flagged in use as QEMU's writable open flags them.
                autoclear = autoclear_for_writing(storage, header, self.extensions)
                if autoclear != header.autoclear_features:
                    self._write_field("autoclear_features", ">Q", autoclear)
                    self.header = replace(self.header, autoclear_features=autoclear)

    def _snapshots(self) -> list[SnapshotEntry]:
        if self._snapshot_entries is None:
            h = self.header
            entries, length = read_snapshot_table(
                self._storage, h.snapshots_offset, h.nb_snapshots, image_size=h.size
            )
            if h.nb_snapshots and h.snapshots_offset + length > self._storage.size():
                raise CorruptImageError(
                    f"qcow2 snapshot table at 0x{h.snapshots_offset:x} ({length} bytes) runs "
                    f"past the end of the file ({self._storage.size()} bytes)"
                )
            self._snapshot_entries = entries
        return self._snapshot_entries

    @property
    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """qcow2.snapshots.list: the image's internal snapshots, in table order."""
        return tuple(e.info for e in self._snapshots())

    def set_data_file(self, storage: Storage, *, owned: bool = False) -> None:
        """Attach the external data file (opened by ``open_image`` or given by the caller)."""
        self._data_storage = storage
        self._own_data = owned

    def close_data_file(self) -> None:
        """Close the external data file if this driver opened it."""
        if self._data_storage is not None and self._own_data:
            self._own_data = False
            self._data_storage.close()

    @property
    def data_storage(self) -> Storage:
        """Where guest data lives: the external data file, or the image file itself."""
        if self._data_storage is not None:
            return self._data_storage
        if self.header.has_data_file:
            raise InvalidRequestError(f"{self}: the external data file is not attached")
        return self._storage

    def _load_l1(self) -> list[int]:
        raw = self._storage.read(self._l1_offset, self._l1_size * 8) if self._l1_size else b""
        return [v for (v,) in struct.iter_unpack(">Q", raw)]

    def set_backing(self, backing: FormatAccess | None, *, owned: bool = False) -> None:
        """Attach the backing image (opened by ``open_image`` or given by the caller)."""
        self._backing = backing
        self._own_backing = owned

    @property
    def backing(self) -> FormatAccess | None:
        return self._backing

    # -- FormatDriver properties --------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def cluster_size(self) -> int:
        return self._cluster_size

    @property
    def zero_granularity(self) -> int | None:
        if self.header.version >= 3:
            return 1 << self._unit_bits
        # v2 has no zero flag: only "unallocated without a backing file" reads as zero.
        return None if self._backing is not None else self._cluster_size

    @property
    def storage(self) -> Storage:
        return self._storage

    def storage_dependencies(self) -> list[Storage]:
        deps = [self._storage]
        if self._data_storage is not None:
            deps.append(self._data_storage)
        if self._backing is not None:
            deps += self._backing.driver.storage_dependencies()
        return deps

    def __str__(self) -> str:
        return f"qcow2:{self._storage}"

    def info(self) -> ImageInfo:
        """This layer's header facts, as ``qemu-img info`` reports them."""
        h = self.header
        incompat = h.incompatible_features
        return ImageInfo(
            format="qcow2",
            virtual_size=self._size,
            cluster_size=self._cluster_size,
            backing_file=self.backing_file,
            backing_format=self.backing_format,
            dirty=bool(incompat & QCOW2_INCOMPAT_DIRTY),
            qcow2=Qcow2Info(
                compat="1.1" if h.version >= 3 else "0.10",
                refcount_bits=h.refcount_bits,
                lazy_refcounts=bool(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS),
                corrupt=bool(incompat & QCOW2_INCOMPAT_CORRUPT),
                extended_l2=bool(incompat & QCOW2_INCOMPAT_EXTL2),
                compression_type=COMPRESSION_TYPES.get(h.compression_type, "zlib"),
                data_file=self.data_file,
                data_file_raw=(bool(h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)
                               if h.has_data_file else None),
            ),
            snapshots=self.snapshots,
        )

    # -- header updates -----------------------------------------------------------------------

    def _write_refcount_table_pointer(self, offset: int, clusters: int) -> None:
        # Offset and cluster count are adjacent (bytes 48-59): one write switches both.
        self._write_field("refcount_table_offset", ">QI", offset, clusters)

    # -- L2 tables ----------------------------------------------------------------------------

    def _l2_table_offset(self, l1_idx: int) -> int:
        entry = decode_l1_entry(self._l1[l1_idx], self._cluster_size)
        if entry.l2_offset:
            self._check_l2_table(entry.l2_offset)
        return entry.l2_offset

    def _load_l2(self, l2_offset: int) -> list[int]:
        return self._l2.load(l2_offset)

    def _settle(self) -> None:
        """Called on entry to every driver operation but ``ensure_data_mapping``: by then the
        caller has written its data through every mapping it was given, so the entries that
        map it may reach storage, and after them the refcount drops they wait for.

        crash.order.data-before-entry: "An L2 entry that maps a guest cluster to a newly
        allocated (or newly reused) host cluster is written to storage only after every byte
        the guest will read through it [...] has been written there."
        crash.order.unref-after-entry: "the entry's new value is on storage before the
        cluster's refcount drops".
        """
        if self._pending_frees:
            self._l2.write_pinned()
            frees, self._pending_frees = self._pending_frees, []
            for host in frees:
                self._allocator.free(host)
        if self._l2.pinned:
            self._l2.unpin()

    def _raw_l2_entry(self, guest_offset: int) -> tuple[int, int]:
        """The raw L2 entry mapping ``guest_offset`` and its subcluster bitmap (0 without
        extended L2 entries); ``(0, 0)`` where no L2 table maps it."""
        l1_idx = l1_index(guest_offset, self._cluster_bits, self._entry_bytes)
        if l1_idx >= self._l1_size:
            return 0, 0
        l2_offset = self._l2_table_offset(l1_idx)
        if not l2_offset:
            return 0, 0
        table = self._load_l2(l2_offset)
        i = l2_index(guest_offset, self._cluster_bits, self._entry_bytes) * (
            self._entry_bytes // 8
        )
        return table[i], table[i + 1] if self._extended else 0

    def _get_l2_entry(self, guest_offset: int) -> L2Entry:
        raw, _ = self._raw_l2_entry(guest_offset)
        return decode_l2_entry(raw, self._cluster_bits, extended=self._extended,
                               data_file=self.header.has_data_file)

    def _get_unit(self, guest_offset: int) -> L2Entry:
        """The entry of the allocation unit at ``guest_offset``: its cluster's entry, or
        with extended L2 entries what its subcluster is (qcow2.extended-l2.bitmap)."""
        entry = self._get_l2_entry(guest_offset)
        if entry.type is ClusterType.COMPRESSED and self.header.has_data_file:
            # qcow2.data-file.no-compressed: "neither compressed clusters nor internal
            # snapshots are supported".
            raise CorruptImageError(
                f"qcow2 compressed cluster at guest offset {guest_offset} in an image with an "
                "external data file"
            )
        if not self._extended:
            return entry
        _, bitmap = self._raw_l2_entry(guest_offset)
        sc = (guest_offset >> self._unit_bits) & 31
        return subcluster_entry(entry, bitmap, sc, 1 << self._unit_bits,
                                where=f"for guest offset {guest_offset}")

    def _writable_l2(self, guest_offset: int) -> tuple[int, list[int]]:
        """The L2 table for ``guest_offset``, allocated or copied so that we may change it."""
        l1_idx = l1_index(guest_offset, self._cluster_bits, self._entry_bytes)
        entry = decode_l1_entry(self._l1[l1_idx], self._cluster_size)
        if entry.l2_offset and entry.copied:
            self._check_l2_table(entry.l2_offset)
            return entry.l2_offset, self._load_l2(entry.l2_offset)
        if entry.l2_offset:
            # qcow2.l2.cow-shared: an L2 table with refcount > 1 (COPIED clear) is shared with a
            # snapshot and must be copied before it is changed.
            self._check_l2_table(entry.l2_offset)
            table = list(self._load_l2(entry.l2_offset))
        else:
            table = [0] * (self._cluster_size // 8)
        new_offset = self._allocator.allocate(1)
        # crash.order.new-structure-before-pointer: "A new L1 table, L2 table, refcount table
        # or refcount block is written completely, and its clusters are counted in refcounts
        # that are on storage, before the header, L1 entry or refcount-table entry pointing at
        # it is written [...] The old structure is freed last."
        new_table = self._l2.write_new(new_offset, table)
        self._set_l1_entry(l1_idx, new_offset | QCOW_OFLAG_COPIED)
        if entry.l2_offset:
            self._l2.drop(entry.l2_offset)
            self._allocator.free(entry.l2_offset)
        return new_offset, new_table

    def _set_l1_entry(self, l1_idx: int, raw: int) -> None:
        self._l1[l1_idx] = raw
        self._storage.write(struct.pack(">Q", raw), self._l1_offset + 8 * l1_idx)

    def _set_l2_entry(
        self, guest_offset: int, entry: L2Entry, *, write_through: bool, pinned: bool = False,
        bitmap: int | None = None,
    ) -> None:
        """Change one L2 entry; ``write_through`` when a refcount drop follows, so that the
        entry no longer points at a cluster by the time it may be reused
        (qcow2.refcount.order-of-updates); ``pinned`` while the data it maps is unwritten.
        ``bitmap``: the subcluster bitmap of an extended entry (None: what ``entry`` implies)."""
        l2_offset, table = self._writable_l2(guest_offset)
        i = l2_index(guest_offset, self._cluster_bits, self._entry_bytes) * (
            self._entry_bytes // 8
        )
        table[i : i + self._entry_bytes // 8] = self._encode_entry(entry, bitmap)
        self._l2.mark_dirty(l2_offset, pinned=pinned)
        if write_through:
            self._l2.write(l2_offset)

    def _encode_entry(self, entry: L2Entry, bitmap: int | None) -> list[int]:
        """The raw word(s) of an L2 entry: one, or two with extended L2 entries."""
        if not self._extended or entry.type is ClusterType.COMPRESSED:
            words = [encode_l2_entry(entry, self._cluster_bits)]
            return [*words, 0] if self._extended else words
        return list(encode_extended_entry(entry, bitmap))

    def _held_clusters(self, entry: L2Entry) -> range:
        """Host cluster offsets whose refcount counts this entry."""
        if self.header.has_data_file:
            # qcow2.data-file.write: "clusters in the external data file are not
            # refcounted".
            return range(0)
        cs = self._cluster_size
        if entry.type in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            return range(entry.host_offset, entry.host_offset + cs, cs)
        if entry.type is ClusterType.COMPRESSED:
            # The compressed data may straddle host clusters; each one it touches was counted.
            first = entry.host_offset - entry.host_offset % cs
            return range(first, entry.host_offset + entry.compressed_length, cs)
        return range(0)

    def _replace_entry(self, guest_offset: int, new: L2Entry, *, data_pending: bool = False,
                       bitmap: int | None = None) -> None:
        """Point the entry of ``guest_offset`` at ``new``, releasing what the old one held.

        With ``data_pending`` the caller has yet to write the data ``new`` maps: the entry
        stays in the cache (pinned) and the old clusters' refcounts drop only once it is on
        storage (see ``_settle``).  ``bitmap``: the new subcluster bitmap of an extended entry
        (None: what ``new`` implies, see ``encode_extended_entry``).
        """
        old = self._get_l2_entry(guest_offset)
        if self._extended and list(self._raw_l2_entry(guest_offset)) == self._encode_entry(
            new, bitmap
        ):
            return
        held = self._held_clusters(old)
        releases = bool(held) and not (new.host_offset and new.host_offset == old.host_offset)
        if releases:
            # Validate before anything changes: a hostile entry must not make us free the
            # image's own metadata, or a cluster nobody holds.
            for host in held:
                self._check_data_cluster(host, what="freeing of", in_file=False)
                if self._allocator.refcount(host) == 0:
                    raise CorruptImageError(
                        f"qcow2 L2 entry for guest offset {guest_offset} refers to host cluster "
                        f"0x{host:x} whose refcount is 0"
                    )
        if data_pending:
            self._set_l2_entry(guest_offset, new, write_through=False, pinned=True,
                               bitmap=bitmap)
            if releases:
                self._pending_frees.extend(held)
            return
        self._set_l2_entry(guest_offset, new, write_through=releases, bitmap=bitmap)
        if releases:
            for host in held:
                self._allocator.free(host)

    # -- mappings -----------------------------------------------------------------------------

    def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        self._settle()
        if offset >= self._size:
            return EofMapping(), 0
        # The unit is a cluster, or a subcluster with extended L2 entries.
        unit = 1 << self._unit_bits
        in_unit = offset_in_cluster(offset, self._unit_bits)
        limit = min(max_length, self._size - offset)
        entry = self._get_unit(offset)
        length = min(unit - in_unit, limit)
        # Following units that continue the same mapping extend it (compressed clusters
        # never do: each one is decoded on its own).
        while length < limit and entry.type is not ClusterType.COMPRESSED:
            following = self._get_unit(offset + length)
            if not self._continues(entry, following, (offset + length - in_unit) - offset):
                break
            length = min(length + unit, limit)
        return self._mapping_for(entry, offset, in_unit), length

    def _continues(self, first: L2Entry, later: L2Entry, distance: int) -> bool:
        """Whether ``later`` (``distance`` bytes of guest clusters after ``first``) maps as
        one run with it."""
        if first.type is ClusterType.NORMAL:
            return (
                later.type is ClusterType.NORMAL
                and later.copied == first.copied
                and later.host_offset == first.host_offset + distance
            )
        zero = (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC)
        if first.type in zero:
            return later.type in zero
        return later.type is first.type

    def _mapping_for(self, entry: L2Entry, offset: int, in_cluster: int) -> ShallowMapping:
        t = entry.type
        if t is ClusterType.NORMAL:
            # A cluster outside the file or over the header/L1/refcount table reads as it
            # is, but is never handed out as writable (qcow2.metadata.outside-file, overlap).
            if self.header.has_data_file:
                # qcow2.data-file.offsets: the host offset is an offset into the data file.
                return RawMapping(self.data_storage, entry.host_offset + in_cluster,
                                  self._writable and not self._corrupt and entry.copied)
            writable = (
                self._writable
                and not self._corrupt
                and entry.copied
                and entry.host_offset < self._storage.size()
                and first_overlap(self._metadata_regions(), entry.host_offset,
                                  self._cluster_size) is None
            )
            return RawMapping(self._storage, entry.host_offset + in_cluster, writable)
        if t in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            return ZeroMapping(True)
        if t is ClusterType.COMPRESSED:
            return SpecialMapping(None, offset)
        # qcow2.l2.unallocated-backing: "the cluster is read from the backing file".
        if self._backing is not None:
            return IndirectMapping(self._backing, offset, False)
        return ZeroMapping(False)

    def _read_compressed(self, entry: L2Entry) -> bytes:
        data = self._storage.read(entry.host_offset, entry.compressed_length)
        return decompress_cluster(data, self._cluster_size, self.header.compression_type)

    def readv_special(self, buffers: Sequence[WritableBuffer], offset: int) -> None:
        self._settle()
        entry = self._get_l2_entry(offset)
        if entry.type is not ClusterType.COMPRESSED:
            raise UnsupportedError(f"{self}: no special data at guest offset {offset}")
        cluster = self._read_compressed(entry)
        pos = offset_in_cluster(offset, self._cluster_bits)
        for buf in buffers:
            view = memoryview(buf).cast("B")
            if pos + len(view) > self._cluster_size:
                raise InvalidRequestError(
                    f"{self}: special read at {offset} crosses the cluster boundary"
                )
            view[:] = cluster[pos : pos + len(view)]
            pos += len(view)

    def _begin(self, op: str) -> None:
        """Start a modifying operation other than ensure_data_mapping."""
        self._require_writable(op)
        self._settle()

    def _cluster_content(self, guest_cluster: int, entry: L2Entry) -> bytes:
        """What the guest currently sees in a whole cluster (the source of copy-on-write)."""
        t = entry.type
        if t is ClusterType.NORMAL:
            return self.data_storage.read(entry.host_offset, self._cluster_size)
        if t is ClusterType.COMPRESSED:
            return self._read_compressed(entry)
        if t is ClusterType.UNALLOCATED and self._backing is not None:
            return self._backing.read(guest_cluster, self._cluster_size)
        return bytes(self._cluster_size)

    def _guest_content(self, offset: int, length: int) -> bytes:
        """What the guest sees in ``[offset, offset + length)``, inside one cluster, read unit
        by unit (subclusters with extended L2 entries)."""
        parts = []
        unit = 1 << self._unit_bits
        end = offset + length
        while offset < end:
            n = min(unit - offset_in_cluster(offset, self._unit_bits), end - offset)
            entry = self._get_unit(offset)
            if entry.type is ClusterType.COMPRESSED:
                pos = offset_in_cluster(offset, self._cluster_bits)
                parts.append(self._read_compressed(entry)[pos : pos + n])
            elif entry.type is ClusterType.NORMAL:
                pos = offset_in_cluster(offset, self._unit_bits)
                parts.append(self.data_storage.read(entry.host_offset + pos, n))
            elif entry.type is ClusterType.UNALLOCATED and self._backing is not None:
                parts.append(self._backing.read(offset, n))
            else:
                parts.append(bytes(n))
            offset += n
        return b"".join(parts)

    def _allocate_data_cluster(self, guest_cluster: int) -> int:
        """A host cluster for new guest data.

        qcow2.data-file.offsets: "The offset field in the Standard Cluster Descriptor must
        match the guest offset" in an external data file, where nothing is refcounted.
        """
        if self.header.has_data_file:
            return guest_cluster
        return self._allocator.allocate(1)

    def _check_host_data(self, host: int) -> None:
        """The overlap checks of a data cluster in the image file (none in a data file)."""
        if not self.header.has_data_file:
            self._check_data_cluster(host)

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        self._require_writable("ensure_data_mapping")
        if offset >= self._size:
            raise InvalidRequestError(f"{self}: offset {offset} is past the disk end")
        if self._extended:
            return self._ensure_subcluster_data(offset, length, overwrite)
        in_cluster = offset_in_cluster(offset, self._cluster_bits)
        chunk = min(length, self._cluster_size - in_cluster)
        guest_cluster = offset - in_cluster
        entry = self._get_unit(offset)
        storage = self.data_storage
        if entry.type is ClusterType.NORMAL and entry.copied:
            self._check_host_data(entry.host_offset)
            return storage, entry.host_offset + in_cluster, chunk
        # access.cow.partial-cluster: everything of the cluster the caller does not overwrite is
        # copied from what the guest sees now (backing, compressed data, zeroes).
        keep = [(0, self._data_cluster_end(guest_cluster))]
        if overwrite:
            keep = [(0, in_cluster), (in_cluster + chunk, keep[0][1])]
        keep = [(a, b) for a, b in keep if b > a]
        if entry.type is ClusterType.ZERO_ALLOC and entry.copied:
            host = entry.host_offset
            self._check_host_data(host)
            # crash.power-cut: "every sector changed since reads either its durable value or
            # a value a later operation gave it". The table on storage may still map this
            # host cluster as the data it held before it was zeroed, so these writes show
            # at once: zeroing the kept ranges one by one could split a 512-byte sector
            # between two writes (half old data, half zeroes). The whole cluster is zeroed
            # in one write instead; the caller's data follows.
            if keep:
                storage.write_zeroes(host, self._data_cluster_end(guest_cluster))
        else:
            content = self._cluster_content(guest_cluster, entry) if keep else b""
            host = self._allocate_data_cluster(guest_cluster)
            if keep and self.header.has_data_file:
                # The cluster in the data file is where the guest data always was: the table
                # on storage may still map it, so the copy goes in one write (crash.power-cut,
                # as for ZERO_ALLOC clusters above); the caller's data follows.
                keep = [(0, self._data_cluster_end(guest_cluster))]
            for a, b in keep:
                storage.write(content[a:b], host + a)
        self._replace_entry(guest_cluster, L2Entry(ClusterType.NORMAL, host, True),
                            data_pending=True)
        return storage, host + in_cluster, chunk

    def _data_cluster_end(self, guest_cluster: int) -> int:
        """How much of a cluster holds guest data: all of it, but in a data file only up to
        the disk end (a raw data file is exactly the disk; qcow2.data-file.raw)."""
        if self.header.has_data_file:
            return min(self._cluster_size, self._size - guest_cluster)
        return self._cluster_size

    def _ensure_subcluster_data(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        """ensure_data_mapping with extended L2 entries: allocation and copy-on-write per
        subcluster (qcow2.extended-l2.write)."""
        cs, sc_bits = self._cluster_size, self._unit_bits
        in_cluster = offset_in_cluster(offset, self._cluster_bits)
        chunk = min(length, cs - in_cluster)
        guest_cluster = offset - in_cluster
        first_sc, end_sc = in_cluster >> sc_bits, -(-(in_cluster + chunk) >> sc_bits)
        try:
            units = [self._get_unit(guest_cluster + (sc << sc_bits))
                     for sc in range(first_sc, end_sc)]
        except CorruptImageError as exc:
            # QEMU: "Invalid cluster entry found" marks the image corrupt on a write path.
            self._signal_corruption(str(exc))
        entry = self._get_l2_entry(guest_cluster)
        _, bitmap = self._raw_l2_entry(guest_cluster)
        storage = self.data_storage
        keep_old = entry.type is ClusterType.NORMAL and entry.copied
        if keep_old and all(u.type is ClusterType.NORMAL for u in units):
            # Every subcluster written is allocated in a cluster of ours: write in place.
            self._check_host_data(entry.host_offset)
            return storage, entry.host_offset + in_cluster, chunk
        cow_from, cow_to = subcluster_cow_range(
            entry, bitmap, in_cluster, in_cluster + chunk, sc_bits, keep_old=keep_old
        )
        cow_to = min(cow_to, self._data_cluster_end(guest_cluster))
        if keep_old:
            host = entry.host_offset
            self._check_host_data(host)
        else:
            host = self._allocate_data_cluster(guest_cluster)
        partial = in_cluster > cow_from or in_cluster + chunk < cow_to
        if partial or not overwrite:
            # The copy of what the guest sees now goes in one write, over the caller's range
            # too: the table on storage may still show these subclusters of our own cluster
            # as the data they held before (crash.power-cut, as for ZERO_ALLOC clusters).
            storage.write(self._guest_content(guest_cluster + cow_from, cow_to - cow_from),
                          host + cow_from)
        old_bitmap = 0 if entry.type is ClusterType.COMPRESSED else bitmap
        new_bitmap = written_bitmap(old_bitmap, cow_from >> sc_bits, -(-cow_to >> sc_bits))
        self._replace_entry(guest_cluster, L2Entry(ClusterType.NORMAL, host, True),
                            data_pending=True, bitmap=new_bitmap)
        return storage, host + in_cluster, chunk

    # -- zeroing and discarding ---------------------------------------------------------------

    def _whole_clusters(self, offset: int, length: int) -> range:
        end = min(offset + length, self._size)
        return whole_clusters(offset, end - offset, self._cluster_bits, self._size)

    def _apply(
        self, offset: int, length: int, new_entry_for: Callable[[L2Entry], L2Entry | None]
    ) -> tuple[int, int]:
        self._begin("discard/zero")
        clusters = self._whole_clusters(offset, length)
        if not clusters:
            return offset, 0
        end = min(clusters[-1] + self._cluster_size, offset + length)
        self._zero_raw_data(clusters[0], end - clusters[0])
        for guest in clusters:
            old = self._get_l2_entry(guest)
            new = new_entry_for(old)
            # An extended entry's bitmap may differ where the decoded entries are equal;
            # _replace_entry compares the raw words then.
            if new is not None and (self._extended or new != old):
                self._replace_entry(guest, new)
        return clusters[0], end - clusters[0]

    def _zero_raw_data(self, offset: int, length: int) -> None:
        """qcow2.data-file.raw: with a raw external data file, what the guest sees as
        zeros is zeros in the data file too, written before the tables say so (as QEMU's
        qcow2_cluster_zeroize zeroes s->data_file first)."""
        if self._data_file_raw:
            self.data_storage.write_zeroes(offset, min(length, self._size - offset))

    def _leave_raw(self, why: str) -> None:
        """qcow2.data-file.raw-cleared: the raw external data bit is cleared (on storage,
        before the change that breaks it) once the data file no longer reads as the disk."""
        if self._data_file_raw:
            flags = self.header.autoclear_features & ~QCOW2_AUTOCLEAR_DATA_FILE_RAW
            self._write_field("autoclear_features", ">Q", flags)
            self.header = replace(self.header, autoclear_features=flags)
            self._data_file_raw = False

    def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """access.write-zeroes.no-free: v3 keeps host clusters, flagging them zero."""
        self._begin("write_zeroes")
        if self.header.version < 3:
            return self._v2_unallocated_run(offset, length)

        if self._extended:
            return self._zero_subclusters(offset, length)

        def rule(old: L2Entry) -> L2Entry | None:
            if old.type is ClusterType.NORMAL and old.copied:
                return L2Entry(ClusterType.ZERO_ALLOC, old.host_offset, True)
            if old.type is ClusterType.ZERO_ALLOC:
                return old
            return _ZERO_PLAIN

        return self._apply(offset, length, rule)

    def _zero_subclusters(self, offset: int, length: int) -> tuple[int, int]:
        """qcow2.extended-l2.clear: whole clusters get an all-zero bitmap (keeping their host
        cluster; a compressed one is freed), partial ones the zero bits of the whole
        subclusters in range (QEMU's zero_in_l2_slice and zero_l2_subclusters); a partial
        compressed cluster cannot be zeroed so (the caller writes zeroes there)."""
        sc_bits, cs = self._unit_bits, self._cluster_size
        units = whole_clusters(offset, min(offset + length, self._size) - offset, sc_bits,
                               self._size)
        if not units:
            return offset, 0
        pos, stop = units[0], min(units[-1] + (1 << sc_bits), offset + length, self._size)
        self._zero_raw_data(pos, stop - pos)
        done_from: int | None = None
        while pos < stop:
            guest_cluster = pos - offset_in_cluster(pos, self._cluster_bits)
            c_end = min(guest_cluster + cs, stop)
            entry = self._get_l2_entry(guest_cluster)
            if pos == guest_cluster and c_end in (guest_cluster + cs, self._size):
                if entry.type is ClusterType.NORMAL:
                    self._replace_entry(guest_cluster, L2Entry(
                        ClusterType.ZERO_ALLOC, entry.host_offset, entry.copied))
                else:
                    self._replace_entry(guest_cluster, _ZERO_PLAIN)
            elif entry.type is ClusterType.COMPRESSED:
                if done_from is None:
                    pos = c_end
                    continue
                break
            else:
                _, bitmap = self._raw_l2_entry(guest_cluster)
                first_sc = offset_in_cluster(pos, self._cluster_bits) >> sc_bits
                end_sc = -(-(c_end - guest_cluster) >> sc_bits)
                self._replace_entry(guest_cluster, entry,
                                    bitmap=zeroed_bitmap(bitmap, first_sc, end_sc))
            if done_from is None:
                done_from = pos
            pos = c_end
        if done_from is None:
            return offset, 0
        return done_from, pos - done_from

    def _v2_unallocated_run(self, offset: int, length: int) -> tuple[int, int]:
        # v2 without a backing file: unallocated clusters already read as zero; allocated ones
        # can only be zeroed by writing, which the caller does.
        if self._backing is not None:
            return offset, 0
        clusters = self._whole_clusters(offset, length)
        start = None
        for guest in clusters:
            unallocated = self._get_l2_entry(guest).type is ClusterType.UNALLOCATED
            if unallocated and start is None:
                start = guest
            elif not unallocated and start is not None:
                return start, guest - start
        if start is None:
            return offset, 0
        end = min(clusters[-1] + self._cluster_size, offset + length, self._size)
        return start, end - start

    def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        self._begin("discard_to_zero")
        if self.header.version < 3:
            if self._backing is not None:
                return offset, 0
            return self._apply(offset, length, lambda old: _UNALLOCATED)
        return self._apply(offset, length, lambda old: _ZERO_PLAIN)

    def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        self._begin("discard_to_any")
        return self.discard_to_backing(offset, length)

    def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        self._begin("discard_to_backing")
        if self._backing is not None and self._whole_clusters(offset, length):
            # Unallocated clusters now show the backing image, not the data file's zeroes.
            self._leave_raw("a discard shows the backing image")
        return self._apply(offset, length, lambda old: _UNALLOCATED)

    # -- resize -------------------------------------------------------------------------------

    def _check_new_size(self, new_size: int) -> None:
        # qcow2.header.size-512: QEMU only handles qcow2 sizes in whole 512-byte sectors.
        if new_size % 512:
            raise InvalidRequestError(
                f"{self}: qcow2 disk size {new_size} is not a multiple of 512"
            )
        needed = required_l1_size(new_size, self._cluster_bits, self._entry_bytes)
        if needed * 8 > 0x2000000:
            raise InvalidRequestError(f"{self}: disk size {new_size} needs too large an L1 table")
        if self.header.version < 3 and self.header.nb_snapshots:
            # qcow2.snapshots.v2-no-resize: qcow2_co_truncate, "Can't resize a v2 image which
            # has snapshots".
            raise UnsupportedError(f"{self}: a v2 image with snapshots cannot be resized")

    def _grow_l1(self, new_l1_size: int) -> None:
        """qcow2.l1.growth: a new, larger L1 table is written, then the header switched to it,
        then the old one freed."""
        cs = self._cluster_size
        clusters = -(-new_l1_size * 8 // cs)
        new_offset = self._allocator.allocate(clusters)
        entries = self._l1 + [0] * (clusters * cs // 8 - len(self._l1))
        self._storage.write(struct.pack(f">{len(entries)}Q", *entries), new_offset)
        old_offset, old_size = self._l1_offset, self._l1_size
        self._write_field("l1_size", ">IQ", new_l1_size, new_offset)
        self._l1_offset, self._l1_size = new_offset, new_l1_size
        self._l1 = entries[:new_l1_size]
        if old_size:
            self._allocator.free(old_offset, -(-old_size * 8 // cs))

    def _set_size(self, new_size: int) -> None:
        self._write_field("size", ">Q", new_size)
        self._size = new_size

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        self._begin("resize_grow")
        self._check_new_size(new_size)
        old_size = self._size
        if new_size <= old_size:
            return
        if self._data_file_raw and prealloc is PreallocateMode.NONE:
            # qcow2.data-file.raw: as qemu-img, a raw data file is mapped whole
            # (preallocation=metadata), so that the tables read as the data file does.
            prealloc = PreallocateMode.FORMAT_ALLOCATE
        if self.header.has_data_file:
            # qcow2.data-file.resize: the data file grows with the disk (as QEMU grows it).
            self.data_storage.resize(new_size, prealloc if prealloc in (
                PreallocateMode.FULL_ALLOCATE, PreallocateMode.WRITE_DATA)
                else PreallocateMode.NONE)
        needed = required_l1_size(new_size, self._cluster_bits, self._entry_bytes)
        if needed > self._l1_size:
            self._grow_l1(needed)
        # crash.order.grow-size-last: "Growing prepares the whole new area first [...] and
        # writes the new size into the header last".  The new size holds in memory only, so
        # that the preparation may map clusters past the old end.
        self._size = new_size
        try:
            self._prepare_grown_area(old_size, new_size, prealloc)
            self._settle()
            self._l2.flush()
        except BaseException:
            self._size = old_size
            raise
        self._set_size(new_size)

    def _prepare_grown_area(self, old_size: int, new_size: int,
                            prealloc: PreallocateMode) -> None:
        if prealloc is PreallocateMode.NONE:
            return
        # access.resize.grow-zero: the partial cluster at the old end may hold stale data from
        # before a shrink; it is zeroed through the normal data path.
        cs = self._cluster_size
        head_end = min(-(-old_size // cs) * cs, new_size)
        if head_end > old_size and not self._reads_zero(old_size - old_size % cs):
            storage, host, n = self.ensure_data_mapping(old_size, head_end - old_size, True)
            storage.write_zeroes(host, n)
        whole = range(head_end, new_size, cs)
        if prealloc is PreallocateMode.ZERO:
            self._zero_new_clusters(whole)
        else:
            self._preallocate(whole, prealloc)

    def _reads_zero(self, guest_cluster: int) -> bool:
        end = min(guest_cluster + self._cluster_size, self._size)
        for unit in range(guest_cluster, end, 1 << self._unit_bits):
            t = self._get_unit(unit).type
            if t not in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC) and not (
                t is ClusterType.UNALLOCATED and self._backing is None
            ):
                return False
        return True

    def _zero_new_clusters(self, clusters: range) -> None:
        for guest in clusters:
            if self.header.version >= 3:
                self._replace_entry(guest, _ZERO_PLAIN)
            elif self._backing is None:
                self._replace_entry(guest, _UNALLOCATED)
            else:
                storage, host, n = self.ensure_data_mapping(guest, self._cluster_size, True)
                storage.write_zeroes(host, n)

    def _preallocate(self, clusters: range, prealloc: PreallocateMode) -> None:
        """Map every new cluster to a host cluster that reads as zero, as QEMU does for
        preallocation=metadata/falloc/full (plain data clusters, not zero clusters)."""
        if not clusters:
            return
        cs = self._cluster_size
        if self.header.has_data_file:
            # qcow2.data-file.offsets: each cluster maps its own place in the data file,
            # which resize_grow extended (zeroes past its old end).
            for guest in clusters:
                self._replace_entry(guest, L2Entry(ClusterType.NORMAL, guest, True))
            return
        first_host = self._allocator.allocate(len(clusters))
        if first_host < self._storage.size():
            # Reused clusters may hold stale data; fresh ones past the end of the storage read
            # as zero once the storage is extended below.
            self._storage.write_zeroes(first_host, len(clusters) * cs)
        host_end = first_host + len(clusters) * cs
        if self._storage.size() < host_end:
            # FORMAT_ALLOCATE maps clusters without allocating them on storage (sparse).
            storage_mode = (
                PreallocateMode.NONE if prealloc is PreallocateMode.FORMAT_ALLOCATE else prealloc
            )
            self._storage.resize(host_end, storage_mode)
        for i, guest in enumerate(clusters):
            self._replace_entry(guest, L2Entry(ClusterType.NORMAL, first_host + i * cs, True))

    def resize_shrink(self, new_size: int) -> None:
        self._begin("resize_shrink")
        self._check_new_size(new_size)
        if new_size >= self._size:
            return
        cs = self._cluster_size
        # access.resize.shrink-discards: clusters wholly past the new end are freed.
        first_gone = -(-new_size // cs) * cs
        for guest in self._mapped_clusters(first_gone, self._size):
            if self._extended or self._get_l2_entry(guest).type is not ClusterType.UNALLOCATED:
                self._replace_entry(guest, _UNALLOCATED)
        # L2 tables wholly past the new end are unhooked and freed, as QEMU does.
        keep = required_l1_size(new_size, self._cluster_bits, self._entry_bytes)
        for l1_idx in range(keep, self._l1_size):
            l2_offset = self._l1[l1_idx] & L1E_OFFSET_MASK
            if l2_offset:
                self._set_l1_entry(l1_idx, 0)
                self._l2.drop(l2_offset)
                self._allocator.free(l2_offset)
        self._set_size(new_size)
        if self.header.has_data_file:
            # qcow2.data-file.resize: the data file shrinks with the disk, after the tables
            # stopped mapping what it loses (as QEMU shrinks it).
            self._settle()
            self._l2.flush()
            self.data_storage.resize(new_size)

    def _mapped_clusters(self, start: int, end: int) -> Iterator[int]:
        """Guest cluster offsets in [start, end) whose L1 entry has an L2 table."""
        cs = self._cluster_size
        per_table = self._l2_entries * cs
        guest = start
        while guest < end:
            l1_idx = l1_index(guest, self._cluster_bits)
            table_end = (l1_idx + 1) * per_table
            if l1_idx < self._l1_size and self._l1[l1_idx] & L1E_OFFSET_MASK:
                yield from range(guest, min(end, table_end), cs)
            guest = table_end

    # -- caches and lifetime ------------------------------------------------------------------

    def flush(self) -> None:
        if self._writable and not self._corrupt:
            self._settle()
            self._l2.flush()
        # qcow2.data-file.write: "flush() and sync() flush the data file before the qcow2
        # file" (the data before the entries that map it).
        if self._data_storage is not None:
            self._data_storage.flush()
        self._storage.flush()

    def sync(self) -> None:
        if self._data_storage is not None:
            self._data_storage.sync()
        self._storage.sync()

    def invalidate_cache(self) -> None:
        self._l2.clear()
        # Refcount drops that waited for entries now lost: the clusters leak, never corrupt.
        self._pending_frees.clear()
        self._refcounts.invalidate_cache()
        self._l1 = self._load_l1()
        self._storage.invalidate_cache()

    def close(self) -> None:
        try:
            self._storage.close()
        finally:
            try:
                self.close_data_file()
            finally:
                if self._backing is not None and self._own_backing:
                    self._backing.close()

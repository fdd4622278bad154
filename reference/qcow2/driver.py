"""The qcow2 format driver of the reference implementation.

Plain and direct: one guest cluster per mapping, L1 table and refcounts written through, and
a small write-back cache of L2 tables (so that ``flush`` has something to do and cache
eviction is a real code path).  Comments cite the clause IDs of specs/.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .._errors import CorruptImageError, InvalidRequestError, ReadOnlyError
from .._info import ImageInfo, Qcow2Info
from .._snapshot import SnapshotInfo
from .._storage import Storage
from .allocation import ClusterAllocator
from .bitmaps import autoclear_for_writing
from .compressed_write import CompressedWrites
from .constants import (
    COMPRESSION_TYPES,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_INCOMPAT_EXTL2,
    QCOW_MAX_L1_SIZE,
    V2_HEADER_LENGTH,
)
from .data_file import DataFileWrites, data_file_name
from .dirty import repair_if_dirty
from .extensions import HeaderExtension, backing_format, feature_names, parse_extensions
from .features import check_features
from .guard import MetadataGuard
from .header import QCowHeader, l2_entries, parse_header
from .l2cache import L2Cache
from .lifetime import CachesAndLifetime
from .mappings import Mappings
from .overlap import MetadataRegion, snapshot_regions
from .refcounts import RefcountTable
from .resize import Resize
from .snapshot_write import SnapshotWrites
from .snapshots import SnapshotEntry, find_snapshot, read_snapshot_table
from .subcluster_write import SubclusterWrites
from .table_entries import TableEntries
from .zero_discard import ZeroAndDiscard

if TYPE_CHECKING:
    from ..access import FormatAccess

__all__ = ["DEFAULT_L2_CACHE_TABLES", "Qcow2Driver"]

#: L2 tables the reference keeps in memory; small on purpose, so eviction happens in tests.
DEFAULT_L2_CACHE_TABLES = 16

class Qcow2Driver(TableEntries, Mappings, ZeroAndDiscard, Resize, CachesAndLifetime,
                  MetadataGuard, CompressedWrites, SnapshotWrites, SubclusterWrites,
                  DataFileWrites):
    """A qcow2 image (v2 or v3) on a storage, optionally over a backing ``FormatAccess``.

    This class opens the image and holds its state; each mixin is one area of the spec:
    ``TableEntries`` (L1/L2 lookup and replacement), ``Mappings`` (reads, data mappings),
    ``ZeroAndDiscard``, ``Resize``, ``CachesAndLifetime`` (flush, sync, close),
    ``MetadataGuard`` (overlap checks, corrupt bit), and the writes of compressed clusters,
    snapshots, subclusters and external data files.
    """

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

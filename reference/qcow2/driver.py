"""The qcow2 format driver of the reference implementation.

Plain and direct: one guest cluster per mapping, L1 table and refcounts written through, and
a small write-back cache of L2 tables (so that ``flush`` has something to do and cache
eviction is a real code path).  Comments cite the clause IDs of specs/.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from .._errors import (
    CorruptImageError,
    InvalidRequestError,
    ReadOnlyError,
    UnsupportedError,
)
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
from .compression import decompress_cluster
from .constants import (
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    V2_HEADER_LENGTH,
)
from .data_file import data_file_name
from .extensions import HeaderExtension, backing_format, feature_names, parse_extensions
from .features import check_features
from .header import FIELD_OFFSETS, QCowHeader, l2_entries, parse_header, required_l1_size
from .refcounts import RefcountTable
from .snapshots import SnapshotEntry, find_snapshot, parse_snapshot_table
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


class Qcow2Driver:
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
        self._l2_cache: OrderedDict[int, list[int]] = OrderedDict()
        self._dirty_l2: set[int] = set()

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
        if writable:
            self._allocator.attach(self._refcounts)
            if header.version >= 3 and header.autoclear_features:
                # qcow2.features.autoclear-clear: "An implementation may only write to an image
                # with unknown auto-clear features if it clears the respective bits from this
                # field first."  We maintain no bitmaps either, so bit 0 goes too.
                self._write_field("autoclear_features", ">Q", 0)

    # -- opening helpers ----------------------------------------------------------------------

    def _check_metadata_range(
        self, what: str, offset: int, length: int, *, check_overlap: bool = True
    ) -> None:
        """qcow2.metadata.*: metadata must be cluster-aligned, inside the file, not overlap."""
        if length == 0:
            return
        if offset % self._cluster_size:
            raise CorruptImageError(f"qcow2 {what} offset 0x{offset:x} is not cluster-aligned")
        if offset >= self._storage.size():
            raise CorruptImageError(
                f"qcow2 {what} at offset 0x{offset:x} lies wholly outside the image file "
                f"({self._storage.size()} bytes)"
            )
        if offset < self._cluster_size:
            raise CorruptImageError(f"qcow2 {what} at offset 0x{offset:x} overlaps the header")
        if check_overlap:
            for name, start, size in self._fixed_metadata():
                if start < offset + length and offset < start + size:
                    raise CorruptImageError(
                        f"qcow2 {what} at offset 0x{offset:x} overlaps the {name} "
                        f"(0x{start:x}+{size})"
                    )

    def _check_snapshot_table(self) -> None:
        # qcow2.snapshots.table: only the active L1 table is read, but a snapshot table that
        # lies outside the file is corruption all the same.
        h = self.header
        if h.nb_snapshots:
            self._check_metadata_range("snapshot table", h.snapshots_offset, 1,
                                       check_overlap=False)

    def _snapshots(self) -> list[SnapshotEntry]:
        if self._snapshot_entries is None:
            h = self.header
            self._snapshot_entries = (
                parse_snapshot_table(self._storage, h.snapshots_offset, h.nb_snapshots, h.size)
                if h.nb_snapshots else []
            )
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

    def _l2_table_offsets(self) -> set[int]:
        return {e & L1E_OFFSET_MASK for e in self._l1} - {0}

    def _fixed_metadata_at(self, host: int) -> str | None:
        """The fixed metadata structure the cluster at ``host`` overlaps, if any."""
        for name, start, size in self._fixed_metadata():
            if start < host + self._cluster_size and host < start + size:
                return name
        return None

    def _fixed_metadata(self) -> list[tuple[str, int, int]]:
        return [
            ("header", 0, self._cluster_size),
            ("L1 table", self._l1_offset, self._l1_size * 8),
            (
                "refcount table",
                self._refcounts.table_offset,
                self._refcounts.table_clusters * self._cluster_size,
            ),
        ]

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

    # -- header updates -----------------------------------------------------------------------

    def _write_field(self, name: str, fmt: str, *values: int) -> None:
        self._storage.write(struct.pack(fmt, *values), FIELD_OFFSETS[name])

    def _write_refcount_table_pointer(self, offset: int, clusters: int) -> None:
        # Offset and cluster count are adjacent (bytes 48-59): one write switches both.
        self._write_field("refcount_table_offset", ">QI", offset, clusters)

    # -- L2 tables ----------------------------------------------------------------------------

    def _l2_table_offset(self, l1_idx: int) -> int:
        entry = decode_l1_entry(self._l1[l1_idx], self._cluster_size)
        if entry.l2_offset:
            self._check_metadata_range("L2 table", entry.l2_offset, self._cluster_size)
        return entry.l2_offset

    def _load_l2(self, l2_offset: int) -> list[int]:
        table = self._l2_cache.get(l2_offset)
        if table is not None:
            self._l2_cache.move_to_end(l2_offset)
            return table
        raw = self._storage.read(l2_offset, self._cluster_size)
        table = [v for (v,) in struct.iter_unpack(">Q", raw)]
        self._l2_cache[l2_offset] = table
        self._evict_l2()
        return table

    def _evict_l2(self) -> None:
        while len(self._l2_cache) > self._l2_cache_tables:
            offset, table = self._l2_cache.popitem(last=False)
            if offset in self._dirty_l2:
                self._write_l2(offset, table)

    def _write_l2(self, offset: int, table: list[int]) -> None:
        self._storage.write(struct.pack(f">{len(table)}Q", *table), offset)
        self._dirty_l2.discard(offset)

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
        l1_idx = l1_index(guest_offset, self._cluster_bits)
        entry = decode_l1_entry(self._l1[l1_idx], self._cluster_size)
        if entry.l2_offset and entry.copied:
            self._check_metadata_range("L2 table", entry.l2_offset, self._cluster_size)
            return entry.l2_offset, self._load_l2(entry.l2_offset)
        if entry.l2_offset:
            # qcow2.l2.cow-shared: an L2 table with refcount > 1 (COPIED clear) is shared with a
            # snapshot and must be copied before it is changed.
            self._check_metadata_range("L2 table", entry.l2_offset, self._cluster_size)
            table = list(self._load_l2(entry.l2_offset))
        else:
            table = [0] * self._l2_entries
        new_offset = self._allocator.allocate(1)
        # The new table reaches storage before the L1 entry that points to it.
        self._write_l2(new_offset, table)
        self._l2_cache[new_offset] = table
        self._evict_l2()
        self._set_l1_entry(l1_idx, new_offset | QCOW_OFLAG_COPIED)
        if entry.l2_offset:
            self._l2_cache.pop(entry.l2_offset, None)
            self._dirty_l2.discard(entry.l2_offset)
            self._allocator.free(entry.l2_offset)
        return new_offset, self._load_l2(new_offset)

    def _set_l1_entry(self, l1_idx: int, raw: int) -> None:
        self._l1[l1_idx] = raw
        self._storage.write(struct.pack(">Q", raw), self._l1_offset + 8 * l1_idx)

    def _set_l2_entry(self, guest_offset: int, entry: L2Entry, *, write_through: bool) -> None:
        """Change one L2 entry; ``write_through`` when a refcount drop follows, so that the
        entry no longer points at a cluster by the time it may be reused
        (qcow2.refcount.order-of-updates)."""
        l2_offset, table = self._writable_l2(guest_offset)
        table[l2_index(guest_offset, self._cluster_bits)] = encode_l2_entry(
            entry, self._cluster_bits
        )
        self._dirty_l2.add(l2_offset)
        if write_through:
            self._write_l2(l2_offset, table)

    def _held_clusters(self, entry: L2Entry) -> range:
        """Host cluster offsets whose refcount counts this entry."""
        cs = self._cluster_size
        if entry.type in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            return range(entry.host_offset, entry.host_offset + cs, cs)
        if entry.type is ClusterType.COMPRESSED:
            # The compressed data may straddle host clusters; each one it touches was counted.
            first = entry.host_offset - entry.host_offset % cs
            return range(first, entry.host_offset + entry.compressed_length, cs)
        return range(0)

    def _replace_entry(self, guest_offset: int, new: L2Entry) -> None:
        old = self._get_l2_entry(guest_offset)
        held = self._held_clusters(old)
        releases = bool(held) and not (new.host_offset and new.host_offset == old.host_offset)
        if releases:
            # Validate before anything changes: a hostile entry must not make us free the
            # image's own metadata, or a cluster nobody holds.
            for host in held:
                self._check_data_cluster(host, what="freeing", in_file=False)
                if self._allocator.refcount(host) == 0:
                    raise CorruptImageError(
                        f"qcow2 L2 entry for guest offset {guest_offset} refers to host cluster "
                        f"0x{host:x} whose refcount is 0"
                    )
        self._set_l2_entry(guest_offset, new, write_through=releases)
        if releases:
            for host in held:
                self._allocator.free(host)

    # -- mappings -----------------------------------------------------------------------------

    def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
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
                return RawMapping(self.data_storage, entry.host_offset + in_cluster, False)
            writable = (
                self._writable
                and entry.copied
                and entry.host_offset < self._storage.size()
                and self._fixed_metadata_at(entry.host_offset) is None
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

    def _require_writable(self, op: str) -> None:
        if not self._writable:
            raise ReadOnlyError(f"{op}: {self} is read-only")

    def _cluster_content(self, guest_cluster: int, entry: L2Entry) -> bytes:
        """What the guest currently sees in a whole cluster (the source of copy-on-write)."""
        t = entry.type
        if t is ClusterType.NORMAL:
            return self._storage.read(entry.host_offset, self._cluster_size)
        if t is ClusterType.COMPRESSED:
            return self._read_compressed(entry)
        if t is ClusterType.UNALLOCATED and self._backing is not None:
            return self._backing.read(guest_cluster, self._cluster_size)
        return bytes(self._cluster_size)

    def ensure_data_mapping(
        self, offset: int, length: int, overwrite: bool
    ) -> tuple[Storage, int, int]:
        self._require_writable("ensure_data_mapping")
        if offset >= self._size:
            raise InvalidRequestError(f"{self}: offset {offset} is past the disk end")
        in_cluster = offset_in_cluster(offset, self._cluster_bits)
        chunk = min(length, self._cluster_size - in_cluster)
        guest_cluster = offset - in_cluster
        entry = self._get_l2_entry(offset)
        if entry.type is ClusterType.NORMAL and entry.copied:
            self._check_data_cluster(entry.host_offset)
            return self._storage, entry.host_offset + in_cluster, chunk
        # access.cow.partial-cluster: everything of the cluster the caller does not overwrite is
        # copied from what the guest sees now (backing, compressed data, zeroes).
        keep = [(0, self._cluster_size)]
        if overwrite:
            keep = [(0, in_cluster), (in_cluster + chunk, self._cluster_size)]
        keep = [(a, b) for a, b in keep if b > a]
        if entry.type is ClusterType.ZERO_ALLOC and entry.copied:
            host = entry.host_offset
            self._check_data_cluster(host)
            for a, b in keep:
                self._storage.write_zeroes(host + a, b - a)
        else:
            content = self._cluster_content(guest_cluster, entry) if keep else b""
            host = self._allocator.allocate(1)
            for a, b in keep:
                self._storage.write(content[a:b], host + a)
        self._replace_entry(guest_cluster, L2Entry(ClusterType.NORMAL, host, True))
        return self._storage, host + in_cluster, chunk

    def _check_data_cluster(
        self, host: int, *, what: str = "writing", in_file: bool = True
    ) -> None:
        """qcow2.metadata.overlap / outside-file: a data cluster we are about to write (or
        free) must lie in the image file and must not overlap the header, L1 or refcount
        table."""
        if in_file and host >= self._storage.size():
            raise CorruptImageError(
                f"qcow2 data cluster 0x{host:x} lies wholly outside the image file "
                f"({self._storage.size()} bytes): refusing {what} it"
            )
        name = self._fixed_metadata_at(host)
        if name is not None:
            raise CorruptImageError(
                f"qcow2 data cluster 0x{host:x} overlaps the {name}: refusing {what} it"
            )
        if host in self._l2_table_offsets() or host in self._refcounts.block_offsets():
            raise CorruptImageError(
                f"qcow2 data cluster 0x{host:x} is also an L2 table or refcount block: "
                f"refusing {what} it"
            )

    # -- zeroing and discarding ---------------------------------------------------------------

    def _whole_clusters(self, offset: int, length: int) -> range:
        end = min(offset + length, self._size)
        return whole_clusters(offset, end - offset, self._cluster_bits, self._size)

    def _apply(
        self, offset: int, length: int, new_entry_for: Callable[[L2Entry], L2Entry | None]
    ) -> tuple[int, int]:
        self._require_writable("discard/zero")
        clusters = self._whole_clusters(offset, length)
        if not clusters:
            return offset, 0
        for guest in clusters:
            old = self._get_l2_entry(guest)
            new = new_entry_for(old)
            if new is not None and new != old:
                self._replace_entry(guest, new)
        end = min(clusters[-1] + self._cluster_size, offset + length)
        return clusters[0], end - clusters[0]

    def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """access.write-zeroes.no-free: v3 keeps host clusters, flagging them zero."""
        self._require_writable("write_zeroes")
        if self.header.version < 3:
            return self._v2_unallocated_run(offset, length)

        def rule(old: L2Entry) -> L2Entry | None:
            if old.type is ClusterType.NORMAL and old.copied:
                return L2Entry(ClusterType.ZERO_ALLOC, old.host_offset, True)
            if old.type is ClusterType.ZERO_ALLOC:
                return old
            return _ZERO_PLAIN

        return self._apply(offset, length, rule)

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
        self._require_writable("discard_to_zero")
        if self.header.version < 3:
            if self._backing is not None:
                return offset, 0
            return self._apply(offset, length, lambda old: _UNALLOCATED)
        return self._apply(offset, length, lambda old: _ZERO_PLAIN)

    def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        self._require_writable("discard_to_any")
        return self._apply(offset, length, lambda old: _UNALLOCATED)

    def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        self._require_writable("discard_to_backing")
        return self._apply(offset, length, lambda old: _UNALLOCATED)

    # -- resize -------------------------------------------------------------------------------

    def _check_new_size(self, new_size: int) -> None:
        # qcow2.header.size-512: QEMU only handles qcow2 sizes in whole 512-byte sectors.
        if new_size % 512:
            raise InvalidRequestError(
                f"{self}: qcow2 disk size {new_size} is not a multiple of 512"
            )
        needed = required_l1_size(new_size, self._cluster_bits)
        if needed * 8 > 0x2000000:
            raise InvalidRequestError(f"{self}: disk size {new_size} needs too large an L1 table")

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
        self._require_writable("resize_grow")
        self._check_new_size(new_size)
        old_size = self._size
        if new_size <= old_size:
            return
        needed = required_l1_size(new_size, self._cluster_bits)
        if needed > self._l1_size:
            self._grow_l1(needed)
        self._set_size(new_size)
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
        t = self._get_l2_entry(guest_cluster).type
        if t in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            return True
        return t is ClusterType.UNALLOCATED and self._backing is None

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
        self._require_writable("resize_shrink")
        self._check_new_size(new_size)
        if new_size >= self._size:
            return
        cs = self._cluster_size
        # access.resize.shrink-discards: clusters wholly past the new end are freed.
        first_gone = -(-new_size // cs) * cs
        for guest in self._mapped_clusters(first_gone, self._size):
            if self._get_l2_entry(guest).type is not ClusterType.UNALLOCATED:
                self._replace_entry(guest, _UNALLOCATED)
        # L2 tables wholly past the new end are unhooked and freed, as QEMU does.
        keep = required_l1_size(new_size, self._cluster_bits)
        for l1_idx in range(keep, self._l1_size):
            l2_offset = self._l1[l1_idx] & L1E_OFFSET_MASK
            if l2_offset:
                self._set_l1_entry(l1_idx, 0)
                self._l2_cache.pop(l2_offset, None)
                self._dirty_l2.discard(l2_offset)
                self._allocator.free(l2_offset)
        self._set_size(new_size)

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

    def _flush_l2(self) -> None:
        for offset in sorted(self._dirty_l2):
            self._write_l2(offset, self._l2_cache[offset])

    def flush(self) -> None:
        if self._writable:
            self._flush_l2()
        self._storage.flush()

    def sync(self) -> None:
        self._storage.sync()

    def invalidate_cache(self) -> None:
        self._l2_cache.clear()
        self._dirty_l2.clear()
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

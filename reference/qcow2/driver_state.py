"""What the mixins of ``Qcow2Driver`` share, declared once.

The driver is one class split by spec area into mixins (table_entries, mappings,
zero_discard, resize, lifetime, guard, compressed_write, snapshot_write, subcluster_write,
data_file).  ``DriverState`` declares the state ``Qcow2Driver.__init__`` sets up and, for the
type checker only, the operations one mixin calls on another, each with the mixin that
defines it.  Nothing here runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .._snapshot import SnapshotInfo
    from .._storage import Storage
    from ..access import FormatAccess
    from .allocation import ClusterAllocator
    from .extensions import HeaderExtension
    from .header import QCowHeader
    from .l2cache import L2Cache
    from .overlap import MetadataRegion
    from .refcounts import RefcountTable
    from .snapshots import SnapshotEntry
    from .tables import L2Entry

__all__ = ["DriverState"]


class DriverState:
    """The open image's state (set by ``Qcow2Driver.__init__``) and the mixins' interfaces."""

    # -- the image --------------------------------------------------------------------------
    header: QCowHeader
    extensions: list[HeaderExtension]
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    snapshot: SnapshotInfo | None
    _storage: Storage
    _writable: bool
    _backing: FormatAccess | None
    _own_backing: bool
    _data_storage: Storage | None
    _own_data: bool
    #: qcow2.data-file.raw: the raw external data bit holds, and we keep it so.
    _data_file_raw: bool
    #: qcow2.corrupt.mark: set once a write would have landed on metadata.
    _corrupt: bool

    # -- geometry ---------------------------------------------------------------------------
    _cluster_bits: int
    _cluster_size: int
    _extended: bool
    _entry_bytes: int
    #: log2 of the allocation unit: the cluster, or the subcluster with extended L2 entries.
    _unit_bits: int
    _l2_entries: int
    _size: int

    # -- tables, caches, refcounts ----------------------------------------------------------
    _l1: list[int]
    _l1_offset: int
    _l1_size: int
    _l2: L2Cache
    _l2_cache_tables: int
    #: Host clusters to unreference once the pinned L2 tables are on storage.
    _pending_frees: list[int]
    _allocator: ClusterAllocator
    _refcounts: RefcountTable
    _snapshot_entries: list[SnapshotEntry] | None
    _snapshot_metadata: list[MetadataRegion]

    if TYPE_CHECKING:
        # Qcow2Driver
        @property
        def data_storage(self) -> Storage: ...
        def _snapshots(self) -> list[SnapshotEntry]: ...
        def close_data_file(self) -> None: ...

        # TableEntries
        def _load_l1(self) -> list[int]: ...
        def _begin(self, op: str) -> None: ...
        def _settle(self) -> None: ...
        def _raw_l2_entry(self, guest_offset: int) -> tuple[int, int]: ...
        def _get_l2_entry(self, guest_offset: int) -> L2Entry: ...
        def _get_unit(self, guest_offset: int) -> L2Entry: ...
        def _writable_l2(self, guest_offset: int) -> tuple[int, list[int]]: ...
        def _set_l1_entry(self, l1_idx: int, raw: int) -> None: ...
        def _held_clusters(self, entry: L2Entry) -> range: ...
        def _replace_entry(self, guest_offset: int, new: L2Entry, *,
                           data_pending: bool = False, bitmap: int | None = None) -> None: ...

        # Mappings
        def _read_compressed(self, entry: L2Entry) -> bytes: ...
        def ensure_data_mapping(self, offset: int, length: int, overwrite: bool
                                ) -> tuple[Storage, int, int]: ...

        # Resize
        def _check_new_size(self, new_size: int) -> None: ...
        def _set_size(self, new_size: int) -> None: ...
        def _write_l1_copy(self, entries: list[int]) -> int: ...
        def _free_l1(self, offset: int, l1_size: int) -> None: ...

        # MetadataGuard
        def _check_metadata_range(self, what: str, offset: int, length: int, *,
                                  check_overlap: bool = True) -> None: ...
        def _check_l2_table(self, l2_offset: int) -> None: ...
        def _check_data_cluster(self, host: int, *, what: str = "write to",
                                in_file: bool = True) -> None: ...
        def _require_writable(self, op: str) -> None: ...
        def _metadata_regions(self, offset: int, length: int
                              ) -> Iterator[MetadataRegion]: ...
        def _overlap_check(self, offset: int, length: int, what: str = "write") -> None: ...
        def _signal_corruption(self, message: str) -> NoReturn: ...
        def _write_field(self, name: str, fmt: str, *values: int) -> None: ...

        # SubclusterWrites
        def _ensure_subcluster_data(self, offset: int, length: int, overwrite: bool
                                    ) -> tuple[Storage, int, int]: ...
        def _zero_subclusters(self, offset: int, length: int) -> tuple[int, int]: ...
        def _discard_subclusters(self, offset: int, length: int, *, full: bool
                                 ) -> tuple[int, int]: ...

        # DataFileWrites
        def _allocate_data_cluster(self, guest_cluster: int) -> int: ...
        def _check_host_data(self, host: int) -> None: ...
        def _data_cluster_end(self, guest_cluster: int) -> int: ...
        def _zero_raw_data(self, offset: int, length: int) -> None: ...
        def _leave_raw(self, why: str) -> None: ...

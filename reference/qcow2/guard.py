"""The qcow2 driver's guard against metadata corruption (specs/qcow2-corrupt.toml).

Where metadata lies, whether a range overlaps it, and what happens on a hit: the image is
marked corrupt and refuses further writes, reads keep working.  A mixin of ``Qcow2Driver``
(the driver owns the state it reads: tables, refcounts, the storage).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import replace
from typing import NoReturn

from .._errors import CorruptImageError, ReadOnlyError
from .constants import L1E_OFFSET_MASK, QCOW2_INCOMPAT_CORRUPT
from .driver_state import DriverState
from .header import FIELD_OFFSETS
from .overlap import (
    ACTIVE_L1,
    ACTIVE_L2,
    HEADER,
    REFCOUNT_BLOCK,
    REFCOUNT_TABLE,
    MetadataRegion,
    first_overlap,
)

__all__ = ["MetadataGuard"]


class MetadataGuard(DriverState):
    """Overlap checks, the corrupt bit and the metadata range checks of a qcow2 image."""

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
            region = first_overlap(self._fixed_metadata(), offset, length)
            if region is not None:
                raise CorruptImageError(
                    f"qcow2 {what} at offset 0x{offset:x} overlaps the {region}"
                )

    def _check_snapshot_table(self) -> None:
        # qcow2.snapshots.table: only the active L1 table is read, but a snapshot table that
        # lies outside the file is corruption all the same.
        h = self.header
        if h.nb_snapshots:
            self._check_metadata_range("snapshot table", h.snapshots_offset, 1,
                                       check_overlap=False)

    def _fixed_metadata(self) -> list[MetadataRegion]:
        return [
            MetadataRegion(HEADER, 0, self._cluster_size),
            MetadataRegion(ACTIVE_L1, self._l1_offset, self._l1_size * 8),
            MetadataRegion(
                REFCOUNT_TABLE,
                self._refcounts.table_offset,
                self._refcounts.table_clusters * self._cluster_size,
            ),
        ]

    def _metadata_regions(self, offset: int, length: int) -> Iterator[MetadataRegion]:
        """Every metadata structure of the image (qcow2.corrupt.overlap-check) that may
        overlap ``[offset, offset + length)``, in the order overlaps are reported.

        The refcount blocks and L2 tables (one cluster each) that do not overlap the range
        are left out before any region is made: a write checks every cluster it allocates,
        and an image of small clusters has hundreds of them."""
        cs = self._cluster_size
        yield from self._fixed_metadata()
        for name, starts in (
            (REFCOUNT_BLOCK, self._refcounts.block_offsets()),
            (ACTIVE_L2, {e & L1E_OFFSET_MASK for e in self._l1} - {0}),
        ):
            # (MetadataRegion.overlaps, for a region of one cluster at ``start``)
            near = [start for start in starts if start < offset + length and offset < start + cs]
            for start in sorted(near):
                yield MetadataRegion(name, start, cs)
        yield from self._snapshot_metadata

    def _overlap_check(self, offset: int, length: int, what: str = "write") -> None:
        """qcow2.corrupt.overlap-check: "A hit raises CorruptImageError naming the offset and
        the structure it overlaps, and nothing is written."  (And marks the image corrupt.)"""
        region = first_overlap(self._metadata_regions(offset, length), offset, length)
        if region is not None:
            self._signal_corruption(
                f"qcow2 {self._storage}: preventing invalid {what} at 0x{offset:x}+{length}: "
                f"it overlaps the {region}"
            )

    def _signal_corruption(self, message: str) -> NoReturn:
        """qcow2.corrupt.mark: "a v3 image gets the corrupt bit (incompatible bit 1) set on
        storage, every later modifying operation on the open image raises
        CorruptImageError, and reads keep working."  (v2 has no such bit: the open image
        still refuses writes.)"""
        if not self._corrupt:
            self._corrupt = True
            # Whatever waited in the caches stays unwritten: leaks at worst.
            self._pending_frees.clear()
            if self.header.version >= 3:
                flags = self.header.incompatible_features | QCOW2_INCOMPAT_CORRUPT
                self._write_field("incompatible_features", ">Q", flags)
                self.header = replace(self.header, incompatible_features=flags)
        raise CorruptImageError(message + "; the image is marked corrupt, writes are refused")

    def _write_field(self, name: str, fmt: str, *values: int) -> None:
        self._storage.write(struct.pack(fmt, *values), FIELD_OFFSETS[name])

    #: The last L2 table that passed ``_check_l2_table``, with the metadata it was checked
    #: against (None: none yet).
    _l2_table_passed: tuple[int, tuple[int, ...]] | None = None

    def _check_l2_table(self, l2_offset: int) -> None:
        # Asked on every entry lookup (each cluster of a mapping), mostly of the same table:
        # the check reads only the offset, the file size and the fixed metadata, so a table
        # that passed passes again while that metadata is the same and it still starts inside
        # the file.
        fixed = (self._l1_offset, self._l1_size, self._refcounts.table_offset,
                 self._refcounts.table_clusters)
        if self._l2_table_passed == (l2_offset, fixed) and l2_offset < self._storage.size():
            return
        try:
            self._check_metadata_range("L2 table", l2_offset, self._cluster_size)
        except CorruptImageError as exc:
            if not self._writable or self._corrupt:
                raise
            # qcow2.corrupt.mark: "When a write would land on metadata (or metadata is found
            # inconsistent while writing), a v3 image gets the corrupt bit".
            self._signal_corruption(str(exc))
        self._l2_table_passed = (l2_offset, fixed)

    def _require_writable(self, op: str) -> None:
        if not self._writable:
            raise ReadOnlyError(f"{op}: {self} is read-only")
        if self._corrupt:
            # qcow2.corrupt.mark: "every later modifying operation on the open image raises
            # CorruptImageError".
            raise CorruptImageError(f"{op}: {self} is marked corrupt; writes are refused")

    def _check_data_cluster(
        self, host: int, *, what: str = "write to", in_file: bool = True
    ) -> None:
        """qcow2.metadata.outside-file / qcow2.corrupt.overlap-check: a data cluster we are
        about to write (or free) must lie in the image file and must not overlap any
        metadata."""
        if in_file and host >= self._storage.size():
            raise CorruptImageError(
                f"qcow2 data cluster 0x{host:x} lies wholly outside the image file "
                f"({self._storage.size()} bytes): refusing {what} it"
            )
        self._overlap_check(host, self._cluster_size, f"{what} data cluster")

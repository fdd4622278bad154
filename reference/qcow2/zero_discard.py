"""Zeroing and discarding with the qcow2 driver (specs/qcow2-zero.toml, access.toml).

Whole clusters of a range change their L2 entries: zero flag (v3), unallocated, or kept;
partial clusters at the ends are left to the caller, which writes zeroes through a data
mapping.  A mixin of ``Qcow2Driver``.
"""

from __future__ import annotations

from collections.abc import Callable

from .driver_state import DriverState
from .tables import UNALLOCATED, ZERO_PLAIN, ClusterType, L2Entry, whole_clusters

__all__ = ["ZeroAndDiscard"]


class ZeroAndDiscard(DriverState):
    """``ensure_zero_mapping`` and the three discards of the qcow2 driver."""

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

    def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """access.write-zeroes.no-free: v3 keeps host clusters, flagging them zero.

        imago: "Will not discard anything, which keeps existing data mappings usable, albeit
        writing to mappings that are now zeroed may have no effect."
        """
        self._begin("write_zeroes")
        # qcow2.zero.v2-none: the zero flag, "With version 2 or with extended L2 entries (see
        # the next section), this is always 0."
        if self.header.version < 3:
            return self._v2_unallocated_run(offset, length)

        if self._extended:
            return self._zero_subclusters(offset, length)

        def rule(old: L2Entry) -> L2Entry | None:
            if old.type is ClusterType.NORMAL and old.copied:
                return L2Entry(ClusterType.ZERO_ALLOC, old.host_offset, True)
            if old.type is ClusterType.ZERO_ALLOC:
                return old
            return ZERO_PLAIN

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
        """access.discard-to-zero.reads-zero: "Discard the given range, ensure it is read back
        as zeroes." (v2 with a backing file can only write zeroes: the caller does.)"""
        self._begin("discard_to_zero")
        if self.header.version < 3:
            if self._backing is not None:
                return offset, 0
            return self._apply(offset, length, lambda old: UNALLOCATED)
        if self._extended:
            return self._discard_subclusters(offset, length, full=False)
        return self._apply(offset, length, lambda old: ZERO_PLAIN)

    def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        self._begin("discard_to_any")
        return self.discard_to_backing(offset, length)

    def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        """access.discard-to-backing.visible: "Deallocate the range such that in deallocated
        blocks, the backing image's data (if one exists) will show"."""
        self._begin("discard_to_backing")
        if self._backing is not None and length >= 1 << self._unit_bits:
            # Unallocated clusters now show the backing image, not the data file's zeroes.
            self._leave_raw("a discard shows the backing image")
        if self._extended:
            return self._discard_subclusters(offset, length, full=True)
        return self._apply(offset, length, lambda old: UNALLOCATED)


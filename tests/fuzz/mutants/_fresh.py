"""A second unseen batch (issue 9): plausible single bugs in areas the first batch
(``_paths``, ``_fast``) left alone: snapshots' refcounts, L1-table growth, extended L2
subclusters (zeroing, discarding to the backing), reads through a shorter backing file, the
size a snapshot brings back.

Each is one small override of the reference's ``Qcow2Driver`` or of pyimago.fast's
``Qcow2Layer`` / ``FormatAccess``, run as the machines run either implementation (see
``_paths.reference_path_target`` and ``_fast.fast_mutant_target``).
"""

from __future__ import annotations

from typing import Any

from pyimago.fast._access import FormatAccess
from pyimago.fast._qcow2 import Qcow2Layer
from pyimago.reference import Qcow2Driver
from pyimago.reference.qcow2.subcluster_write import sub_alloc_range
from pyimago.reference.qcow2.tables import ClusterType, L2Entry

__all__: list[str] = []


# -- the reference ----------------------------------------------------------------------------


class SnapshotL2TablesUncounted(Qcow2Driver):
    """A new snapshot adds a reference to every data cluster its L1 table reaches, but not
    to the L2 tables themselves: they stay at refcount 1 while two L1 tables point at them."""

    def _update_tree_refcounts(self, l1: list[int], addend: int, set_l1: Any) -> None:
        self._mutant_skip = {l2 for _, l2, _ in self._tree(l1)} if addend > 0 else set()
        try:
            super()._update_tree_refcounts(l1, addend, set_l1)
        finally:
            self._mutant_skip = set()

    def _add_reference(self, host: int, addend: int) -> None:
        if host in getattr(self, "_mutant_skip", ()):
            return
        super()._add_reference(host, addend)


class GrownL1DropsLastEntry(Qcow2Driver):
    """A grown L1 table is filled from the old one but for its last entry (an off-by-one
    in the copy): the L2 table that entry pointed at is lost."""

    def _grow_l1(self, new_l1_size: int) -> None:
        if self._l1:
            self._l1 = [*self._l1[:-1], 0]
        super()._grow_l1(new_l1_size)


class DiscardToBackingKeepsZeroBits(Qcow2Driver):
    """Discarding the whole subclusters of part of an extended-L2 cluster to the backing
    clears their allocation bits but not their zero bits: a subcluster zeroed before still
    reads as zeroes, not as the backing."""

    def _discard_subclusters(self, offset: int, length: int, *, full: bool) -> tuple[int, int]:
        if not full:
            return super()._discard_subclusters(offset, length, full=full)
        return self._subcluster_apply(
            offset, length, lambda old: L2Entry(ClusterType.UNALLOCATED),
            lambda bitmap, first, end: bitmap & ~sub_alloc_range(first, end))


class SubclusterZeroesTakeHeadWhole(Qcow2Driver):
    """write_zeroes on an extended-L2 image marks the subcluster its range starts in as
    zero too (floor for ceiling): the bytes before the range in that subcluster are lost."""

    def _zero_subclusters(self, offset: int, length: int) -> tuple[int, int]:
        unit = 1 << self._unit_bits
        head = offset % unit
        if not head:
            return super()._zero_subclusters(offset, length)
        start, done = super()._zero_subclusters(offset - head, length + head)
        if done >= unit and start == offset - head:
            # The caller is told what the right code would have done: it writes the head
            # itself, as zeroes, over a subcluster that now reads as zeroes all through.
            return start + unit, done - unit
        return start, done


# -- pyimago.fast -----------------------------------------------------------------------------


class ShorterBackingLeftUnfilled(Qcow2Layer):
    """Reads through a backing file shorter than this layer fill only what the backing
    has: the rest of the caller's buffer keeps whatever it held (reads and copy-on-write)."""

    def _mutate(self) -> None:
        bread, backing = self._bread, self.backing
        if bread is None or backing is None:
            return

        def clipped(part: memoryview, at: int) -> None:
            size = backing.size
            n = min(len(part), max((size() if callable(size) else size) - at, 0))
            if n:
                bread(part[:n], at)

        self._bread = clipped


class ApplySnapshotKeepsSize(FormatAccess):
    """apply_snapshot brings back the snapshot's tables and writes its disk size into the
    header, but the open image goes on with the size it had until reopened."""

    def apply_snapshot(self, name_or_id: str) -> None:
        size = self._layer.size
        super().apply_snapshot(name_or_id)
        self._layer.size = size

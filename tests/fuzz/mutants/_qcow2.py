"""Mutants of the reference: its qcow2 driver, its cluster allocator and its FormatAccess.

Each mutant overrides one small piece, the way a real bug would look.  A target opens images
with the reference and turns every qcow2 driver of the chain (and, for access mutants, the
top's FormatAccess) into the mutant, keeping its state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pyimago.oracle import DriverTarget
from pyimago.reference import (
    EofMapping,
    FormatAccess,
    PreallocateMode,
    Qcow2Driver,
    RawMapping,
    ShallowMapping,
    WritableBuffer,
    ZeroMapping,
    create_image,
    open_image,
)
from pyimago.reference.access import check_range
from pyimago.reference.qcow2.allocation import ClusterAllocator
from pyimago.reference.qcow2.tables import (
    ClusterType,
    L2Entry,
    l1_index,
    l2_index,
    offset_in_cluster,
)

# -- qcow2 driver mutants -----------------------------------------------------------------
# (and those the oracle's state machine must catch too, in _reference.py)


class ZeroFlagIgnoredOnRead(Qcow2Driver):
    """A zero cluster that keeps its host cluster (v3 write_zeroes over data) is read from
    that host cluster: the old data shows again."""

    def _mapping_for(self, entry: L2Entry, offset: int, in_cluster: int) -> ShallowMapping:
        if entry.type is ClusterType.ZERO_ALLOC:
            return RawMapping(self.storage, entry.host_offset + in_cluster, False)
        return super()._mapping_for(entry, offset, in_cluster)


class ClusterEndOffByOne(Qcow2Driver):
    """Discards and zeroing take a range ending one byte short of a cluster boundary as
    covering that cluster whole (``<=`` for ``<``): its last byte is lost."""

    def _whole_clusters(self, offset: int, length: int) -> range:
        end = min(offset + length, self.size)
        if end < self.size and (end + 1) % self.cluster_size == 0:
            length += 1
        return super()._whole_clusters(offset, length)


class NoRefcountAllocator(ClusterAllocator):
    """Hands out single clusters without raising their refcount."""

    def allocate(self, n: int = 1) -> int:
        if n != 1:
            return super().allocate(n)
        first = self._find_free_cluster()
        if first is None:
            first = self.bump(1)
        return first << self._cluster_bits


class RefcountNotRaised(Qcow2Driver):
    """A newly allocated cluster (data or L2 table) keeps refcount 0."""

    def _mutate(self) -> None:
        self._allocator.__class__ = NoRefcountAllocator


class CopiedFlagWrong(Qcow2Driver):
    """Data clusters are mapped without the COPIED flag although their refcount is 1 (only
    ``qemu-img check`` sees it: reads are right, writes just copy needlessly)."""

    def _replace_entry(self, guest_offset: int, new: L2Entry, *, data_pending: bool = False,
                       bitmap: int | None = None) -> None:
        if new.type is ClusterType.NORMAL and new.copied:
            new = L2Entry(ClusterType.NORMAL, new.host_offset, False)
        super()._replace_entry(guest_offset, new, data_pending=data_pending, bitmap=bitmap)


class CompressedReadWrongOffset(Qcow2Driver):
    """A read inside a compressed cluster returns data from the cluster's start."""

    def readv_special(self, buffers: Sequence[WritableBuffer], offset: int) -> None:
        bits = self.cluster_size.bit_length() - 1
        super().readv_special(buffers, offset - offset_in_cluster(offset, bits))


class ResizeIgnoresPrealloc(Qcow2Driver):
    """A grow ignores the preallocation mode: the new area is left unallocated."""

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        super().resize_grow(new_size, PreallocateMode.NONE)


class FlushDropsL2(Qcow2Driver):
    """flush does not write the cached L2 tables back (only eviction does)."""

    def flush(self) -> None:
        self._storage.flush()


class ZeroFlagInReservedBit(Qcow2Driver):
    """Plain zero clusters are written with bit 1 (reserved) instead of bit 0, and read back
    the same way: the driver's own reads are right, any other reader rejects the image.  Only
    the differential read-back (or qemu-img check on file chains) sees it."""

    _WRONG_ZERO = 1 << 1

    def _set_l2_entry(
        self, guest_offset: int, entry: L2Entry, *, write_through: bool, pinned: bool = False,
        bitmap: int | None = None,
    ) -> None:
        if entry.type is not ClusterType.ZERO_PLAIN:
            super()._set_l2_entry(guest_offset, entry, write_through=write_through,
                                  pinned=pinned, bitmap=bitmap)
            return
        l2_offset, table = self._writable_l2(guest_offset)
        table[l2_index(guest_offset, self._cluster_bits)] = self._WRONG_ZERO
        self._l2.mark_dirty(l2_offset, pinned=pinned)
        if write_through:
            self._l2.write(l2_offset)

    def _get_l2_entry(self, guest_offset: int) -> L2Entry:
        l1_idx = l1_index(guest_offset, self._cluster_bits)
        if l1_idx < self._l1_size:
            l2_offset = self._l2_table_offset(l1_idx)
            if l2_offset:
                raw = self._load_l2(l2_offset)[l2_index(guest_offset, self._cluster_bits)]
                if raw == self._WRONG_ZERO:
                    return L2Entry(ClusterType.ZERO_PLAIN)
        return super()._get_l2_entry(guest_offset)


# -- FormatAccess mutants -------------------------------------------------------------------


class PartialPastEndAccess(FormatAccess):
    """A write running past the disk end writes what fits before it is rejected."""

    def write(self, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        if 0 <= offset < self.size < offset + len(view):
            super().write(view[: self.size - offset], offset)
        super().write(view, offset)


class EofOnLowerLayerAccess(FormatAccess):
    """Past the end of a shorter backing, get_mapping reports EOF (the lower layer's) instead
    of unallocated zeroes."""

    def get_mapping(self, offset: int, max_length: int) -> Any:
        mapping, length = super().get_mapping(offset, max_length)
        if isinstance(mapping, ZeroMapping) and not mapping.explicit:
            backing = getattr(self.driver, "backing", None)
            if backing is not None and offset >= backing.size:
                return EofMapping(), 0
        return mapping, length


class OutOfPlaceParallelAccess(FormatAccess):
    """With write parallelization, the jobs of one write capture the loop variables late:
    every job writes the last chunk's (empty) slice, so the data never lands."""

    def write(self, data: Any, offset: int) -> None:
        if self.write_parallelization == 1:
            super().write(data, offset)
            return
        view = memoryview(data).cast("B")
        offset, length = check_range(offset, len(view), "write")
        self._check_writable("write")
        self._check_within_disk(offset, length, "write")
        jobs: list[Callable[[], None]] = []
        pos = 0
        while pos < length:
            storage, host, chunk = self.ensure_data_mapping(offset + pos, length - pos, True)
            jobs.append(lambda: storage.write(view[pos : pos + chunk], host))  # noqa: B023
            pos += chunk
        self._run(jobs, self.write_parallelization)


# -- targets --------------------------------------------------------------------------------


def _swap_chain(access: Any, mutant: type[Qcow2Driver]) -> None:
    """Turn every reference qcow2 driver in the chain into the mutant (same state)."""
    layer = access
    while isinstance(layer, FormatAccess):
        driver = layer.driver
        if type(driver) is Qcow2Driver:
            driver.__class__ = mutant
            hook = getattr(driver, "_mutate", None)
            if hook is not None:
                hook()
        layer = getattr(driver, "backing", None)


def qcow2_mutant_target(
    name: str,
    driver: type[Qcow2Driver] | None = None,
    access: type[FormatAccess] | None = None,
) -> DriverTarget:
    """A qcow2 target: the reference with its driver and / or top FormatAccess mutated."""

    def open_mutant(location: Any, **kwargs: Any) -> FormatAccess:
        opened = open_image(location, **kwargs)
        if driver is not None:
            _swap_chain(opened, driver)
            backing = kwargs.get("backing")
            if isinstance(backing, FormatAccess):
                _swap_chain(backing, driver)
        if access is not None and kwargs.get("writable"):
            opened.__class__ = access
        return opened

    return DriverTarget(
        name=f"mutant:{name}",
        format="qcow2",
        create_image=create_image,
        open_image=open_mutant,
    )

"""Creating, applying and deleting internal snapshots (specs/qcow2-snapshots.toml).

QEMU's block/qcow2-snapshot.c: qcow2_snapshot_create copies the active L1 table and raises
the refcount of everything it reaches; qcow2_snapshot_goto makes a snapshot's L1 table the
active one (raising the snapshot's references before the switch, dropping the old active
ones after it); qcow2_snapshot_delete drops the snapshot from the table first and its
references after.  qcow2_update_snapshot_refcount keeps the COPIED flags exact ("refcount
== 1") in the tables it walks; qcow2_write_snapshots writes a new table into new clusters
and switches the header to it, then frees the old one.

Crash order (crash.power-cut, crash.snapshot.copied-conservative): every reference is counted
before the header or L1 table that makes it live is written, and uncounted only after it is
gone, so a cut leaves leaks; the COPIED flags are cleared before a refcount rises past 1 and
set only after it dropped to 1, so a cut between the two leaves only flags that are clear
where they could be set (a needless copy on the next write, which ``qemu-img check -r all``
sets right) -- never a flag that allows writing in place into a shared cluster.  A mixin of
``Qcow2Driver``.
"""

from __future__ import annotations

import re
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from itertools import compress

from .._errors import InvalidRequestError, UnsupportedError
from .._snapshot import SnapshotInfo
from .constants import L1E_OFFSET_MASK, QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS, QCOW_OFLAG_COPIED
from .driver_state import DriverState
from .header import required_l1_size
from .overlap import snapshot_regions
from .snapshots import (
    QCOW_MAX_SNAPSHOTS_SIZE,
    SnapshotEntry,
    find_snapshot,
    pack_snapshot_table,
    read_snapshot_table,
)
from .tables import ClusterType, decode_l2_entry, unpack_table

__all__ = ["MAX_SNAPSHOT_NAME_BYTES", "SnapshotWrites", "next_snapshot_id"]

#: The entry's name_size field is 16 bits wide (qemu-img itself keeps 255 bytes).
MAX_SNAPSHOT_NAME_BYTES = 0xFFFF

_LEADING_NUMBER = re.compile(r"\s*\+?(\d+)")


def next_snapshot_id(ids: list[str]) -> str:
    """find_new_snapshot_id: one more than the largest ID read as ``strtoul`` reads it
    (leading digits; 0 where there are none)."""
    highest = 0
    for sid in ids:
        m = _LEADING_NUMBER.match(sid)
        if m:
            highest = max(highest, int(m.group(1)))
    return str(highest + 1)


class SnapshotWrites(DriverState):
    """``create_snapshot``, ``apply_snapshot`` and ``delete_snapshot`` of the qcow2 driver."""

    # -- the three operations -----------------------------------------------------------------

    def create_snapshot(self, name: str) -> SnapshotInfo:
        """qcow2.snapshots.create-refcounts: snapshot the active disk under ``name``."""
        self._begin_snapshot_op("create_snapshot")
        try:
            return self._create_snapshot(name)
        finally:
            self._end_snapshot_op()

    def _create_snapshot(self, name: str) -> SnapshotInfo:
        entries = self._snapshots()
        raw_name = name.encode("utf-8", "surrogateescape")
        if not raw_name or len(raw_name) > MAX_SNAPSHOT_NAME_BYTES:
            raise InvalidRequestError(
                f"{self}: a snapshot name must have 1 to {MAX_SNAPSHOT_NAME_BYTES} bytes, "
                f"not {len(raw_name)}"
            )
        if any(e.name == name for e in entries):
            # qcow2.snapshots.id-assignment: pyimago's rule (qemu-img allows duplicate names,
            # which -a/-d cannot tell apart): names are unique.
            raise InvalidRequestError(f"{self}: a snapshot named {name!r} exists already")
        if len(entries) >= QCOW_MAX_SNAPSHOTS:
            raise UnsupportedError(
                f"{self}: the image has {len(entries)} snapshots, QEMU's limit"
            )
        now = time.time_ns()
        info = SnapshotInfo(
            id=next_snapshot_id([e.id_str for e in entries]),
            name=name,
            vm_state_size=0,
            date_sec=(now // 1_000_000_000) & 0xFFFFFFFF,
            date_nsec=now % 1_000_000_000,
            vm_clock_nsec=0,
            disk_size=self._size,
            # qemu-img snapshot -c records an icount of 0 (listed as such).
            icount=0,
        )
        # Checked before anything is written: the table must fit QEMU's limit.
        trial = SnapshotEntry(info.id, name, 0, self._l1_size, info)
        if len(pack_snapshot_table([*entries, trial])) > QCOW_MAX_SNAPSHOTS_SIZE:
            raise UnsupportedError(f"{self}: the snapshot table would exceed QEMU's limit")
        active = list(self._l1)
        self._check_refcount_room(active)
        # The copy of the active L1 table (COPIED flags as they are, as QEMU copies it).
        l1_offset = 0
        if self._l1_size:
            clusters = -(-self._l1_size * 8 // self._cluster_size)
            l1_offset = self._allocator.allocate(clusters)
            self._storage.write(struct.pack(f">{self._l1_size}Q", *active), l1_offset)
        self._update_tree_refcounts(active, 1, self._set_l1_entry)
        self._write_snapshot_table([*entries, SnapshotEntry(info.id, name, l1_offset,
                                                            self._l1_size, info)])
        return info

    def apply_snapshot(self, key: str) -> None:
        """qcow2.snapshots.apply-revert: make the snapshot ``key`` (ID first, then name) the
        active disk, at the snapshot's disk size."""
        self._begin_snapshot_op("apply_snapshot")
        try:
            sn = find_snapshot(self._snapshots(), key)
            self._check_snapshot_l1(sn)
            disk_size = sn.info.disk_size
            if disk_size != self._size and self.header.version < 3:
                raise UnsupportedError(
                    f"{self}: applying snapshot {sn.id_str!r} would resize the disk "
                    f"({self._size} -> {disk_size}), which QEMU refuses for a "
                    "v2 image with snapshots"
                )
            if disk_size != self._size:
                self._check_new_size(disk_size)
            raw = self._storage.read(sn.l1_table_offset, sn.l1_size * 8) if sn.l1_size else b""
            new_l1 = unpack_table(raw)
            # Refused before anything is written (QEMU truncates first and fails only when
            # it raises the refcounts, leaving the disk resized).
            self._check_refcount_room(new_l1)
            # As large as QEMU leaves it: qcow2_grow_l1_table never shrinks the table.
            l1_size = max(self._l1_size, sn.l1_size,
                          required_l1_size(disk_size, self._cluster_bits, self._entry_bytes))
            new_l1 += [0] * (l1_size - len(new_l1))

            def set_snapshot_l1(i: int, value: int) -> None:
                new_l1[i] = value
                self._storage.write(struct.pack(">Q", value), sn.l1_table_offset + 8 * i)

            # "Before overwriting the old current L1 table on disk, make sure to increase all
            # refcounts for the clusters referenced by the new one."
            self._update_tree_refcounts(new_l1[: sn.l1_size], 1, set_snapshot_l1)
            old_l1, old_offset, old_size = list(self._l1), self._l1_offset, self._l1_size
            self._switch_active_l1(new_l1, disk_size)
            # "Decrease the refcount referenced by the old one only when the L1 table is
            # overwritten."
            self._update_tree_refcounts(old_l1, -1, None)
            self._free_l1(old_offset, old_size)
            self._update_tree_refcounts(list(self._l1), 0, self._set_l1_entry)
        finally:
            self._end_snapshot_op()

    def delete_snapshot(self, key: str) -> None:
        """qcow2.snapshots.delete-release: drop the snapshot ``key`` (ID first, then name)."""
        self._begin_snapshot_op("delete_snapshot")
        try:
            entries = self._snapshots()
            sn = find_snapshot(entries, key)
            self._check_snapshot_l1(sn)
            raw = self._storage.read(sn.l1_table_offset, sn.l1_size * 8) if sn.l1_size else b""
            sn_l1 = unpack_table(raw)
            self._write_snapshot_table([e for e in entries if e is not sn])
            # The snapshot is gone: from here on a cut only leaks its clusters.
            self._update_tree_refcounts(sn_l1, -1, None)
            if sn.l1_size:
                self._free_range(sn.l1_table_offset, sn.l1_size * 8)
            self._update_tree_refcounts(list(self._l1), 0, self._set_l1_entry)
        finally:
            self._end_snapshot_op()

    # -- shared steps -------------------------------------------------------------------------

    def _begin_snapshot_op(self, op: str) -> None:
        self._begin(op)
        if self.header.has_data_file:
            # qcow2.data-file.no-compressed: "neither compressed clusters nor internal
            # snapshots are supported" (QEMU: -ENOTSUP).
            raise UnsupportedError(f"{op}: {self} has an external data file: no snapshots")
        self._flush_tables()

    def _flush_tables(self) -> None:
        """The walks below read and write L2 tables on storage: the cache goes first."""
        self._l2.flush()
        self._l2.clear()

    def _end_snapshot_op(self) -> None:
        self._l2.clear()
        self._refresh_snapshot_metadata()

    def _check_snapshot_l1(self, sn: SnapshotEntry) -> None:
        # qcow2_validate_table(bs, sn->l1_table_offset, sn->l1_size, L1E_SIZE,
        # QCOW_MAX_L1_SIZE, "Snapshot L1 table", ...)
        if sn.l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise UnsupportedError(
                f"{self}: snapshot {sn.id_str!r} has an L1 table of {sn.l1_size} entries, "
                "more than QEMU's limit"
            )
        self._check_metadata_range(f"snapshot {sn.id_str!r} L1 table", sn.l1_table_offset,
                                   sn.l1_size * 8, check_overlap=False)

    def _read_table(self, offset: int) -> list[int]:
        self._check_l2_table(offset)
        raw = self._storage.read(offset, self._cluster_size)
        return unpack_table(raw)

    def _entry_hosts(self, table: list[int]) -> list[tuple[int, ClusterType, range]]:
        """``(word index, type, held host clusters)`` of the entries of an L2 table, leaving
        out the all-zero ones: an unallocated entry holds no cluster and has no COPIED flag
        to keep.  (A 2 MiB-cluster table has 262,144 entries, mostly zero: ``compress``
        picks the non-zero ones at C speed.)"""
        step = self._entry_bytes // 8
        hosts: list[tuple[int, ClusterType, range]] = []
        for k in compress(range(0, len(table), step), table[::step]):
            entry = decode_l2_entry(table[k], self._cluster_bits, extended=self._extended,
                                    data_file=False)
            hosts.append((k, entry.type, self._held_clusters(entry)))
        return hosts

    def _tree(self, l1: list[int]) -> list[tuple[int, int, list[int]]]:
        """``(l1 index, L2 table offset, L2 table)`` of every L2 table ``l1`` points at."""
        return [(i, e & L1E_OFFSET_MASK, self._read_table(e & L1E_OFFSET_MASK))
                for i, e in enumerate(l1) if e & L1E_OFFSET_MASK]

    def _check_refcount_room(self, l1: list[int]) -> None:
        """Refuse before anything is written where one more reference would overflow a
        refcount (refcount_bits=1, or a cluster at the maximum)."""
        gains: Counter[int] = Counter()
        for _, l2_offset, table in self._tree(l1):
            gains[l2_offset] += 1
            for _, _, held in self._entry_hosts(table):
                gains.update(held)
        top = (1 << self.header.refcount_bits) - 1
        for host, n in gains.items():
            if self._allocator.refcount(host) + n > top:
                raise UnsupportedError(
                    f"{self}: host cluster 0x{host:x} would need a refcount above {top} "
                    f"(refcount_bits {self.header.refcount_bits})"
                )

    def _update_tree_refcounts(
        self, l1: list[int], addend: int, set_l1: Callable[[int, int], None] | None
    ) -> None:
        """QEMU's qcow2_update_snapshot_refcount over the tree of ``l1``: every cluster it
        reaches gains ``addend`` references and its COPIED flag becomes "refcount == 1";
        ``set_l1`` writes a changed L1 entry (None: the L1 table is about to go).

        crash.snapshot.copied-conservative: with ``addend > 0`` the flags are written before the
        refcounts rise, otherwise after they changed (see the module docstring)."""
        for l1_idx, l2_offset, table in self._tree(l1):
            hosts = self._entry_hosts(table)
            if addend > 0:
                self._write_copied_flags(l2_offset, table, hosts, addend)
                self._set_l1_copied(l1_idx, l1[l1_idx], addend, set_l1)
            if addend:
                for _, _, held in hosts:
                    for host in held:
                        self._add_reference(host, addend)
                self._add_reference(l2_offset, addend)
            if addend <= 0:
                if self._allocator.refcount(l2_offset):
                    self._write_copied_flags(l2_offset, table, hosts, 0)
                self._set_l1_copied(l1_idx, l1[l1_idx], 0, set_l1)

    def _add_reference(self, host: int, addend: int) -> None:
        if addend > 0:
            self._allocator.incref(host)
        else:
            self._allocator.free(host)

    def _write_copied_flags(self, l2_offset: int, table: list[int],
                            hosts: list[tuple[int, ClusterType, range]], addend: int) -> None:
        new = list(table)
        for k, kind, held in hosts:
            if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                exclusive = self._allocator.refcount(held[0]) + addend == 1
            else:
                # "compressed clusters are never modified" (and the rest holds no cluster).
                exclusive = False
            raw = table[k]
            new[k] = raw | QCOW_OFLAG_COPIED if exclusive else raw & ~QCOW_OFLAG_COPIED
        if new != table:
            self._storage.write(struct.pack(f">{len(new)}Q", *new), l2_offset)
            table[:] = new

    def _set_l1_copied(self, l1_idx: int, raw: int, addend: int,
                       set_l1: Callable[[int, int], None] | None) -> None:
        l2_offset = raw & L1E_OFFSET_MASK
        exclusive = self._allocator.refcount(l2_offset) + addend == 1
        new = raw | QCOW_OFLAG_COPIED if exclusive else raw & ~QCOW_OFLAG_COPIED
        if set_l1 is not None and new != raw:
            set_l1(l1_idx, new)

    def _switch_active_l1(self, entries: list[int], disk_size: int) -> None:
        """crash.snapshot.copied-conservative ("the active disk [...] read[s] either [its] old
        or [its] new contents"): ``entries`` go into a fresh L1 table, then one header write
        switches the disk size, the L1 size and the L1 offset together (bytes 24-47,
        crypt_method between them rewritten as it is), as qcow2_grow_l1_table switches the
        L1 size and offset.  A cut shows the old disk at its size or the new one at its
        size; the caller frees the old table after it let go of the old tree.

        QEMU's qcow2_snapshot_goto truncates to the snapshot's size first and overwrites
        the active table in place, so a cut between shows one disk at the other's size
        (divergence on qcow2.snapshots.apply-revert)."""
        new_offset = self._write_l1_copy(entries) if entries else self._l1_offset
        self._write_field("size", ">QIIQ", disk_size, self.header.crypt_method,
                          len(entries), new_offset)
        self._l1_offset, self._l1_size, self._l1 = new_offset, len(entries), list(entries)
        self._size = disk_size

    def _free_range(self, offset: int, length: int) -> None:
        cs = self._cluster_size
        first = offset - offset % cs
        self._allocator.free(first, -(-(offset + length - first) // cs))

    def _write_snapshot_table(self, entries: list[SnapshotEntry]) -> None:
        """qcow2_write_snapshots: the new table in new clusters, then the header switched
        to it (count and offset in one write), then the old table freed."""
        packed = pack_snapshot_table(entries)
        if len(packed) > QCOW_MAX_SNAPSHOTS_SIZE:
            raise UnsupportedError(f"{self}: the snapshot table would exceed QEMU's limit")
        old_offset = self.header.snapshots_offset
        _, old_length = read_snapshot_table(self._storage, old_offset, self.header.nb_snapshots)
        new_offset = 0
        if packed:
            new_offset = self._allocator.allocate(-(-len(packed) // self._cluster_size))
            self._storage.write(packed, new_offset)
        self._write_field("nb_snapshots", ">IQ", len(entries), new_offset)
        self.header = replace(self.header, nb_snapshots=len(entries),
                              snapshots_offset=new_offset)
        self._snapshot_entries = list(entries)
        if old_length:
            self._free_range(old_offset, old_length)

    def _refresh_snapshot_metadata(self) -> None:
        """The overlap checks' picture of the snapshots' metadata, after it changed."""
        entries = self._snapshots()
        _, length = read_snapshot_table(self._storage, self.header.snapshots_offset,
                                        len(entries))
        self._snapshot_metadata = list(snapshot_regions(
            self._storage, self._cluster_size, self.header.snapshots_offset, length, entries
        ))

"""Looking up and replacing the qcow2 driver's L1 and L2 entries (specs/qcow2-tables.toml).

qcow2.txt, "Cluster mapping": "l2_offset = l1_table[l1_index]; cluster_offset =
l2_table[l2_index]".  Reading an entry, making an L2 table writable (copying a shared one),
writing one entry and releasing the host clusters the old entry held, in the order the crash
clauses (specs/crash.toml) ask for.  A mixin of ``Qcow2Driver`` (the driver owns the state it
reads: the L1 table, the L2 cache, the allocator).
"""

from __future__ import annotations

import struct

from .._errors import CorruptImageError
from .constants import QCOW_OFLAG_COPIED
from .driver_state import DriverState
from .subcluster_write import encode_extended_entry
from .subclusters import subcluster_entry
from .tables import (
    ClusterType,
    L2Entry,
    decode_l1_entry,
    decode_l2_entry,
    encode_l2_entry,
    l1_index,
    l2_index,
    unpack_table,
)

__all__ = ["TableEntries"]


class TableEntries(DriverState):
    """The L1/L2 entries of the active disk: lookup, copy-on-write of tables, replacement."""

    def _load_l1(self) -> list[int]:
        raw = self._storage.read(self._l1_offset, self._l1_size * 8) if self._l1_size else b""
        return unpack_table(raw)

    def _begin(self, op: str) -> None:
        """Start a modifying operation other than ensure_data_mapping."""
        self._require_writable(op)
        self._settle()

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
            # qcow2.l2.cow-shared: "A refcount of 0 means that the cluster is free, 1 means that
            # it is used, and >= 2 means that it is used and any write access must perform a
            # COW (copy on write) operation."  An L2 table with refcount > 1 (COPIED clear) is
            # shared with a snapshot and must be copied before it is changed.
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


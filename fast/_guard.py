"""QEMU's safety net for the qcow2 layer of pyimago.fast: overlap checks and the corrupt bit.

Every allocation and every in-place data write is checked against all of the image's
metadata (:class:`~._overlap.MetadataIndex`: header, L1 table, refcount table and blocks,
active and snapshot L2 tables, snapshot table, snapshot L1 tables).  A hit marks the image
corrupt (v3: incompatible bit 1 on storage), raises :class:`CorruptImageError` naming the
offset and the structure, and every later modifying call is refused; reads keep working.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence

from pyimago.reference._errors import CorruptImageError
from pyimago.reference._storage import Storage

from ._codec import decode_u64_table
from ._entries import HOST_MASK
from ._header import Header, Incompat
from ._overlap import MetadataIndex, clusters_of
from ._refcounts import Refcounts
from ._snapshots import Snapshot, read_snapshot_table

__all__ = ["MetadataGuard"]

_CORRUPT_NOTE = "the image is marked corrupt: writes are refused, reads still work"


class MetadataGuard:
    """Mixin of :class:`~._qcow2.Qcow2Layer`: where the metadata is, and the checks."""

    # Provided by the layer.
    storage: Storage
    writable: bool
    hdr: Header
    refs: Refcounts
    _cbits: int
    _cs: int
    _cmask: int
    _l1: array[int]
    _file_end: int
    _meta_read: Callable[[int, int], bytes]

    def _init_guard(self) -> None:
        self._meta: MetadataIndex | None = None
        self._snap_parts: list[tuple[range, str]] | None = None
        #: Host cluster -> references released but not yet dropped from its refcount.
        self._releasing: dict[int, int] = {}
        #: Why the image was marked corrupt (None while it is not).
        self.corrupt: str | None = None

    def _write_header(self) -> None:
        self.storage.write(self.hdr.to_bytes(), 0)

    def _held(self, e: int) -> range:
        raise NotImplementedError

    def _file_size_now(self) -> int:
        self._file_end = max(self._file_end, self.storage.size(), self.refs.end)
        return self._file_end

    # -- where the metadata is ------------------------------------------------------------

    def snapshot_entries(self) -> list[Snapshot]:
        """The internal snapshots' table entries (``snapshots`` lists what qemu-img lists)."""
        table = self.hdr.snapshots
        if not table.n:
            return []
        return read_snapshot_table(self._meta_read, table, self._file_size_now())[0]

    def _snapshot_parts(self) -> list[tuple[range, str]]:
        """The snapshot table, the snapshot L1 tables and the L2 tables they point at (they
        do not change while the image is open)."""
        parts = self._snap_parts
        if parts is None:
            cb = self._cbits
            table = self.hdr.snapshots
            parts = []
            if table.n:
                snaps, nbytes = read_snapshot_table(self._meta_read, table, self._file_size_now())
                parts.append((clusters_of(table.at, nbytes, cb), "snapshot table"))
                end = self._file_size_now()
                for sn in snaps:
                    at, n = sn.l1.at, sn.l1.n
                    if at & self._cmask or not n or at >= end:
                        continue  # a damaged entry: check() reports it
                    what = f"L1 table of snapshot {sn.id!r}"
                    parts.append((clusters_of(at, 8 * n, cb), what))
                    l1 = decode_u64_table(self._meta_read(at, min(8 * n, end - at) & ~7))
                    l2s = {(e & HOST_MASK) >> cb for e in l1 if e & HOST_MASK}
                    parts.extend((range(c, c + 1), f"L2 table of snapshot {sn.id!r}")
                                 for c in sorted(l2s))
            self._snap_parts = parts
        return parts

    def _metadata(self) -> MetadataIndex:
        """Every host cluster holding metadata, with what it holds."""
        index = self._meta
        if index is None:
            cb = self._cbits
            hdr = self.hdr
            parts: list[tuple[range, str]] = [
                (range(1), "header"),
                (clusters_of(hdr.l1.at, 8 * hdr.l1.n, cb), "active L1 table"),
                (clusters_of(hdr.reftable.at, hdr.reftable.n * self._cs, cb), "refcount table"),
            ]
            parts += [(range(ofs >> cb, (ofs >> cb) + 1), "refcount block")
                      for ofs in self.refs.block_offsets()]
            parts += [(range(c, c + 1), "active L2 table")
                      for c in {(e & HOST_MASK) >> cb for e in self._l1 if e & HOST_MASK}]
            parts += self._snapshot_parts()
            index = self._meta = MetadataIndex(parts)
        return index

    def _meta_moved(self) -> None:
        """The L1 or refcount table moved, or tables went: build the index again."""
        self._meta = None

    def _meta_add_block(self, cluster: int) -> None:
        if self._meta is not None:
            self._meta.add(cluster, "refcount block")

    def _meta_add_table(self, cluster: int) -> None:
        if self._meta is not None:
            self._meta.add(cluster, "active L2 table")

    def _meta_drop_table(self, cluster: int) -> None:
        if self._meta is not None:
            self._meta.discard(cluster)

    # -- the checks -----------------------------------------------------------------------

    def _vet_table(self, what: str, ofs: int) -> None:
        """An L2 table or refcount block must be a whole cluster of its own in the file.

        On an image open for writing, a misplaced table is a corruption found while writing
        could follow: the image is marked corrupt (qcow2.corrupt.mark), as QEMU does.
        """
        cs = self._cs
        bad = self.mark_corrupt if self.writable else CorruptImageError
        if ofs & self._cmask:
            raise bad(f"qcow2: {what} offset 0x{ofs:x} is not cluster-aligned")
        if ofs < cs:
            raise bad(f"qcow2: {what} at 0x{ofs:x} overlaps the header")
        if ofs >= self._file_end and ofs >= self._file_size_now():
            raise bad(
                f"qcow2: {what} at 0x{ofs:x} lies wholly outside the image file "
                f"({self._file_end} bytes)"
            )
        hdr = self.hdr
        for name, at, n in (
            ("L1 table", hdr.l1.at, hdr.l1.n * 8),
            ("refcount table", hdr.reftable.at, hdr.reftable.n * cs),
        ):
            if n and at < ofs + cs and ofs < at + n:
                raise bad(f"qcow2: {what} at 0x{ofs:x} overlaps the {name}")

    def _vet_block(self, ofs: int) -> None:
        self._vet_table("refcount block", ofs)

    def _vet_in_place(self, host: int, n: int) -> None:
        """A data range about to be written where it lies must be in the file and clear of
        every metadata cluster."""
        if host >= self._file_end and host >= self._file_size_now():
            raise CorruptImageError(
                f"qcow2: data cluster 0x{host:x} lies wholly outside the image file: "
                "refusing to write it"
            )
        cb = self._cbits
        meta = self._meta if self._meta is not None else self._metadata()
        clash = meta.first_hit(host >> cb, (host + n - 1) >> cb)
        if clash is not None:
            raise self._overlap("a data write", clash, meta)

    def _vet_alloc(self, first: int, n: int) -> None:
        """Clusters the allocator is about to hand out (their refcount says free) must hold
        no metadata: a refcount that lies would have us overwrite it."""
        meta = self._metadata()
        clash = meta.first_hit(first, first + n - 1)
        if clash is not None:
            raise self._overlap("an allocation", clash, meta)

    def _vet_releases(self, entries: Sequence[int]) -> None:
        """Entries about to be dropped: every host cluster they hold must be a data cluster
        with a reference to give back (checked before anything changes)."""
        if not entries:
            return
        meta = self._metadata()
        # References already given back (but not yet dropped: crash.order.unref-after-entry)
        # count, and so do the earlier entries of this same batch.
        releasing = self._releasing
        taken: dict[int, int] = {}
        for e in entries:
            for cluster in self._held(e):
                if cluster in meta:
                    raise self._overlap("freeing an L2 entry's cluster", cluster, meta)
                taken[cluster] = n = taken.get(cluster, 0) + 1
                if self.refs.count(cluster) < n + releasing.get(cluster, 0):
                    raise self.mark_corrupt(
                        f"qcow2: an L2 entry points at host cluster 0x{cluster << self._cbits:x}, "
                        "whose refcount is too low for its references"
                    )

    def _overlap(self, action: str, cluster: int, meta: MetadataIndex) -> CorruptImageError:
        # qcow2.corrupt.overlap-check: "A hit raises CorruptImageError naming the offset
        # and the structure it overlaps, and nothing is written."
        return self.mark_corrupt(
            f"qcow2: {action} at host offset 0x{cluster << self._cbits:x} would overwrite "
            f"the {meta.what(cluster)}"
        )

    # -- the corrupt bit ------------------------------------------------------------------

    def mark_corrupt(self, why: str) -> CorruptImageError:
        """Mark the image corrupt and return the error to raise.

        qcow2.corrupt.mark: "a v3 image gets the corrupt bit (incompatible bit 1) set on
        storage, every later modifying operation on the open image raises
        CorruptImageError, and reads keep working."
        """
        if self.corrupt is None:
            self.corrupt = why
            if self.hdr.version >= 3:
                self.hdr = self.hdr.with_incompatible(Incompat.CORRUPT)
                self._write_header()
        return CorruptImageError(f"{why} ({_CORRUPT_NOTE})")

    def refuse_corrupt(self, op: str) -> None:
        """Refuse a modifying call on an image found corrupt."""
        if self.corrupt is not None:
            raise CorruptImageError(f"{op}: {self}: {self.corrupt} ({_CORRUPT_NOTE})")

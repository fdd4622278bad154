"""What the qcow2 driver maps guest offsets to: reads and data mappings.

``get_mapping`` turns the entries of the active disk into the shallow mappings of the access
layer (data, zero, compressed, backing); ``ensure_data_mapping`` gives the caller a writable
data cluster, copying what the guest sees into a new one first where needed
(access.cow.partial-cluster).  A mixin of ``Qcow2Driver``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import InvalidRequestError, UnsupportedError
from .._mapping import (
    EofMapping,
    IndirectMapping,
    RawMapping,
    ShallowMapping,
    SpecialMapping,
    ZeroMapping,
)
from .._storage import Storage, WritableBuffer
from .compression import decompress_cluster
from .driver_state import DriverState
from .overlap import first_overlap
from .tables import ClusterType, L2Entry, offset_in_cluster

__all__ = ["Mappings"]


class Mappings(DriverState):
    """``get_mapping``, ``readv_special`` and ``ensure_data_mapping`` of the qcow2 driver."""

    def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        self._settle()
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
                return RawMapping(self.data_storage, entry.host_offset + in_cluster,
                                  self._writable and not self._corrupt and entry.copied)
            writable = (
                self._writable
                and not self._corrupt
                and entry.copied
                and entry.host_offset < self._storage.size()
                and first_overlap(self._metadata_regions(entry.host_offset, self._cluster_size),
                                  entry.host_offset, self._cluster_size) is None
            )
            return RawMapping(self._storage, entry.host_offset + in_cluster, writable)
        if t in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            # qcow2.zero.flag: "If set to 1, the cluster reads as all zeros."
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
        self._settle()
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

    def _cluster_content(self, guest_cluster: int, entry: L2Entry) -> bytes:
        """What the guest currently sees in a whole cluster (the source of copy-on-write)."""
        t = entry.type
        if t is ClusterType.NORMAL:
            return self.data_storage.read(entry.host_offset, self._cluster_size)
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
        if self._extended:
            return self._ensure_subcluster_data(offset, length, overwrite)
        in_cluster = offset_in_cluster(offset, self._cluster_bits)
        chunk = min(length, self._cluster_size - in_cluster)
        guest_cluster = offset - in_cluster
        entry = self._get_unit(offset)
        storage = self.data_storage
        if entry.type is ClusterType.NORMAL and entry.copied:
            self._check_host_data(entry.host_offset)
            return storage, entry.host_offset + in_cluster, chunk
        # access.cow.partial-cluster: everything of the cluster the caller does not overwrite is
        # copied from what the guest sees now (backing, compressed data, zeroes).
        keep = [(0, self._data_cluster_end(guest_cluster))]
        if overwrite:
            keep = [(0, in_cluster), (in_cluster + chunk, keep[0][1])]
        keep = [(a, b) for a, b in keep if b > a]
        if entry.type is ClusterType.ZERO_ALLOC and entry.copied:
            host = entry.host_offset
            self._check_host_data(host)
            # crash.power-cut: "every sector changed since reads either its durable value or
            # a value a later operation gave it". The table on storage may still map this
            # host cluster as the data it held before it was zeroed, so these writes show
            # at once: zeroing the kept ranges one by one could split a 512-byte sector
            # between two writes (half old data, half zeroes). The whole cluster is zeroed
            # in one write instead; the caller's data follows.
            if keep:
                storage.write_zeroes(host, self._data_cluster_end(guest_cluster))
        else:
            content = self._cluster_content(guest_cluster, entry) if keep else b""
            host = self._allocate_data_cluster(guest_cluster)
            if keep and self.header.has_data_file:
                # The cluster in the data file is where the guest data always was: the table
                # on storage may still map it, so the copy goes in one write (crash.power-cut,
                # as for ZERO_ALLOC clusters above); the caller's data follows.
                keep = [(0, self._data_cluster_end(guest_cluster))]
            for a, b in keep:
                storage.write(content[a:b], host + a)
        self._replace_entry(guest_cluster, L2Entry(ClusterType.NORMAL, host, True),
                            data_pending=True)
        return storage, host + in_cluster, chunk


"""Writing compressed clusters (specs/qcow2-compressed.toml, qcow2.compressed.write-*).

QEMU's qcow2_co_pwritev_compressed_task and qcow2_alloc_compressed_cluster_offset: one whole
cluster (or the disk's partial last cluster, zero-padded) is compressed by the image's
compression type; where the result does not fit in ``cluster_size - 1`` bytes a normal
cluster is written instead; compressed data only ever goes into a guest cluster that has no
host cluster ("Compression can't overwrite anything").  A mixin of ``Qcow2Driver``.
"""

from __future__ import annotations

from .._errors import InvalidRequestError, UnsupportedError
from .compression import compress_cluster
from .constants import QCOW2_COMPRESSED_SECTOR_SIZE
from .driver_state import DriverState
from .tables import ClusterType, L2Entry

__all__ = ["CompressedWrites", "compressed_entry"]


def compressed_entry(host_offset: int, length: int) -> L2Entry:
    """The L2 entry of ``length`` bytes of compressed data at ``host_offset``.

    qcow2.compressed.layout: "Number of additional 512-byte sectors used for the compressed
    data, beyond the sector containing the offset in the previous field."
    """
    sector = QCOW2_COMPRESSED_SECTOR_SIZE
    additional = (host_offset + length - 1) // sector - host_offset // sector
    return L2Entry(ClusterType.COMPRESSED, host_offset, False, additional + 1)


class CompressedWrites(DriverState):
    """``write_compressed`` of the qcow2 driver."""

    def write_compressed(self, data: bytes, offset: int) -> None:
        """Write one guest cluster compressed (see the module docstring)."""
        self._begin("write_compressed")
        cs = self._cluster_size
        # qcow2.compressed.write-whole-cluster: "if (offset_into_cluster(s, offset)) return
        # -EINVAL", and a partial cluster only where it ends the disk.
        if offset % cs:
            raise InvalidRequestError(
                f"{self}: compressed write at {offset} is not cluster-aligned ({cs} bytes)"
            )
        expected = min(cs, self._size - offset)
        if len(data) != expected:
            raise InvalidRequestError(
                f"{self}: a compressed write at {offset} takes exactly {expected} bytes "
                f"(a whole cluster, or the disk's last partial cluster), not {len(data)}"
            )
        # The arguments are checked first (bad input is InvalidRequestError whatever the
        # image), then the feature.
        if self.header.has_data_file:
            # qcow2.data-file.no-compressed: QEMU's qcow2_co_pwritev_compressed_part
            # returns -ENOTSUP with an external data file.
            raise UnsupportedError(
                f"{self}: compressed writes are not possible with an external data file"
            )
        cluster = bytes(data).ljust(cs, b"\0")
        compressed = compress_cluster(cluster, self.header.compression_type)
        if compressed is None:
            # qcow2.compressed.write-fallback: "could not compress: write normal cluster".
            self._write_plain(data, offset)
            return
        old = self._get_l2_entry(offset)
        if old.host_offset:
            # qcow2.compressed.write-unallocated-only: "Compression can't overwrite
            # anything. Fail if the cluster was already allocated."
            raise InvalidRequestError(
                f"{self}: guest cluster at {offset} is allocated ({old.type.value}); "
                "compressed data can only be written where no host cluster is mapped"
            )
        # The L2 table first, as qcow2_alloc_compressed_cluster_offset gets it before
        # qcow2_alloc_bytes (so the image is laid out as QEMU lays it out).
        self._writable_l2(offset)
        # crash.order.refcount-before-reference, crash.order.data-before-entry: the bytes are
        # counted, then written, and only then does the L2 entry point at them.
        host = self._allocator.allocate_bytes(len(compressed))
        self._overlap_check(host, len(compressed), "compressed write")
        self._storage.write(compressed, host)
        self._replace_entry(offset, compressed_entry(host, len(compressed)))

    def _write_plain(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            storage, host, n = self.ensure_data_mapping(offset + pos, len(view) - pos, True)
            storage.write(view[pos : pos + n], host)
            pos += n

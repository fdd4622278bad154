"""External data files (qcow2.txt, incompatible bit 2 and the data file name extension).

"If this bit is set, an external data file is used. Guest clusters are then stored in the
external data file. For such images, clusters in the external data file are not refcounted.
The offset field in the Standard Cluster Descriptor must match the guest offset and neither
compressed clusters nor internal snapshots are supported."
"""

from __future__ import annotations

from dataclasses import replace

from .._errors import CorruptImageError
from .constants import QCOW2_AUTOCLEAR_DATA_FILE_RAW, QCOW2_EXT_MAGIC_DATA_FILE
from .driver_state import DriverState
from .extensions import HeaderExtension

__all__ = ["DataFileWrites", "data_file_name"]


def data_file_name(exts: list[HeaderExtension]) -> str | None:
    """The data file name the header extension records, if any.

    qcow2.txt: "External data file name string. This is used as a hint for the location of
    the external data file; if it's missing, the user has to specify the data file."
    """
    for ext in exts:
        if ext.type == QCOW2_EXT_MAGIC_DATA_FILE:
            if not ext.data:
                return None  # an empty hint is no hint
            if b"\0" in ext.data:
                raise CorruptImageError(
                    f"qcow2 data file name extension holds a NUL byte: {ext.data!r}"
                )
            return ext.data.decode("utf-8", "surrogateescape")
    return None


class DataFileWrites(DriverState):
    """Where the qcow2 driver's writes put guest data with an external data file
    (qcow2.data-file.write, qcow2.data-file.raw).  A mixin of ``Qcow2Driver``."""

    def _allocate_data_cluster(self, guest_cluster: int) -> int:
        """A host cluster for new guest data.

        qcow2.data-file.offsets: "The offset field in the Standard Cluster Descriptor must
        match the guest offset" in an external data file, where nothing is refcounted.
        """
        if self.header.has_data_file:
            return guest_cluster
        return self._allocator.allocate(1)

    def _check_host_data(self, host: int) -> None:
        """The overlap checks of a data cluster in the image file (none in a data file)."""
        if not self.header.has_data_file:
            self._check_data_cluster(host)

    def _data_cluster_end(self, guest_cluster: int) -> int:
        """How much of a cluster holds guest data: all of it, but in a data file only up to
        the disk end (a raw data file is exactly the disk; qcow2.data-file.raw)."""
        if self.header.has_data_file:
            return min(self._cluster_size, self._size - guest_cluster)
        return self._cluster_size

    def _zero_raw_data(self, offset: int, length: int) -> None:
        """qcow2.data-file.raw: with a raw external data file, what the guest sees as
        zeros is zeros in the data file too, written before the tables say so (as QEMU's
        qcow2_cluster_zeroize zeroes s->data_file first)."""
        if self._data_file_raw:
            self.data_storage.write_zeroes(offset, min(length, self._size - offset))

    def _leave_raw(self, why: str) -> None:
        """qcow2.data-file.raw-cleared: the raw external data bit is cleared (on storage,
        before the change that breaks it) once the data file no longer reads as the disk."""
        if self._data_file_raw:
            flags = self.header.autoclear_features & ~QCOW2_AUTOCLEAR_DATA_FILE_RAW
            self._write_field("autoclear_features", ">Q", flags)
            self.header = replace(self.header, autoclear_features=flags)
            self._data_file_raw = False

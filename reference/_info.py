"""What ``FormatAccess.info()`` reports: the contract types of image information.

Both implementations return an :class:`ImageInfo` for one layer (the image itself, not its
backing chain); the fields mean what ``qemu-img info`` means by them (QEMU's ``ImageInfo``
and ``ImageInfoSpecificQCow2`` in qapi/block-core.json), so the image tools can print
qemu-img's JSON from either implementation alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._snapshot import SnapshotInfo

__all__ = ["ImageInfo", "Qcow2Info"]


@dataclass(frozen=True, slots=True)
class Qcow2Info:
    """qcow2 header facts (``format-specific`` data of ``qemu-img info``)."""

    compat: str
    refcount_bits: int
    lazy_refcounts: bool
    corrupt: bool
    extended_l2: bool
    compression_type: str
    #: The external data file's name from the header extension (None: the image names none).
    data_file: str | None = None
    #: Whether the data file holds the raw guest disk (autoclear bit 1); None without a data
    #: file (QEMU reports it exactly when incompatible bit 2 is set).
    data_file_raw: bool | None = None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """One image layer: format, virtual size and, for qcow2, its header facts."""

    format: str
    virtual_size: int
    cluster_size: int | None = None
    backing_file: str | None = None
    backing_format: str | None = None
    dirty: bool = False
    qcow2: Qcow2Info | None = None
    snapshots: tuple[SnapshotInfo, ...] = field(default=())

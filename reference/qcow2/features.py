"""qcow2 feature bits: what may be opened, and how (qcow2.txt, header bytes 72-95)."""

from __future__ import annotations

from .._errors import CorruptImageError, UnsupportedFeatureError
from .constants import (
    KNOWN_INCOMPAT_FEATURES,
    MIN_CLUSTER_BITS,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_EXTL2,
)
from .extensions import FEATURE_TYPE_INCOMPATIBLE
from .header import QCowHeader

__all__ = ["check_features"]


def _bits(value: int) -> list[int]:
    return [b for b in range(64) if value >> b & 1]


def check_features(
    header: QCowHeader, names: dict[tuple[int, int], str], *, writable: bool
) -> None:
    """Refuse images whose features this implementation cannot honour.

    qcow2.txt: "incompatible_features: Bitmask of incompatible features. An implementation
    must fail to open an image if an unknown bit is set."
    """
    incompat = header.incompatible_features
    unknown = [b for b in _bits(incompat) if b not in KNOWN_INCOMPAT_FEATURES]
    if unknown:
        labels = ", ".join(
            f"bit {b}" + (f" ({names[(FEATURE_TYPE_INCOMPATIBLE, b)]})"
                          if (FEATURE_TYPE_INCOMPATIBLE, b) in names else "")
            for b in unknown
        )
        raise UnsupportedFeatureError(
            f"qcow2 image has unknown incompatible features: {labels}",
            feature=labels,
        )
    if header.crypt_method:
        raise UnsupportedFeatureError(
            f"qcow2 encryption (crypt_method {header.crypt_method}) is not supported",
            feature="encryption",
        )
    # qcow2.extended-l2.subclusters: "Subclusters are 32 per cluster"; QEMU refuses a
    # subcluster smaller than 512 bytes ("Unsupported subcluster size").
    if incompat & QCOW2_INCOMPAT_EXTL2 and header.cluster_bits - 5 < MIN_CLUSTER_BITS:
        raise CorruptImageError(
            f"qcow2 extended L2 entries need clusters of at least 16 KiB, not "
            f"{header.cluster_size} (subclusters of {header.cluster_size // 32} bytes)"
        )
    # qcow2.txt: "Bit 3: Compression type bit. If this bit is set, a non-default compression
    # is used for compressed clusters. The compression_type field must be present and not
    # zero."
    if bool(incompat & QCOW2_INCOMPAT_COMPRESSION) != (header.compression_type != 0):
        raise CorruptImageError(
            f"qcow2 compression type bit {bool(incompat & QCOW2_INCOMPAT_COMPRESSION)} does "
            f"not match compression_type {header.compression_type}"
        )
    if writable and incompat & QCOW2_INCOMPAT_CORRUPT:
        # qcow2.txt: "Bit 1: Corrupt bit. If this bit is set then any data structure may be
        # corrupt and the image must not be written to (unless for regaining consistency)."
        raise UnsupportedFeatureError(
            "qcow2 image is marked corrupt (incompatible bit 1); open it read-only or repair "
            "it with 'qemu-img check -r all'",
            feature="corrupt bit",
        )
    # qcow2.features.dirty: "Bit 0: Dirty bit. If this bit is set then refcounts may be
    # inconsistent, make sure to scan L1/L2 tables to repair refcounts before accessing the
    # image."  A writable open repairs them first (dirty.repair_if_dirty), as QEMU does.

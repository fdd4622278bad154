"""Creating qcow2 images: the initial layout, as ``qemu-img create`` lays it out.

Cluster 0 holds the header, its extensions and the backing file name; cluster 1 the refcount
table; cluster 2 the first refcount block.  The L1 table (and any preallocation) is then
added by the same code that grows an image, so there is one path for both.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import InvalidRequestError
from .._storage import Storage
from .constants import (
    COMPRESSION_TYPE_ZLIB,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_EXTL2,
    V2_HEADER_LENGTH,
)
from .extensions import (
    FEATURE_TYPE_AUTOCLEAR,
    FEATURE_TYPE_COMPATIBLE,
    FEATURE_TYPE_INCOMPATIBLE,
    HeaderExtension,
    pack_extensions,
    pack_feature_table,
)
from .header import QCowHeader, pack_header
from .refcounts import set_block_entry

__all__ = ["Qcow2CreateOptions", "write_initial_layout"]

#: QEMU writes v3 headers with the compression_type byte: 104 + 1, padded to 112.
_V3_HEADER_LENGTH_WITH_COMPRESSION = 112

_FEATURE_TABLE = [
    (FEATURE_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_TYPE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
]


@dataclass(frozen=True, slots=True)
class Qcow2CreateOptions:
    """Validated creation options (named as ``qemu-img create -o`` names them)."""

    cluster_bits: int = 16
    version: int = 3
    refcount_order: int = 4
    backing_file: str | None = None
    backing_fmt: str | None = None
    compression_type: int = COMPRESSION_TYPE_ZLIB
    #: Incompatible bit 4: 128-bit L2 entries with subcluster bitmaps.
    extended_l2: bool = False
    #: The external data file's name as the header extension records it (incompatible bit 2).
    data_file: str | None = None
    #: Autoclear bit 1: the data file reads as the disk without the qcow2 metadata.
    data_file_raw: bool = False
    lazy_refcounts: bool = False


def write_initial_layout(storage: Storage, opts: Qcow2CreateOptions) -> None:
    """Write an empty (size 0, no L1 table) qcow2 image onto ``storage``."""
    cs = 1 << opts.cluster_bits
    v3 = opts.version >= 3
    header_length = _V3_HEADER_LENGTH_WITH_COMPRESSION if v3 else V2_HEADER_LENGTH
    exts: list[HeaderExtension] = []
    if opts.backing_fmt:
        exts.append(HeaderExtension(QCOW2_EXT_MAGIC_BACKING_FORMAT, opts.backing_fmt.encode()))
    if opts.data_file is not None:
        # qcow2.data-file.create: "External data file name string" (QEMU writes it after the
        # backing format).
        exts.append(HeaderExtension(QCOW2_EXT_MAGIC_DATA_FILE,
                                    opts.data_file.encode("utf-8", "surrogateescape")))
    name = opts.backing_file.encode("utf-8", "surrogateescape") if opts.backing_file else b""
    with_table = [*exts, HeaderExtension(QCOW2_EXT_MAGIC_FEATURE_TABLE,
                                         pack_feature_table(_FEATURE_TABLE))]
    # The feature name table is optional; leave it out where a small cluster has no room.
    if v3 and header_length + len(pack_extensions(with_table)) + len(name) <= cs:
        exts = with_table
    ext_bytes = pack_extensions(exts)
    backing_offset = header_length + len(ext_bytes) if name else 0
    if header_length + len(ext_bytes) + len(name) > cs:
        raise InvalidRequestError(
            f"backing file name of {len(name)} bytes (and the header extensions) do not fit in "
            f"a {cs}-byte header cluster"
        )
    header = QCowHeader(
        version=opts.version,
        backing_file_offset=backing_offset,
        backing_file_size=len(name),
        cluster_bits=opts.cluster_bits,
        size=0,
        crypt_method=0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=cs,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=(
            (QCOW2_INCOMPAT_COMPRESSION if opts.compression_type else 0)
            | (QCOW2_INCOMPAT_EXTL2 if opts.extended_l2 else 0)
            | (QCOW2_INCOMPAT_DATA_FILE if opts.data_file is not None else 0)
        ),
        autoclear_features=QCOW2_AUTOCLEAR_DATA_FILE_RAW if opts.data_file_raw else 0,
        refcount_order=opts.refcount_order,
        header_length=header_length if v3 else V2_HEADER_LENGTH,
        compression_type=opts.compression_type,
        # qcow2.lazy-refcounts.create: compatible bit 0.
        compatible_features=QCOW2_COMPAT_LAZY_REFCOUNTS if opts.lazy_refcounts else 0,
    )
    cluster0 = bytearray(cs)
    packed = pack_header(header) + ext_bytes + name
    cluster0[: len(packed)] = packed
    reftable = bytearray(cs)
    reftable[:8] = (2 * cs).to_bytes(8, "big")
    refblock = bytearray(cs)
    for index in range(3):
        set_block_entry(refblock, index, opts.refcount_order, 1)
    storage.resize(0)
    storage.write(bytes(cluster0) + bytes(reftable) + bytes(refblock), 0)

"""``create_image``: new qcow2 (v2/v3) and raw images.

A qcow2 image starts as QEMU's minimal layout (header, a one-cluster refcount table, one
refcount block) with an empty L1 table; growing it to the requested size then goes through
the normal resize path, which allocates the L1 table (and refcount blocks or a larger
refcount table where the size needs them) with the same allocator every write uses.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass

from pyimago.reference._errors import (
    ImageNotFoundError,
    InvalidRequestError,
    UnsupportedError,
    UnsupportedFeatureError,
)
from pyimago.reference._prealloc import PreallocateMode
from pyimago.reference._storage import Storage

from ._codec import encode_refblock, refblock_typecode
from ._header import (
    AUTOCLEAR_DATA_FILE_RAW,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    MAX_L1_ENTRIES,
    Extension,
    Features,
    Header,
    Incompat,
    Span,
    encode_extensions,
)
from ._qcow2 import Qcow2Layer
from ._storage import FastFileStorage

__all__ = ["create_image"]

#: ``preallocation`` names (as qemu-img spells them) and what each one does.
_PREALLOC = {
    "off": PreallocateMode.NONE,
    "metadata": PreallocateMode.FORMAT_ALLOCATE,
    "falloc": PreallocateMode.FULL_ALLOCATE,
    "full": PreallocateMode.WRITE_DATA,
}
#: qemu-img options this implementation knows it does not support.
_UNSUPPORTED = frozenset({"encryption", "encrypt"})
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def _invalid(msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"create_image: {msg}")


@dataclass(frozen=True, slots=True)
class _Qcow2Options:
    """qcow2 creation options, checked."""

    cluster_bits: int
    version: int
    refcount_order: int
    backing_file: str | None
    backing_fmt: str | None
    zstd: bool
    extended_l2: bool = False
    data_file: str | None = None
    data_file_raw: bool = False
    lazy_refcounts: bool = False

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (extended ones take 16 bytes)."""
        return (1 << self.cluster_bits) // (16 if self.extended_l2 else 8)


def _qcow2_options(opts: dict[str, object]) -> _Qcow2Options:
    cs = opts.pop("cluster_size", 65536)
    if type(cs) is not int or not 512 <= cs <= 2 << 20 or cs & (cs - 1):
        raise _invalid(f"cluster_size must be a power of two from 512 to 2 MiB, not {cs!r}")
    compat = opts.pop("compat", "1.1")
    if compat not in _COMPAT:
        raise _invalid(f"compat must be '0.10' or '1.1', not {compat!r}")
    version = _COMPAT[str(compat)]
    bits = opts.pop("refcount_bits", 16)
    if type(bits) is not int or bits not in (1, 2, 4, 8, 16, 32, 64):
        raise _invalid(f"refcount_bits must be a power of two from 1 to 64, not {bits!r}")
    if version == 2 and bits != 16:
        raise _invalid(f"compat=0.10 images have 16-bit refcounts, not {bits}")
    ctype = opts.pop("compression_type", "zlib")
    if ctype not in ("zlib", "zstd"):
        raise _invalid(f"compression_type must be 'zlib' or 'zstd', not {ctype!r}")
    if ctype == "zstd" and version == 2:
        raise _invalid("zstd compression needs compat 1.1 (qcow2 v3)")
    name = opts.pop("backing_file", None)
    if name is not None and (not isinstance(name, str) or not name):
        raise _invalid(f"backing_file must be a non-empty str, not {name!r}")
    fmt = opts.pop("backing_fmt", None)
    if fmt is not None:
        if fmt not in ("qcow2", "raw"):
            raise UnsupportedFeatureError(
                f"create_image: backing_fmt {fmt!r} is not supported (qcow2, raw)",
                feature=f"format {fmt}",
            )
        if name is None:
            raise _invalid("backing_fmt given without backing_file")
    fmt_name = None if fmt is None else str(fmt)
    ext, dname, raw = _feature_options(opts, version, cs, name)
    lazy = _flag(opts, "lazy_refcounts")
    if lazy and version == 2:
        # qemu-img: "Lazy refcounts only supported with compatibility level 1.1 and above"
        raise _invalid("lazy_refcounts needs compat 1.1 (qcow2 v3)")
    return _Qcow2Options(
        cs.bit_length() - 1, version, bits.bit_length() - 1, name, fmt_name, ctype == "zstd",
        ext, dname, raw, lazy,
    )


def _flag(opts: dict[str, object], key: str) -> bool:
    value = opts.pop(key, False)
    if type(value) is not bool:
        raise _invalid(f"{key} must be a bool, not {value!r}")
    return value


def _feature_options(
    opts: dict[str, object], version: int, cs: int, backing: str | None
) -> tuple[bool, str | None, bool]:
    """``extended_l2``, ``data_file``, ``data_file_raw``, checked as qemu-img checks them
    (block/qcow2.c, qcow2_co_create)."""
    ext = _flag(opts, "extended_l2")
    dname = opts.pop("data_file", None)
    raw = _flag(opts, "data_file_raw")
    if ext and version < 3:
        # create.qcow2.extended-l2: "Extended L2 entries are only supported with
        # compatibility level 1.1 and above"
        raise _invalid("extended_l2 needs compat 1.1 (qcow2 v3)")
    if ext and cs < 16384:
        # "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        raise _invalid(f"extended_l2 needs a cluster_size of at least 16384, not {cs}")
    if dname is not None:
        if not isinstance(dname, str) or not dname or "\0" in dname:
            raise _invalid(f"data_file must be a non-empty str, not {dname!r}")
        if version < 3:
            # "External data files are only supported with compatibility level 1.1 and above"
            raise _invalid("data_file needs compat 1.1 (qcow2 v3)")
    if raw and dname is None:
        # "data-file-raw requires data-file"
        raise _invalid("data_file_raw needs data_file")
    if raw and backing is not None:
        # "Backing file and data-file-raw cannot be used at the same time"
        raise _invalid("data_file_raw cannot be combined with a backing file")
    return ext, dname, raw


def create_image(
    target: str | os.PathLike[str] | Storage,
    size: int | None,
    *,
    format: str = "qcow2",
    unsafe: bool = False,
    **options: object,
) -> None:
    """Create a new image of ``size`` bytes; options are named as ``qemu-img create -o``.

    qcow2: ``cluster_size`` (512..2 MiB, default 65536), ``compat`` ("0.10" or "1.1"),
    ``refcount_bits`` (1..64, default 16), ``backing_file``, ``backing_fmt``,
    ``preallocation`` ("off", "metadata", "falloc", "full"; only "off" with a backing
    file, as qemu-img), ``compression_type`` ("zlib", "zstd"), ``lazy_refcounts`` (bool,
    compat 1.1), ``extended_l2`` (bool: 32 subclusters per cluster, clusters of 16 KiB or
    more), ``data_file`` (guest data in that file, its name relative to the image's folder;
    created or emptied) and ``data_file_raw`` (bool: the data file is kept the raw disk).
    raw takes ``preallocation`` only.  ``size`` may be None for a qcow2 image with a backing
    file: the backing file's size (rounded up to 512) is used.  A file image's backing file
    is opened first, as
    qemu-img does, so a missing one is an error (create.backing.checked) unless
    ``unsafe=True`` (qemu-img ``create -u``; a size is then required).  A file held by
    another process (QEMU-compatible locks) is left untouched: ImageInUseError.
    """
    if type(unsafe) is not bool:
        raise _invalid(f"unsafe must be a bool, not {unsafe!r}")
    if format not in ("qcow2", "raw"):
        raise UnsupportedFeatureError(
            f"create_image: format {format!r} is not supported (qcow2, raw)",
            feature=f"format {format}",
        )
    wanted = options.pop("preallocation", "off")
    if wanted not in _PREALLOC:
        raise _invalid(f"preallocation must be one of {sorted(_PREALLOC)}, not {wanted!r}")
    prealloc = _PREALLOC[str(wanted)]
    qcow2 = _qcow2_options(options) if format == "qcow2" else None
    if options:
        unknown = sorted(options)
        if _UNSUPPORTED.intersection(unknown):
            raise UnsupportedError(f"create_image: unsupported option(s) {unknown}")
        raise _invalid(f"unknown option(s) for {format}: {unknown}")
    if (qcow2 is not None and qcow2.backing_file is not None and wanted != "off"
            and not qcow2.extended_l2):
        # As qemu-img: preallocated clusters would hide the backing file ("Backing file and
        # preallocation can only be used at the same time if extended_l2 is on": extended
        # L2 preallocation allocates no subcluster).
        raise _invalid(f"preallocation={wanted!r} cannot be combined with a backing file")
    if qcow2 is not None and qcow2.data_file_raw and prealloc is PreallocateMode.NONE:
        # qemu-img maps a raw data file whole: every cluster to its own offset in it.
        prealloc = PreallocateMode.FORMAT_ALLOCATE
    named = qcow2.backing_file if qcow2 is not None else None
    if named is None:
        if size is None:
            raise _invalid(f"size is required for {format} images without a backing file")
    elif unsafe:
        if size is None:
            raise _invalid("unsafe=True needs a size: the backing file is not opened")
    elif size is None or isinstance(target, (str, os.PathLike)):
        # In a Storage object the name has no folder to resolve against: checked only when
        # the size is taken from it.
        assert qcow2 is not None
        from_backing = _backing_size(target, named, qcow2.backing_fmt)
        size = from_backing if size is None else size
    if type(size) is not int or size < 0:
        raise _invalid(f"size must be a non-negative int, not {size!r}")
    if qcow2 is not None:
        if size % 512:
            raise _invalid(f"qcow2 size {size} is not a multiple of 512")
        cs = 1 << qcow2.cluster_bits
        if -(-size // (cs * qcow2.l2_entries)) > MAX_L1_ENTRIES:
            raise _invalid(f"size {size} needs too large an L1 table for cluster_size {cs}")
    first_cluster = _cluster0(qcow2) if qcow2 is not None else b""
    owned = isinstance(target, (str, os.PathLike))
    data_path = _data_file_path(target, qcow2.data_file) if qcow2 is not None else None
    storage = _fresh_storage(target)
    data: Storage | None = None
    try:
        storage.resize(0)
        if qcow2 is None:
            storage.resize(size, prealloc)
        else:
            if data_path is not None:
                # As qemu-img: the data file is created (or emptied), then sized with the disk.
                data = _fresh_storage(data_path)
                data.resize(0)
            _lay_out(storage, qcow2, first_cluster, size, prealloc, data)
            if data is not None:
                data.flush()
                data.sync()
        storage.flush()
        # create.durable: as bdrv_create's close flushes to disk.
        storage.sync()
    finally:
        try:
            if data is not None:
                data.close()
        finally:
            if owned:
                storage.close()


def _data_file_path(target: object, name: str | None) -> str | None:
    """Where the data file named ``name`` lies: relative to the image's folder, like a
    backing file (qcow2.data-file.name)."""
    if name is None or os.path.isabs(name):
        return name
    if not isinstance(target, (str, os.PathLike)):
        raise _invalid(
            f"data_file {name!r} is relative, and an image in a Storage has no folder: "
            "give an absolute path"
        )
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(target))), name)


def _cluster0(o: _Qcow2Options) -> bytes:
    cs = 1 << o.cluster_bits
    exts = [Extension(EXT_BACKING_FORMAT, o.backing_fmt.encode())] if o.backing_fmt else []
    if o.data_file is not None:
        exts.append(Extension(EXT_DATA_FILE, o.data_file.encode("utf-8", "surrogateescape")))
    incompat = (
        (Incompat.COMPRESSION if o.zstd else 0)
        | (Incompat.EXTL2 if o.extended_l2 else 0)
        | (Incompat.DATA_FILE if o.data_file is not None else 0)
    )
    tail = encode_extensions(exts) if exts or o.version == 3 else b""
    name = o.backing_file.encode("utf-8", "surrogateescape") if o.backing_file else b""
    if len(name) > 1023:
        raise _invalid(f"the backing file name has {len(name)} bytes; at most 1023 fit")
    hlen = 112 if o.version == 3 else 72
    if hlen + len(tail) + len(name) > cs:
        raise _invalid(f"header, extensions and backing file name overflow a {cs}-byte cluster")
    hdr = Header(
        version=o.version,
        cluster_bits=o.cluster_bits,
        size=0,
        l1=Span(0, 0),
        reftable=Span(cs, 1),
        snapshots=Span(0, 0),
        backing=Span(hlen + len(tail) if name else 0, len(name)),
        features=Features(
            incompatible=incompat,
            # Compatible bit 0: lazy refcounts (pyimago.fast still updates them eagerly).
            compatible=1 if o.lazy_refcounts else 0,
            autoclear=AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0,
        ),
        refcount_order=o.refcount_order,
        header_length=hlen,
        compression_type=1 if o.zstd else 0,
    )
    return (hdr.to_bytes() + tail + name).ljust(cs, b"\0")


def _lay_out(
    storage: Storage,
    o: _Qcow2Options,
    cluster0: bytes,
    size: int,
    prealloc: PreallocateMode,
    data: Storage | None = None,
) -> None:
    """Clusters 0-2 (header, refcount table, one refcount block counting all three), then
    the rest through the layer's own resize."""
    cs = 1 << o.cluster_bits
    width = 1 << o.refcount_order
    code = refblock_typecode(width)
    counts = array(code, bytes(array(code).itemsize * (cs * 8 // width)))
    counts[0:3] = array(code, [1, 1, 1])
    reftable = (2 * cs).to_bytes(8, "big").ljust(cs, b"\0")
    storage.write(cluster0 + reftable + encode_refblock(counts, width), 0)
    layer = Qcow2Layer(storage, writable=True)
    if data is not None:
        layer.set_data_file(data)
    try:
        if size:
            layer.resize_grow(size, prealloc)
        else:
            # Even an empty disk gets an L1 table, as QEMU's do.
            layer.grow_l1(1)
        layer.flush()
    finally:
        # The storage belongs to the caller of create_image, not to the layer.
        layer.detach()


def _backing_size(target: object, name: str, fmt: str | None) -> int:
    from ._open import open_image

    path = name
    if isinstance(target, (str, os.PathLike)) and not os.path.isabs(name):
        path = os.path.join(os.path.dirname(os.path.abspath(os.fspath(target))), name)
    try:
        # force_share as qemu-img create: the backing may be in use (external snapshots).
        with open_image(path, format=fmt, backing=None, force_share=True) as backing:
            return -(-backing.size // 512) * 512
    except ImageNotFoundError as exc:
        raise ImageNotFoundError(
            f"create_image: backing file {path} does not exist (qemu-img refuses it too; "
            "unsafe=True creates the image without opening it)",
            filename=path,
        ) from exc


def _fresh_storage(target: str | os.PathLike[str] | Storage) -> Storage:
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        # No O_TRUNC: the caller truncates once the file is locked and found unused.
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
        except OSError:
            # FastFileStorage names what is wrong with the path in a pyimago error.
            FastFileStorage(path, writable=True, locking="off")
            raise
        return FastFileStorage(path, writable=True)
    if not hasattr(target, "write") or not hasattr(target, "resize"):
        raise _invalid(f"not a path or Storage: {target!r}")
    if not target.writable:
        raise _invalid(f"storage {target} is read-only")
    return target

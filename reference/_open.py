"""``open_image`` and ``create_image``: the entry points of the reference implementation."""

from __future__ import annotations

import os
from typing import Final

from ._errors import (
    CorruptImageError,
    ImageNotFoundError,
    InvalidRequestError,
    UnsupportedError,
    UnsupportedFeatureError,
)
from ._prealloc import PreallocateMode
from ._storage import FileStorage, Storage, make_image_file
from .access import FormatAccess
from .backing import ImplicitOpenGate, PermissiveImplicitOpenGate, resolve_backing_path
from .locking import check_locking_options
from .probe import PROBE_BYTES, probe_sector
from .qcow2.constants import COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD, QCOW_MAGIC
from .qcow2.create import Qcow2CreateOptions, write_initial_layout
from .qcow2.driver import DEFAULT_L2_CACHE_TABLES, Qcow2Driver
from .raw import RawDriver

__all__ = ["AUTO", "MAX_BACKING_CHAIN", "create_image", "open_image", "probe_format"]

FORMATS = ("qcow2", "raw")
MAX_BACKING_CHAIN = 64


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


#: Default of ``open_image(backing=...)``: open what the image names.
AUTO: Final = _Auto()

PathOrStorage = str | os.PathLike[str] | Storage

_PREALLOCATION = {
    "off": PreallocateMode.NONE,
    "metadata": PreallocateMode.FORMAT_ALLOCATE,
    "falloc": PreallocateMode.FULL_ALLOCATE,
    "full": PreallocateMode.WRITE_DATA,
}
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_COMPRESSION = {"zlib": COMPRESSION_TYPE_ZLIB, "zstd": COMPRESSION_TYPE_ZSTD}
_UNSUPPORTED_OPTIONS = ("encryption", "encrypt")


def probe_format(storage: Storage) -> str:
    """backing.probe: qcow2 when the storage starts with the qcow2 magic, raw otherwise.

    raw.probe.other-formats: a first sector QEMU would probe as another format (vmdk, vdi,
    ...) is not taken for raw: pyimago does not read those formats, so it says so.
    """
    first = storage.read(0, PROBE_BYTES)
    if int.from_bytes(first[:4], "big") == QCOW_MAGIC:
        return "qcow2"
    other = probe_sector(first)
    if other != "raw":
        raise UnsupportedFeatureError(
            f"{storage} probes as {other} (as QEMU probes it), a format pyimago does not "
            "support; pass format='raw' to open it as raw anyway",
            feature=f"format {other}",
        )
    return "raw"


def _check_format(fmt: object, what: str) -> str:
    if fmt not in FORMATS:
        raise UnsupportedFeatureError(f"{what} {fmt!r} is not supported (qcow2, raw)",
                                      feature=f"format {fmt}")
    assert isinstance(fmt, str)
    return fmt


def open_image(
    target: PathOrStorage,
    *,
    writable: bool = False,
    format: str | None = None,
    gate: ImplicitOpenGate | None = None,
    backing: FormatAccess | _Auto | None = AUTO,
    l2_cache_tables: int = DEFAULT_L2_CACHE_TABLES,
    snapshot: str | None = None,
    data_file: PathOrStorage | _Auto = AUTO,
    locking: str = "auto",
    force_share: bool = False,
) -> FormatAccess:
    """Open a disk image (a path or a Storage object) and its backing chain.

    The format is probed unless given; a raw image opened writable without ``format=``
    refuses writes that would make its first sector probe as another format (as QEMU does;
    ``format="raw"`` lifts this).  The backing file the image names is opened read-only
    (relative names resolve against the overlay's folder; the backing-format extension is
    honoured), after ``gate`` allows it.  For a Storage object that names a backing file,
    pass ``backing=`` (a FormatAccess, or None for no backing) explicitly.

    ``snapshot`` (a qcow2 internal snapshot's ID or name) opens that snapshot read-only.
    A qcow2 image with an external data file finds it as it finds a backing file (the name
    in its header, through ``gate``), unless ``data_file=`` gives it (a path or Storage).

    Image files (and backing files) are locked as QEMU locks them: ``locking="auto"`` (lock
    where the OS can), ``"on"`` or ``"off"``; ``force_share=True`` (read-only opens only,
    qemu-img's ``-U``) opens an image another process holds writable.  A conflicting open
    raises :class:`ImageInUseError`.
    """
    check_locking_options(locking, force_share, writable)
    if snapshot is not None and not isinstance(snapshot, str):
        raise InvalidRequestError(f"snapshot must be a str (an ID or name), not {snapshot!r}")
    return _open(target, writable=writable, format=format, gate=gate, backing=backing,
                 l2_cache_tables=l2_cache_tables, chain=(),
                 lock=(locking, force_share), snapshot=snapshot, data_file=data_file)


def _open(
    target: PathOrStorage,
    *,
    writable: bool,
    format: str | None,
    gate: ImplicitOpenGate | None,
    backing: FormatAccess | _Auto | None,
    l2_cache_tables: int,
    chain: tuple[str, ...],
    lock: tuple[str, bool],
    snapshot: str | None = None,
    data_file: PathOrStorage | _Auto = AUTO,
) -> FormatAccess:
    if format is not None:
        _check_format(format, "format")
    path: str | None
    if isinstance(target, (str, os.PathLike)):
        storage: Storage = FileStorage(target, writable=writable, locking=lock[0],
                                       force_share=lock[1])
        path = storage.name
    elif isinstance(target, Storage):
        path = getattr(target, "path", None)
        storage = target
    else:
        raise InvalidRequestError(f"open_image: not a path or Storage: {target!r}")
    opened: Qcow2Driver | None = None
    try:
        fmt = format or probe_format(storage)
        if fmt == "raw":
            if snapshot is not None or not isinstance(data_file, _Auto):
                raise InvalidRequestError(
                    "snapshot= and data_file= only apply to qcow2 images, not raw"
                )
            # raw.probed.block0: only a probed format restricts block 0.
            return FormatAccess(RawDriver(storage, writable=writable, probed=format is None))
        driver = Qcow2Driver(storage, writable=writable, l2_cache_tables=l2_cache_tables,
                             snapshot=snapshot)
        opened = driver
        _attach_data_file(driver, path, gate, data_file, lock)
        if not isinstance(backing, _Auto):
            driver.set_backing(backing, owned=False)
        elif driver.backing_file:
            driver.set_backing(
                _open_backing(driver, path, gate, l2_cache_tables, chain, lock), owned=True
            )
        return FormatAccess(driver)
    except BaseException:
        if opened is not None:
            opened.close_data_file()
        if path is not None and isinstance(target, (str, os.PathLike)):
            storage.close()
        raise


def _attach_data_file(
    driver: Qcow2Driver,
    image_path: str | None,
    gate: ImplicitOpenGate | None,
    given: PathOrStorage | _Auto,
    lock: tuple[str, bool],
) -> None:
    """qcow2.data-file.open: find the external data file like a backing file."""
    if not driver.header.has_data_file:
        if not isinstance(given, _Auto):
            raise InvalidRequestError(
                f"{driver} has no external data file (incompatible bit 2 clear): data_file= "
                "does not apply"
            )
        return
    if isinstance(given, Storage):
        driver.set_data_file(given, owned=False)
        return
    if isinstance(given, (str, os.PathLike)):
        # Named by the caller: no gate, as for the image itself.
        path = os.fspath(given)
    else:
        name = driver.data_file
        if name is None:
            raise InvalidRequestError(
                f"{driver} uses an external data file but does not name it: pass data_file="
            )
        if image_path is None and not os.path.isabs(name):
            raise InvalidRequestError(
                f"{driver} names data file {name!r} but was opened from a storage object: "
                "pass data_file= (a path or Storage) to open_image"
            )
        path = resolve_backing_path(name, image_path)
        (gate or PermissiveImplicitOpenGate()).check(
            path, format="raw", writable=driver.writable, referrer=str(driver)
        )
    try:
        storage = FileStorage(path, writable=driver.writable, locking=lock[0],
                              force_share=lock[1])
    except FileNotFoundError as exc:
        raise ImageNotFoundError(
            f"data file {path!r} of {image_path or driver} not found", filename=path
        ) from exc
    driver.set_data_file(storage, owned=True)


def _open_backing(
    driver: Qcow2Driver,
    overlay_path: str | None,
    gate: ImplicitOpenGate | None,
    l2_cache_tables: int,
    chain: tuple[str, ...],
    lock: tuple[str, bool],
) -> FormatAccess:
    name = driver.backing_file
    assert name is not None
    if overlay_path is None:
        raise InvalidRequestError(
            f"{driver} names backing file {name!r} but was opened from a storage object: "
            "pass backing= (a FormatAccess, or None) to open_image"
        )
    path = resolve_backing_path(name, overlay_path)
    real = os.path.realpath(path)
    here = os.path.realpath(overlay_path)
    # backing.loop: an image that (indirectly) backs itself would recurse forever.
    if real in chain or real == here:
        raise CorruptImageError(f"backing chain loop: {overlay_path} -> ... -> {path}")
    if len(chain) >= MAX_BACKING_CHAIN:
        raise CorruptImageError(f"backing chain deeper than {MAX_BACKING_CHAIN} at {path}")
    fmt = driver.backing_format
    if fmt is not None:
        fmt = _check_format(fmt, f"{driver}: backing format")
    (gate or PermissiveImplicitOpenGate()).check(
        path, format=fmt, writable=False, referrer=str(driver)
    )
    try:
        # storage.lock.backing: backing files are locked as read-only opens.
        return _open(path, writable=False, format=fmt, gate=gate, backing=AUTO,
                     l2_cache_tables=l2_cache_tables, chain=(*chain, here), lock=lock)
    except ImageNotFoundError as exc:
        if exc.filename != path:
            raise
        raise ImageNotFoundError(
            f"backing file {path} of {overlay_path} does not exist", filename=path
        ) from exc


def _power_of_two(value: object, what: str, lo: int, hi: int) -> int:
    if (not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi
            or value & (value - 1)):
        raise InvalidRequestError(f"{what} must be a power of two in [{lo}, {hi}], not {value!r}")
    return value


def create_image(
    target: PathOrStorage,
    size: int | None,
    *,
    format: str = "qcow2",
    unsafe: bool = False,
    **options: object,
) -> None:
    """Create an image of ``size`` bytes; options are named as ``qemu-img create -o``.

    qcow2 options: ``cluster_size`` (512..2 MiB, default 65536), ``compat`` ("0.10" or
    "1.1", default "1.1"), ``refcount_bits`` (1..64, default 16), ``backing_file``,
    ``backing_fmt``, ``preallocation`` ("off", "metadata", "falloc", "full"),
    ``compression_type`` ("zlib", "zstd"), ``lazy_refcounts`` (bool, v3 only),
    ``extended_l2`` (bool, v3 only, clusters of 16 KiB or more), ``data_file`` (the external
    data file's name, resolved like a backing file name; the file is created empty) and
    ``data_file_raw`` (bool: the data file stays the raw disk; implies "metadata"
    preallocation).  raw takes ``preallocation`` only.  ``size`` may be None for a qcow2
    image with a backing file: the backing file's size is used.

    For an image created in a file, the backing file must exist and open as ``backing_fmt``
    (create.backing.checked), as qemu-img checks it, unless ``unsafe=True`` (qemu-img
    ``create -u``), which then needs ``size``; in a Storage object it is opened only when
    ``size`` is None.  An image file another process holds is not touched (ImageInUseError).
    """
    fmt = _check_format(format, "format")
    if not isinstance(unsafe, bool):
        raise InvalidRequestError(f"create_image: unsafe must be a bool, not {unsafe!r}")
    prealloc_name = options.pop("preallocation", "off")
    if prealloc_name not in _PREALLOCATION:
        raise InvalidRequestError(
            f"preallocation must be one of {sorted(_PREALLOCATION)}, not {prealloc_name!r}"
        )
    prealloc = _PREALLOCATION[str(prealloc_name)]
    qopts = _qcow2_options(options) if fmt == "qcow2" else None
    has_backing = qopts is not None and qopts.backing_file is not None
    if has_backing and prealloc is not PreallocateMode.NONE and not (
        qopts is not None and qopts.extended_l2
    ):
        # create.preallocation: as qemu-img, preallocation would hide the backing file
        # ("Backing file and preallocation can only be used at the same time if extended_l2
        # is on": preallocated subclusters stay unallocated, reading from the backing file).
        raise InvalidRequestError(
            f"create_image: preallocation={prealloc_name!r} cannot be combined with a "
            "backing_file (only 'off') unless extended_l2 is on"
        )
    if qopts is not None and qopts.data_file_raw and prealloc is PreallocateMode.NONE:
        # create.data-file: as qemu-img, a raw data file is mapped whole
        # (preallocation=metadata), so that the tables read as the data file does.
        prealloc = PreallocateMode.FORMAT_ALLOCATE
    if options:
        bad = sorted(options)
        if any(b in _UNSUPPORTED_OPTIONS for b in bad):
            raise UnsupportedError(f"create_image: unsupported option(s) {bad}")
        raise InvalidRequestError(f"create_image: unknown option(s) for {fmt}: {bad}")
    in_file = isinstance(target, (str, os.PathLike))
    # create.backing.checked: an image made in a Storage object has no folder for the name
    # to resolve against, so its backing is opened only when the size must come from it.
    if has_backing and not unsafe and (in_file or size is None):
        assert qopts is not None
        backing_size: int | None = _backing_size(target, qopts)
    elif size is None and has_backing:
        # As qemu-img create -u: "Image creation needs a size parameter".
        raise InvalidRequestError("create_image: unsafe=True needs a size (the backing file "
                                  "is not opened)")
    else:
        backing_size = None
    if size is None:
        if backing_size is None:
            raise InvalidRequestError("create_image: size is required without a backing_file")
        size = backing_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequestError(f"create_image: size must be a non-negative int, not {size!r}")
    if fmt == "qcow2" and size % 512:
        raise InvalidRequestError(f"create_image: qcow2 size {size} is not a multiple of 512")

    if isinstance(target, (str, os.PathLike)):
        # Created without truncation: the file is locked (and found unused) before any
        # byte of it changes.
        make_image_file(target)
        storage: Storage = FileStorage(target, writable=True)
        owned = True
    elif isinstance(target, Storage):
        storage, owned = target, False
    else:
        raise InvalidRequestError(f"create_image: not a path or Storage: {target!r}")
    try:
        if fmt == "raw":
            storage.resize(0)
            access = FormatAccess(RawDriver(storage, writable=True))
        else:
            assert qopts is not None
            data_storage = _create_data_file(target, qopts)
            write_initial_layout(storage, qopts)
            driver = Qcow2Driver(storage, writable=True)
            if data_storage is not None:
                driver.set_data_file(data_storage, owned=True)
            # The backing image is not needed to lay out the overlay (and may not exist yet).
            driver.set_backing(None)
            access = FormatAccess(driver)
        try:
            access.resize_grow(size, prealloc)
            access.flush()
            # create.durable: as bdrv_create's close flushes to disk.
            access.sync()
        finally:
            if isinstance(access.driver, Qcow2Driver):
                access.driver.close_data_file()
    finally:
        if owned:
            storage.close()


def _create_data_file(target: PathOrStorage, qopts: Qcow2CreateOptions) -> Storage | None:
    """create.data-file: the external data file is created empty (as qemu-img creates it,
    truncating an existing file), named relative to the image's folder like a backing file."""
    if qopts.data_file is None:
        return None
    image = os.fspath(target) if isinstance(target, (str, os.PathLike)) else None
    if image is None and not os.path.isabs(qopts.data_file):
        raise InvalidRequestError(
            f"create_image: data_file {qopts.data_file!r} is relative, but the image is a "
            "storage object with no folder to resolve it against: give an absolute path"
        )
    path = resolve_backing_path(qopts.data_file, image)
    make_image_file(path)
    data = FileStorage(path, writable=True)
    try:
        data.resize(0)
    except BaseException:
        data.close()
        raise
    return data


def _qcow2_options(options: dict[str, object]) -> Qcow2CreateOptions:
    cluster_size = _power_of_two(options.pop("cluster_size", 65536), "cluster_size",
                                 512, 2 << 20)
    compat = options.pop("compat", "1.1")
    if compat not in _COMPAT:
        raise InvalidRequestError(f"compat must be '0.10' or '1.1', not {compat!r}")
    version = _COMPAT[str(compat)]
    refcount_bits = _power_of_two(options.pop("refcount_bits", 16), "refcount_bits", 1, 64)
    if version == 2 and refcount_bits != 16:
        raise InvalidRequestError(f"compat=0.10 requires refcount_bits=16, not {refcount_bits}")
    backing_file = options.pop("backing_file", None)
    if backing_file is not None and (not isinstance(backing_file, str) or not backing_file):
        raise InvalidRequestError(f"backing_file must be a non-empty str, not {backing_file!r}")
    backing_fmt = options.pop("backing_fmt", None)
    if backing_fmt is not None:
        backing_fmt = _check_format(backing_fmt, "backing_fmt")
        if backing_file is None:
            raise InvalidRequestError("backing_fmt given without backing_file")
    compression = options.pop("compression_type", "zlib")
    if compression not in _COMPRESSION:
        raise InvalidRequestError(f"compression_type must be zlib or zstd, not {compression!r}")
    if version == 2 and compression != "zlib":
        raise InvalidRequestError("compat=0.10 supports only compression_type=zlib")
    lazy_refcounts = options.pop("lazy_refcounts", False)
    if not isinstance(lazy_refcounts, bool):
        raise InvalidRequestError(f"lazy_refcounts must be a bool, not {lazy_refcounts!r}")
    if lazy_refcounts and version == 2:
        # qemu-img: "Lazy refcounts only supported with compatibility level 1.1 and above".
        raise InvalidRequestError("lazy_refcounts=True needs compat=1.1 (qcow2 v3)")
    extended_l2 = _bool_option(options.pop("extended_l2", False), "extended_l2")
    if extended_l2 and version < 3:
        # qemu-img: "Extended L2 entries are only supported with compatibility level 1.1 and
        # above".
        raise InvalidRequestError(
            f"create_image: extended_l2 needs compat=1.1, not compat={compat!r}")
    if extended_l2 and cluster_size < 16384:
        # qcow2.extended-l2.min-cluster: subclusters of at least 512 bytes.
        raise InvalidRequestError(
            f"create_image: extended_l2 needs a cluster_size of at least 16384 bytes, not "
            f"{cluster_size}"
        )
    data_file = options.pop("data_file", None)
    if data_file is not None and (not isinstance(data_file, str) or not data_file
                                  or "\0" in data_file):
        raise InvalidRequestError(
            f"create_image: data_file must be a non-empty str, not {data_file!r}")
    data_file_raw = _bool_option(options.pop("data_file_raw", False), "data_file_raw")
    if data_file_raw and data_file is None:
        raise InvalidRequestError("create_image: data_file_raw=True requires data_file (qemu-img: "
                                  "'data-file-raw requires data-file')")
    if data_file_raw and backing_file is not None:
        raise InvalidRequestError(
            f"create_image: data_file_raw=True cannot be combined with backing_file "
            f"{backing_file!r}"
        )
    if data_file is not None and version < 3:
        raise InvalidRequestError(
            f"create_image: data_file {data_file!r} needs compat=1.1, not compat={compat!r}"
        )
    return Qcow2CreateOptions(
        lazy_refcounts=lazy_refcounts,
        cluster_bits=cluster_size.bit_length() - 1,
        version=version,
        refcount_order=refcount_bits.bit_length() - 1,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        compression_type=_COMPRESSION[str(compression)],
        extended_l2=extended_l2,
        data_file=data_file,
        data_file_raw=data_file_raw,
    )


def _bool_option(value: object, what: str) -> bool:
    """A boolean option (create.qcow2.extended-l2: "the flag must be a bool")."""
    if isinstance(value, bool):
        return value
    raise InvalidRequestError(f"create_image: {what} must be a bool, not {value!r}")


def _backing_size(target: PathOrStorage, qopts: Qcow2CreateOptions) -> int:
    """create.backing.checked: open the backing file as qemu-img does; its size, rounded
    up to whole sectors."""
    assert qopts.backing_file is not None
    overlay = os.fspath(target) if isinstance(target, (str, os.PathLike)) else None
    path = resolve_backing_path(qopts.backing_file, overlay)
    try:
        # Shared, as qemu-img create opens it (force-share): an overlay of an image in use
        # (an external snapshot) may be made while its user runs.
        with open_image(path, format=qopts.backing_fmt, backing=None,
                        force_share=True) as backing:
            size = backing.size
    except ImageNotFoundError as exc:
        raise ImageNotFoundError(
            f"create_image: could not open backing image {path}: it does not exist (pass "
            "unsafe=True to create the image anyway, as qemu-img create -u)",
            filename=path,
        ) from exc
    return -(-size // 512) * 512

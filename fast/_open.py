"""``open_image``: probe the format, open the layer and its backing chain."""

from __future__ import annotations

import os
from typing import Any, Protocol

from pyimago.reference._errors import (
    CorruptImageError,
    ImageNotFoundError,
    InvalidRequestError,
    UnsupportedFeatureError,
)
from pyimago.reference._open import AUTO as REFERENCE_AUTO
from pyimago.reference._storage import Storage

from ._access import FormatAccess
from ._dirty import repair_if_dirty
from ._header import MAGIC
from ._lock import validate
from ._probe import SECTOR, claimed_by
from ._qcow2 import DEFAULT_CACHE_BYTES, Qcow2Layer
from ._raw import RawLayer
from ._storage import FastFileStorage

__all__ = ["AUTO", "MAX_CHAIN_DEPTH", "Gate", "open_image", "probe_format"]

#: Deeper chains are refused (a loop of backing names would otherwise never end).
MAX_CHAIN_DEPTH = 64


#: "Open the backing file the image names": the reference's sentinel itself, so that a
#: caller passing ``pyimago.reference.AUTO`` to either implementation means the same.
AUTO: Any = REFERENCE_AUTO


class Gate(Protocol):
    """Decides whether a file an image refers to may be opened (raises if not)."""

    def check(self, path: str, *, format: str | None, writable: bool, referrer: str) -> None: ...


def _resolve(name: str, overlay: str | None) -> str:
    # backing.resolve-relative: relative to the overlay's folder, not the working directory.
    if os.path.isabs(name) or overlay is None:
        return name
    return os.path.join(os.path.dirname(os.path.abspath(overlay)), name)


def probe_format(storage: Storage) -> str:
    """``"qcow2"`` when the storage starts with the qcow2 magic, else ``"raw"``; a first sector
    QEMU would probe as another format raises :class:`UnsupportedFeatureError`."""
    head = storage.read(0, SECTOR)
    if head[:4] == MAGIC:
        return "qcow2"
    # raw.probe.other-formats: what QEMU would open as vmdk, vdi, ... is not raw to us either.
    other = claimed_by(head)
    if other is not None:
        raise UnsupportedFeatureError(
            f"{storage}: its first sector is a {other} header (QEMU's probing); pyimago does "
            "not read that format (format='raw' opens the bytes as raw)",
            feature=f"format {other}",
        )
    return "raw"


def open_image(
    target: str | os.PathLike[str] | Storage,
    *,
    writable: bool = False,
    format: str | None = None,
    gate: Gate | None = None,
    backing: Any = AUTO,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    l2_cache_tables: int | None = None,
    use_mmap: bool = True,
    snapshot: str | None = None,
    data_file: Any = AUTO,
    locking: str = "auto",
    force_share: bool = False,
) -> FormatAccess:
    """Open an image (qcow2 or raw, probed unless ``format`` says) and its backing chain.

    Backing files are opened read-only; relative names resolve against the overlay's
    folder; the image's backing-format extension is honoured (a qcow2 image whose backing
    is declared raw is read as raw).  ``gate`` (with a ``check`` method) is asked before any
    backing file is opened.  For an image in a Storage object, pass ``backing`` (a
    FormatAccess or None) when the image names a backing file.  ``cache_bytes`` bounds the
    metadata cache of each qcow2 layer; ``l2_cache_tables`` instead caps its L2 cache at that
    many tables (tests use it to make eviction happen).  ``use_mmap=False`` reads files with
    ``preadv`` only: a mapped file that another process truncates raises SIGBUS on access,
    which no Python code can catch.

    ``snapshot`` (an internal snapshot's ID or name) opens that snapshot read-only.  An
    image with an external data file finds it as it finds a backing file (its header's
    name, relative to the image, asking ``gate``), unless ``data_file`` (a path or Storage)
    gives it.

    A raw image opened writable without ``format=`` keeps block 0 from becoming another
    format's header (as QEMU).  Files are locked as QEMU locks them (``locking`` "auto",
    "on" or "off"; ``force_share=True`` for read-only opens is qemu-img's ``-U``); a
    conflicting holder makes the open fail with ImageInUseError.
    """
    validate(locking, force_share, writable)
    if snapshot is not None and type(snapshot) is not str:
        raise InvalidRequestError(f"snapshot must be a str (an ID or name), not {snapshot!r}")
    if l2_cache_tables is not None and (type(l2_cache_tables) is not int or l2_cache_tables < 1):
        raise InvalidRequestError(f"l2_cache_tables must be >= 1, not {l2_cache_tables!r}")
    return _open(
        target,
        writable,
        format,
        gate,
        backing,
        (cache_bytes, l2_cache_tables, use_mmap, locking, force_share),
        set(),
        snapshot,
        data_file,
    )


def _open(
    target: str | os.PathLike[str] | Storage,
    writable: bool,
    fmt: str | None,
    gate: Gate | None,
    backing: Any,
    cache: tuple[int, int | None, bool, str, bool],
    seen: set[str],
    snapshot: str | None = None,
    data_file: Any = AUTO,
) -> FormatAccess:
    if fmt is not None and fmt not in ("qcow2", "raw"):
        raise UnsupportedFeatureError(f"unsupported image format {fmt!r}", feature=f"format {fmt}")
    if type(writable) is not bool:
        raise InvalidRequestError(f"writable must be a bool, not {writable!r}")
    path: str | None
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        storage: Storage = FastFileStorage(
            path, writable=writable, use_mmap=cache[2], locking=cache[3], force_share=cache[4]
        )
        owned = True
    elif not hasattr(target, "readinto") or not hasattr(target, "size"):
        raise InvalidRequestError(f"open_image: not a path or Storage: {target!r}")
    else:
        storage = target
        path = getattr(target, "path", None)
        owned = False
    try:
        kind = fmt or probe_format(storage)
        if kind == "raw":
            if snapshot is not None or data_file is not AUTO:
                raise InvalidRequestError("snapshot= and data_file= apply to qcow2 images only")
            return FormatAccess(RawLayer(storage, writable=writable, probed=fmt is None))
        if writable:
            # qcow2.features.dirty: the refcounts are rebuilt before the first write.
            repair_if_dirty(storage)
        layer = Qcow2Layer(
            storage, writable=writable, cache_bytes=cache[0], l2_cache_tables=cache[1],
            snapshot=snapshot,
        )
        try:
            _data_file(layer, path, gate, data_file, cache)
            if backing is not AUTO:
                if backing is not None and not hasattr(backing, "readinto"):
                    raise InvalidRequestError(
                        f"backing must be a FormatAccess or None: {backing!r}"
                    )
                layer.set_backing(backing, owned=False)
            elif layer.backing_file is not None:
                layer.set_backing(_open_backing(layer, path, gate, cache, seen), owned=True)
        except BaseException:
            if not owned:
                # The caller keeps its storage: do not close it under them.
                layer.backing = None
                layer.close_data_file()
            else:
                layer.close()
            raise
        return FormatAccess(layer)
    except BaseException:
        if owned:
            storage.close()
        raise


def _data_file(
    layer: Qcow2Layer,
    image: str | None,
    gate: Gate | None,
    given: Any,
    cache: tuple[int, int | None, bool, str, bool],
) -> None:
    """Attach the external data file an image needs: ``given``, or the one it names."""
    if not layer.hdr.has_data_file:
        if given is not AUTO:
            raise InvalidRequestError(
                f"{layer} has no external data file (incompatible bit 2): data_file= is wrong"
            )
        return
    if given is not AUTO and not isinstance(given, (str, os.PathLike)):
        if not hasattr(given, "readinto") or not hasattr(given, "size"):
            raise InvalidRequestError(f"data_file must be a path or Storage, not {given!r}")
        layer.set_data_file(given)
        return
    if given is not AUTO:
        dpath = os.fspath(given)
    else:
        name = layer.data_file
        if name is None:
            raise InvalidRequestError(f"{layer} needs an external data file it does not name: "
                                      "pass data_file=")
        if image is None and not os.path.isabs(name):
            raise InvalidRequestError(
                f"{layer} names data file {name!r}: pass data_file= for an image in memory"
            )
        dpath = _resolve(name, image)
        if gate is not None:
            gate.check(dpath, format="raw", writable=layer.writable, referrer=str(layer))
    try:
        layer.set_data_file(
            FastFileStorage(dpath, writable=layer.writable, use_mmap=cache[2],
                            locking=cache[3], force_share=cache[4]),
            owned=True,
        )
    except FileNotFoundError as exc:
        raise ImageNotFoundError(
            f"qcow2: data file {dpath!r} of {image or layer} does not exist", filename=dpath
        ) from exc


def _open_backing(
    layer: Qcow2Layer,
    overlay: str | None,
    gate: Gate | None,
    cache: tuple[int, int | None, bool, str, bool],
    seen: set[str],
) -> FormatAccess:
    name = layer.backing_file
    assert name is not None
    if overlay is None and not os.path.isabs(name):
        raise InvalidRequestError(
            f"{layer} names backing file {name!r}: pass backing= for an image in memory"
        )
    bpath = _resolve(name, overlay)
    real = os.path.realpath(bpath)
    if overlay is not None:
        seen.add(os.path.realpath(overlay))
    if real in seen:
        raise CorruptImageError(f"qcow2: backing chain loops back to {bpath!r}")
    if len(seen) >= MAX_CHAIN_DEPTH:
        raise CorruptImageError(f"qcow2: backing chain deeper than {MAX_CHAIN_DEPTH}")
    bfmt = layer.backing_format
    if bfmt is not None and bfmt not in ("qcow2", "raw"):
        raise UnsupportedFeatureError(
            f"{layer}: backing format {bfmt!r} is not supported", feature=f"format {bfmt}"
        )
    if gate is not None:
        gate.check(bpath, format=bfmt, writable=False, referrer=str(layer))
    try:
        # Backing files: read-only opens, locked as such (storage.lock.backing).
        return _open(bpath, False, bfmt, gate, AUTO, cache, seen)
    except ImageNotFoundError as exc:
        if exc.filename != bpath:
            raise
        raise ImageNotFoundError(
            f"{overlay}: its backing file {bpath} does not exist", filename=bpath
        ) from exc

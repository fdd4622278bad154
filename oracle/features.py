"""Issue 13's qcow2 features in the machines: what a target supports, and QEMU-made layers.

Which features the machines generate depends on the implementation: :func:`probe_features`
tries each one on a scratch image (in a temporary folder) and records what works, so that
the machines run against an implementation at any stage of its development.  A feature
whose attempt raises ``UnsupportedError`` (or ``NotImplementedError``, or lacks the method
or option altogether) is simply not generated; the probe says why in ``reasons``.  A
feature whose attempt reads back wrong or raises any other pyimago error is *broken*
(``FeatureSupport.broken``): that is a bug, which the machines report at once rather than
leave the feature out (a snapshot's refcounts dropped below zero is no missing feature);
unless a plain write breaks too, which the machines then find on plain chains.

Two kinds of support are told apart:

* *readable*: the target opens a QEMU-made image with the feature read-only and reads it.
  The machines then put such layers below the top of file chains (made by ``qemu-img
  create -o ...`` and filled by ``qemu-io``: :func:`qemu_make_layer`).
* *writable*: the target creates images with the feature and writes them; the machines then
  make top layers (and lower ones) with it, and draw its operations.

Feature names (``FEATURES``): ``extended_l2``, ``data_file``, ``data_file_raw``,
``lazy_refcounts``, ``zstd`` (a layer option each); ``write_compressed``, ``snapshots``
(create/apply/delete) and ``snapshot_open`` (``open_image(snapshot=...)``) are operations.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyimago.reference import PyimagoError

from .ops import LayerSpec, Op, OpKind, pattern
from .strategies import COMPRESSED as COMPRESSED_MODE

__all__ = [
    "FEATURES",
    "LAYER_FEATURES",
    "FeatureSupport",
    "probe_features",
    "qemu_make_layer",
]

#: Layer options (``LayerSpec`` fields), then operations.
LAYER_FEATURES = ("extended_l2", "data_file", "data_file_raw", "lazy_refcounts", "zstd")
FEATURES = (*LAYER_FEATURES, "write_compressed", "snapshots", "snapshot_open")

#: What "not supported (yet)" looks like from the outside: pyimago's UnsupportedError (an
#: io.UnsupportedOperation), NotImplementedError, or a method or keyword that does not exist.
_NOT_SUPPORTED = (io.UnsupportedOperation, NotImplementedError, AttributeError, TypeError)

_CLUSTER = 65536
_SIZE = 4 * _CLUSTER


@dataclass(frozen=True, slots=True)
class FeatureSupport:
    """What one implementation supports of :data:`FEATURES`."""

    writable: frozenset[str] = frozenset()
    readable: frozenset[str] = frozenset()
    reasons: dict[str, str] = field(default_factory=dict, compare=False)
    """Why a feature is not (fully) supported: the error the probe met."""
    broken: frozenset[str] = frozenset()
    """Features whose write probe met a bug (see the module docstring), not a refusal."""

    def summary(self) -> str:
        """One line: each feature as written, read-only or missing."""
        parts = []
        for name in FEATURES:
            how = "rw" if name in self.writable else "ro" if name in self.readable else "-"
            parts.append(f"{name} {how}")
        return ", ".join(parts)


def _layer_for(name: str) -> LayerSpec:
    spec = LayerSpec("qcow2", _SIZE, _CLUSTER)
    if name == "extended_l2":
        return LayerSpec("qcow2", _SIZE, _CLUSTER, extended_l2=True)
    if name in ("data_file", "data_file_raw"):
        return LayerSpec("qcow2", _SIZE, _CLUSTER, data_file="raw" if name.endswith("raw")
                         else "file")
    if name == "lazy_refcounts":
        return LayerSpec("qcow2", _SIZE, _CLUSTER, lazy_refcounts=True)
    if name == "zstd":
        return LayerSpec("qcow2", _SIZE, _CLUSTER, compression_type="zstd")
    return spec


def _attempt(reasons: dict[str, str], name: str, action: Callable[[], None],
             broken: set[str] | None = None) -> bool:
    try:
        action()
    except _NOT_SUPPORTED as exc:
        reasons[name] = f"{type(exc).__name__}: {exc}"
        return False
    except Exception as exc:  # a bug, not a missing feature: say so, do not generate it
        reasons[name] = f"probe failed: {type(exc).__name__}: {exc}"
        if broken is not None and isinstance(exc, (AssertionError, PyimagoError)):
            # Read back wrong, or the implementation's own error (not an environment's,
            # such as a module missing): the feature is there, and broken.
            broken.add(name)
        return False
    return True


def _open(target: Any, path: str, *, writable: bool, **extra: Any) -> Any:
    return target.open_image(path, writable=writable, format="qcow2", **extra)


def _write_probe(target: Any, folder: str, name: str) -> None:
    spec = _layer_for(name)
    path = os.path.join(folder, f"{name}.qcow2")
    options: dict[str, Any] = {"cluster_size": spec.cluster_size}
    if name in LAYER_FEATURES:
        options.update(spec.create_options(f"{name}.data"))
    target.create_image(path, spec.size, format="qcow2", **options)
    access = _open(target, path, writable=True)
    try:
        data = pattern(1, 0, _CLUSTER)
        if name == "write_compressed":
            access.write_compressed(data, _CLUSTER)
            if bytes(access.read(_CLUSTER, _CLUSTER)) != data:
                raise AssertionError("write_compressed reads back wrong")
        elif name in ("snapshots", "snapshot_open"):
            access.write(data, 0)
            info = access.create_snapshot("probe")
            access.write(bytes(_CLUSTER), 0)
            if name == "snapshot_open":
                access.flush()
                snap = _open(target, path, writable=False, snapshot=info.id, force_share=True)
                with contextlib.closing(snap):
                    if bytes(snap.read(0, _CLUSTER)) != data:
                        raise AssertionError("the snapshot opened reads back wrong")
            else:
                access.apply_snapshot("probe")
                if bytes(access.read(0, _CLUSTER)) != data:
                    raise AssertionError("apply_snapshot did not restore the content")
                access.delete_snapshot(info.id)
                if access.snapshots():
                    raise AssertionError("delete_snapshot left the snapshot listed")
        else:
            access.write(data, 512)
            if bytes(access.read(512, _CLUSTER)) != data:
                raise AssertionError("the write reads back wrong")
    finally:
        access.close()


def _read_probe(target: Any, folder: str, name: str, qemu_img: str, qemu_io: str) -> None:
    if name not in LAYER_FEATURES:
        return
    spec = _layer_for(name)
    path = os.path.join(folder, f"qemu-{name}.qcow2")
    qemu_make_layer(qemu_img, qemu_io, path, spec, (Op(OpKind.WRITE, 512, _CLUSTER),),
                    steps=iter([1]), data_file_name=f"qemu-{name}.data")
    access = _open(target, path, writable=False)
    with contextlib.closing(access):
        if bytes(access.read(512, _CLUSTER)) != pattern(1, 512, _CLUSTER):
            raise AssertionError("a QEMU-made image reads back wrong")


def _plain_write_breaks(target: Any, folder: str) -> bool:
    """Whether the write probe breaks on a qcow2 layer with no feature at all."""
    broken: set[str] = set()
    _attempt({}, "plain", functools.partial(_write_probe, target, folder, "plain"), broken)
    return bool(broken)


_CACHE: dict[Any, FeatureSupport] = {}


def probe_features(target: Any, *, qemu: bool = True) -> FeatureSupport:
    """What ``target`` (an :class:`~pyimago.oracle.targets.ImplementationTarget`) supports.

    Targets with their own ``capabilities`` (driver targets) get nothing: the features are
    qcow2's.  The result is cached per target.
    """
    key = (target.name, id(target.open_image), id(target.create_image), qemu)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    if getattr(target, "capabilities", None) is not None:
        support = FeatureSupport()
    else:
        qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
        reasons: dict[str, str] = {}
        writable: set[str] = set()
        readable: set[str] = set()
        broken: set[str] = set()
        with tempfile.TemporaryDirectory(prefix="pyimago-probe-") as folder:
            for name in FEATURES:
                if _attempt(reasons, name, functools.partial(_write_probe, target, folder,
                                                              name), broken):
                    writable.add(name)
                    readable.add(name)
                elif qemu and qemu_img and qemu_io and name in LAYER_FEATURES:
                    read_reasons: dict[str, str] = {}
                    if _attempt(read_reasons, name, functools.partial(
                            _read_probe, target, folder, name, qemu_img, qemu_io)):
                        readable.add(name)
                    else:
                        reasons[name] += f"; read: {read_reasons[name]}"
            if "snapshots" not in writable:
                writable.discard("snapshot_open")
            if broken and _plain_write_breaks(target, folder):
                # A plain write reads back wrong too: the features' probes broke on that,
                # not on the features.  The machines find it on plain chains, with a
                # sequence to replay, which a probe's message is not.
                for name in broken:
                    reasons[name] += "; a plain write breaks too"
                broken.clear()
        support = FeatureSupport(frozenset(writable), frozenset(readable), reasons,
                                 frozenset(broken))
    _CACHE[key] = support
    return support


# -- QEMU-made layers ---------------------------------------------------------------------------


def _qemu_create_options(spec: LayerSpec, backing: tuple[str, str] | None,
                         data_file_name: str) -> list[str]:
    opts = [f"cluster_size={spec.cluster_size}", f"compat={spec.compat}"]
    if spec.compat != "0.10":
        opts.append(f"refcount_bits={spec.refcount_bits}")
    if spec.preallocation != "off":
        opts.append(f"preallocation={spec.preallocation}")
    for key, value in spec.create_options(data_file_name).items():
        opts.append(f"{key}={'on' if value is True else value}")
    args = ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", backing[0], "-F", backing[1]]
    return args


def _write_commands(spec: LayerSpec, op: Op, source: str, used: set[int]) -> list[str]:
    """qemu-io writes of ``op``'s data (in ``source``); a compressed one compresses the whole
    clusters it covers that nothing wrote before (QEMU takes nothing else: "Compression
    can't overwrite anything") and writes the rest plainly.  ``used``: the clusters earlier
    operations touched (updated)."""
    end = op.offset + op.length
    cs = spec.cluster_size
    touched = range(op.offset // cs, -(-end // cs))
    if op.mode != COMPRESSED_MODE:
        used.update(touched)
        return [f"write -q -s {source} {op.offset} {op.length}"]
    # Segments [start, stop) and whether they are compressed, merged where they agree.
    segments: list[list[Any]] = []
    for cluster in touched:
        start, stop = max(cluster * cs, op.offset), min((cluster + 1) * cs, end)
        whole = start == cluster * cs and (stop == (cluster + 1) * cs or stop == spec.size)
        squeeze = whole and cluster not in used
        if segments and segments[-1][2] == squeeze and not squeeze:
            segments[-1][1] = stop
        else:
            segments.append([start, stop, squeeze])
    used.update(touched)
    # Pieces of the source file: qemu-io's -s reads it from its start, so each piece gets
    # its own file cut from it.
    with open(source, "rb") as f:
        data = f.read()
    out = []
    for start, stop, squeeze in segments:
        piece = f"{source}.{start}"
        with open(piece, "wb") as f:
            f.write(data[start - op.offset : stop - op.offset])
        flag = "-c " if squeeze else ""
        out.append(f"write -q {flag}-s {piece} {start} {stop - start}")
    return out


def qemu_make_layer(
    qemu_img: str,
    qemu_io: str,
    path: str,
    spec: LayerSpec,
    build: Iterable[Op],
    *,
    steps: Iterable[int],
    backing: tuple[str, str] | None = None,
    data_file_name: str = "data.bin",
) -> None:
    """Create a qcow2 layer with ``qemu-img create`` and run ``build`` on it with ``qemu-io``.

    ``steps`` gives each operation's step number (its data, see :func:`pattern`); ``backing``
    is ``(file name relative to the layer, format)``.  Writes marked compressed go through
    ``qemu-io write -c`` (whole clusters); zeroing is ``write -z`` (``-u`` for discards).
    """
    folder = os.path.dirname(path) or "."
    options = _qemu_create_options(spec, backing, data_file_name)
    proc = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", *options, os.path.basename(path),
         str(spec.size)],
        capture_output=True, text=True, check=False, cwd=folder,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-img create failed: {proc.stderr.strip()}")
    commands: list[str] = []
    # Clusters with a host cluster already (preallocation gives every one a host cluster).
    used: set[int] = set(range(-(-spec.size // spec.cluster_size))) \
        if spec.preallocation != "off" else set()
    with tempfile.TemporaryDirectory(prefix="pyimago-qemu-io-") as scratch:
        for op, step in zip(build, steps, strict=False):
            if op.kind is OpKind.WRITE:
                source = os.path.join(scratch, f"{step}.bin")
                with open(source, "wb") as f:
                    f.write(pattern(step, op.offset, op.length))
                commands += _write_commands(spec, op, source, used)
            elif op.kind is OpKind.WRITE_ZEROES:
                commands.append(f"write -q -z {op.offset} {op.length}")
                used.update(range(op.offset // spec.cluster_size,
                                  -(-(op.offset + op.length) // spec.cluster_size)))
            elif op.kind is OpKind.DISCARD_TO_ZERO:
                commands.append(f"write -q -z -u {op.offset} {op.length}")
                used.update(range(op.offset // spec.cluster_size,
                                  -(-(op.offset + op.length) // spec.cluster_size)))
            else:
                raise ValueError(f"qemu-io cannot build {op.describe()}")
        if commands:
            args = [qemu_io, "-f", "qcow2"]
            for command in commands:
                args += ["-c", command]
            # From the layer's folder: QEMU 7 resolves a relative data file name from the
            # working directory.
            proc = subprocess.run([*args, os.path.basename(path)], capture_output=True,
                                  text=True, check=False, cwd=folder)
            if proc.returncode != 0 or "error" in proc.stdout.lower():
                raise RuntimeError(f"qemu-io failed: {proc.stdout.strip()} {proc.stderr.strip()}")

"""How a session runs issue 13's operations and layer options (see ``features``).

Kept apart from the session so that the session stays about chains and checks: these are
the compressed writes, the internal snapshot operations (whose effect the flat model knows,
:meth:`~pyimago.oracle.model.FlatModel.create_snapshot` and friends) and the snapshot
reads, each checked as it runs.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyimago.reference import InvalidRequestError, PreallocateMode, PyimagoError

from ._check import OracleFailure, content_failure
from ._deflate import qemu_compress
from .model import Alloc, FlatModel, SavedSnapshot, first_mismatch
from .ops import LayerSpec, Op, OpKind, noise, pattern
from .strategies import COMPRESSED

if TYPE_CHECKING:
    from ._chain import ChainBuilder

__all__ = [
    "FEATURE_CLAUSES",
    "FEATURE_KINDS",
    "ODD_COMPRESSED",
    "create_prealloc",
    "layer_options",
    "odd_compressed",
    "open_snapshot",
    "qemu_create",
    "resize_v2_with_snapshots",
    "run_feature_op",
    "v2_resize_refused",
]

#: The operations this module runs.
FEATURE_KINDS = frozenset({OpKind.WRITE_COMPRESSED, OpKind.CREATE_SNAPSHOT,
                           OpKind.APPLY_SNAPSHOT, OpKind.DELETE_SNAPSHOT,
                           OpKind.READ_SNAPSHOT})

FEATURE_CLAUSES: dict[OpKind, tuple[str, ...]] = {
    OpKind.WRITE_COMPRESSED: ("qcow2.compressed.write-whole-cluster",
                              "qcow2.compressed.write-fallback",
                              "qcow2.compressed.write-unallocated-only"),
    OpKind.CREATE_SNAPSHOT: ("qcow2.snapshots.create-refcounts",
                             "qcow2.snapshots.id-assignment"),
    OpKind.APPLY_SNAPSHOT: ("qcow2.snapshots.apply-revert", "qcow2.snapshots.lookup-id-then-name"),
    OpKind.DELETE_SNAPSHOT: ("qcow2.snapshots.delete-release",
                             "qcow2.snapshots.lookup-id-then-name"),
    OpKind.READ_SNAPSHOT: ("qcow2.snapshots.open",),
}

#: v2 images with snapshots are not resized (QEMU: "Can't resize a v2 image which has
#: snapshots"), by a resize or by applying a snapshot of another size.
_V2_NO_RESIZE = "qcow2.snapshots.v2-no-resize"

Access = Any


def layer_options(spec: LayerSpec, index: int) -> dict[str, Any]:
    """``create_image`` options for a layer's issue-13 features (its data file beside it)."""
    return spec.create_options(f"layer{index}.data")


def create_prealloc(spec: LayerSpec, named: PreallocateMode | None) -> PreallocateMode | None:
    """What a new layer holds, as a grow of an empty one: with ``data_file_raw`` QEMU
    preallocates the metadata even when asked for none (the data file must read as the
    disk on its own)."""
    if spec.data_file == "raw" and named is None:
        return PreallocateMode.FORMAT_ALLOCATE
    return named


def _snapshot_rows(access: Access) -> list[tuple[str, str, int]]:
    return [(info.id, info.name, info.disk_size) for info in access.snapshots()]


def check_snapshot_list(access: Access, model: FlatModel, what: str) -> None:
    """``snapshots()`` lists what the model holds: IDs, names and disk sizes, in order."""
    actual = _snapshot_rows(access)
    expected = [(s.id, s.name, s.size) for s in model.snapshots]
    if actual != expected:
        raise OracleFailure(
            f"{what}: snapshots() lists {actual} (id, name, disk size); the model expects "
            f"{expected}",
            clauses=("qcow2.snapshots.list", "qcow2.snapshots.id-assignment"),
        )


def _expect_error(call: Callable[[], Any], what: str, errors: tuple[type[BaseException], ...],
                  clause: str) -> None:
    try:
        call()
    except errors:
        return
    except Exception as exc:
        raise OracleFailure(
            f"{what}: raised {type(exc).__name__}: {exc}, not a pyimago error "
            f"({' or '.join(e.__name__ for e in errors)})",
            clauses=(clause, "errors.hierarchy"),
        ) from exc
    raise OracleFailure(f"{what}: was not rejected", clauses=(clause,))


def _create(access: Access, model: FlatModel, name: str) -> None:
    if not name or any(s.name == name for s in model.snapshots):
        _expect_error(lambda: access.create_snapshot(name),
                      f"create_snapshot({name!r}) (the name is empty or taken)",
                      (InvalidRequestError,), "qcow2.snapshots.id-assignment")
        return
    info = access.create_snapshot(name)
    snap = model.create_snapshot(name)
    got = (info.id, info.name, info.disk_size, info.vm_state_size, info.vm_clock_nsec)
    want = (snap.id, snap.name, snap.size, 0, 0)
    if got != want:
        raise OracleFailure(
            f"create_snapshot({name!r}) returned (id, name, disk size, vm state, vm clock) "
            f"{got}; the model expects {want}",
            clauses=("qcow2.snapshots.id-assignment",),
        )


def v2_resize_refused(layer: LayerSpec, model: FlatModel, new_size: int) -> bool | None:
    """Whether resizing the top to ``new_size`` (by a resize, or by applying a snapshot)
    must raise UnsupportedError (True), must not (False), or may (None: to its own size)."""
    if layer.format != "qcow2" or layer.compat != "0.10" or not model.snapshots:
        return False
    return True if new_size != model.size else None


def resize_v2_with_snapshots(access: Access, model: FlatModel, op: Op) -> None:
    """A resize of a v2 top with snapshots: refused (:data:`_V2_NO_RESIZE`), or a no-op."""
    if op.value == model.size:
        with contextlib.suppress(io.UnsupportedOperation):
            access.resize(op.value, op.prealloc)
        return
    _expect_error(lambda: access.resize(op.value, op.prealloc),
                  f"{op.describe()} (a v2 image with snapshots)", (io.UnsupportedOperation,),
                  _V2_NO_RESIZE)


def _by_name_or_id(access: Access, model: FlatModel, op: Op, layer: LayerSpec) -> None:
    key = op.mode or ""
    call = access.apply_snapshot if op.kind is OpKind.APPLY_SNAPSHOT else access.delete_snapshot
    snap = model.find_snapshot(key)
    if snap is None:
        _expect_error(lambda: call(key), f"{op.kind.value}({key!r}) (no such snapshot)",
                      (PyimagoError,), "qcow2.snapshots.lookup-id-then-name")
        return
    if op.kind is OpKind.APPLY_SNAPSHOT and v2_resize_refused(layer, model, snap.size):
        _expect_error(lambda: call(key), f"{op.describe()} (a v2 image, another disk size)",
                      (io.UnsupportedOperation,), _V2_NO_RESIZE)
        return
    call(key)
    if op.kind is OpKind.APPLY_SNAPSHOT:
        model.apply_snapshot(key)
    else:
        model.delete_snapshot(key)


def read_snapshot(open_snapshot: Callable[[str], Access], model: FlatModel, op: Op) -> int:
    """Open snapshot ``op.mode`` read-only and compare it whole with the model's copy;
    returns the bytes compared."""
    key = op.mode or ""
    snap: SavedSnapshot | None = model.find_snapshot(key)
    if snap is None:
        _expect_error(lambda: open_snapshot(key).close(),
                      f"open_image(snapshot={key!r}) (no such snapshot)", (PyimagoError,),
                      "qcow2.snapshots.open")
        return 0
    access = open_snapshot(key)
    with contextlib.closing(access):
        # qcow2.snapshots.open: "at the image's current size as qemu-img convert -l KEY
        # reads it (QEMU's temporary snapshot load switches the L1 table only)".
        if access.size != model.size:
            raise OracleFailure(
                f"snapshot {key!r} opens with size 0x{access.size:x}, the image's is "
                f"0x{model.size:x}",
                clauses=("qcow2.snapshots.open",),
            )
        n = min(model.size, snap.size)
        actual = bytes(access.read(0, n))
    bad = first_mismatch(actual, snap.data[:n], snap.known[:n])
    if bad is not None:
        raise OracleFailure(
            content_failure(f"snapshot {key!r} opened read-only", 0, bad, actual,
                            snap.data[:n]),
            offset=bad, clauses=("qcow2.snapshots.open",),
        )
    return n


#: How close to the limit a compressed size may be for the oracle to call it either way
#: (its own compressor's output may differ from the implementation's by a few bytes).
_FIT_MARGIN = 32


def compressed_fits(data: bytes, cluster: int, compression_type: str) -> bool | None:
    """Whether ``data`` (padded to a cluster) compresses into ``cluster - 1`` bytes, the
    limit of qcow2.compressed.write-fallback; None when too close to call."""
    size = len(qemu_compress(data + bytes(cluster - len(data)), compression_type == "zstd"))
    if abs(size - (cluster - 1)) <= _FIT_MARGIN:
        return None
    return size <= cluster - 1


#: ``Op.mode`` of a compressed write whose data compresses to an odd number of bytes.
ODD_COMPRESSED = "odd"


def odd_compressed(step: int, offset: int, length: int, compression_type: str) -> bytes:
    """Step ``step``'s pattern at ``offset``, its last bytes zeroed one by one until the
    oracle's compressor (QEMU's settings, as implementations use) makes it an odd number of
    bytes long: compressed clusters packed after it, byte after byte, then start at an odd
    offset, whose descriptor's bit 0 is set (where a reader may take it for a flag)."""
    data = bytearray(pattern(step, offset, length))
    for k in range(1, min(length, 64) + 1):
        if len(qemu_compress(bytes(data), compression_type == "zstd")) % 2:
            break
        data[-k] = 0
    return bytes(data)


def compressed_outcome(model: FlatModel, offset: int, length: int) -> bool | None:
    """Whether a compressed write of the cluster at ``offset`` must succeed (True), must be
    refused (False), or may go either way (None): QEMU compresses only into a cluster that
    has no host cluster (qcow2.compressed.write-unallocated-only).  A unit the model knows
    to be unallocated has none (but with extended L2 a preallocated cluster may hide behind
    unallocated subclusters); a unit holding data has one; zero units may or may not.
    (Data that does not compress is written plainly before that rule is consulted.)"""
    units = range(offset // model.granularity, -(-(offset + length) // model.granularity))
    states = [model.allowed(u) for u in units]
    if any(state == frozenset({Alloc.DATA}) for state in states):
        return False
    if not model.traits.subclusters and all(state == {Alloc.BACKING} for state in states):
        return True
    return None


def _write_compressed(access: Access, model: FlatModel, op: Op, step: int,
                      layer: LayerSpec) -> None:
    if op.mode == ODD_COMPRESSED:
        data = odd_compressed(step, op.offset, op.length, layer.compression_type)
    else:
        data = (noise if op.mode == "noise" else pattern)(step, op.offset, op.length)
    what = f"write_compressed of the cluster at 0x{op.offset:x}"
    g = model.granularity
    cluster = g * 32 if model.traits.subclusters else g
    if op.offset % cluster or (op.length != cluster and op.offset + op.length != model.size):
        # (With a data file QEMU says -ENOTSUP before it looks at the range.)
        errors: tuple[type[BaseException], ...] = (InvalidRequestError,)
        if layer.data_file:
            errors += (io.UnsupportedOperation,)
        _expect_error(lambda: access.write_compressed(data, op.offset),
                      f"write_compressed of 0x{op.length:x} bytes at 0x{op.offset:x} (not one "
                      "whole cluster)", errors, "qcow2.compressed.write-whole-cluster")
        return
    if layer.data_file:
        _expect_error(lambda: access.write_compressed(data, op.offset),
                      f"{what} (an image with an external data file)",
                      (io.UnsupportedOperation,), "qcow2.compressed.write-whole-cluster")
        return
    # Data that does not fit is written plainly (the write succeeds), so only a cluster the
    # write may be refused for needs the compressed size (a 2 MiB cluster costs the
    # compressor tens of milliseconds).
    outcome = compressed_outcome(model, op.offset, op.length)
    if outcome is not True:
        fits = compressed_fits(data, cluster, layer.compression_type)
        if fits is False:
            outcome = True
        elif outcome is False and fits is None:
            outcome = None
    if outcome is False:
        _expect_error(lambda: access.write_compressed(data, op.offset),
                      f"{what} (it has a host cluster)", (InvalidRequestError,),
                      "qcow2.compressed.write-unallocated-only")
        return
    try:
        access.write_compressed(data, op.offset)
    except InvalidRequestError as exc:
        if outcome is None:
            return  # refused, as it may be; the checks after the step see nothing changed
        raise OracleFailure(
            f"{what}: the cluster is unallocated, yet the write was refused: {exc}",
            offset=op.offset, clauses=("qcow2.compressed.write-unallocated-only",),
        ) from exc
    model.write(op.offset, data)


def _may_overflow(layer: LayerSpec, model: FlatModel) -> bool:
    """Whether sharing the top's clusters once more may need a refcount its width lacks."""
    limit = (1 << layer.refcount_bits) - 1
    return layer.refcount_bits <= 8 or len(model.snapshots) + 2 > limit


def run_feature_op(access: Access, model: FlatModel, op: Op, step: int,
                   open_snapshot: Callable[[str], Access], layer: LayerSpec) -> int:
    """Run one of :data:`FEATURE_KINDS` on the top layer (``layer``) and the model;
    returns the bytes compared on the way (snapshot reads).  With an external data file
    QEMU refuses compressed writes and internal snapshots (UnsupportedError)."""
    kind = op.kind
    if kind is OpKind.WRITE_COMPRESSED:
        _write_compressed(access, model, op, step, layer)
        return 0
    if layer.data_file and kind is not OpKind.READ_SNAPSHOT:
        call = (lambda: access.create_snapshot(op.mode)) if kind is OpKind.CREATE_SNAPSHOT \
            else (lambda: getattr(access, kind.value)(op.mode))
        _expect_error(call, f"{op.describe()} (an image with an external data file)",
                      (io.UnsupportedOperation,), FEATURE_CLAUSES[kind][0])
        return 0
    if kind is OpKind.READ_SNAPSHOT:
        access.flush()
        return read_snapshot(open_snapshot, model, op)
    try:
        if kind is OpKind.CREATE_SNAPSHOT:
            _create(access, model, op.mode or "")
        else:
            _by_name_or_id(access, model, op, layer)
    except PyimagoError:
        if kind is OpKind.DELETE_SNAPSHOT or not _may_overflow(layer, model):
            raise
        # Narrow refcounts cannot count a cluster every snapshot shares (nor a host cluster
        # of several compressed ones, shared again): QEMU fails the operation (nothing
        # changed: the checks after the step see to that).
    check_snapshot_list(access, model, op.describe())
    return 0


# -- chain building and opening -----------------------------------------------------------------


def qemu_create(builder: ChainBuilder, index: int) -> None:
    """Layer ``index``, made and filled by QEMU (``LayerSpec.maker == "qemu"``), with the
    builder's current model kept in step: each build operation is logged and numbered as
    the session's own are."""
    from ._op_table import LogEntry
    from .features import qemu_make_layer

    spec = builder.chain.layers[index]
    qemu_io = shutil.which("qemu-io")
    if builder.workdir is None or not builder._qemu_img or not qemu_io:
        raise RuntimeError(f"layer {index} is made by QEMU: that needs a file chain, qemu-img "
                           "and qemu-io")
    model = builder.model
    steps: list[int] = []
    cs = spec.cluster_size
    compressed: set[int] = set()  # clusters a compressed write may have left compressed
    for op in spec.build:
        builder.step += 1
        steps.append(builder.step)
        builder.log.append(LogEntry(builder.step, index, op))
        end = op.offset + op.length
        touched = set(range(op.offset // cs, -(-end // cs)))
        if op.kind is OpKind.WRITE:
            model.write(op.offset, pattern(builder.step, op.offset, op.length))
        elif op.kind is OpKind.WRITE_ZEROES:
            model.write_zeroes(op.offset, op.length)
        elif op.kind is OpKind.DISCARD_TO_ZERO:
            model.discard_to_zero(op.offset, op.length)
        if op.kind is not OpKind.WRITE and spec.extended_l2 and any(
            not (op.offset <= c * cs and end >= min((c + 1) * cs, spec.size))
            for c in touched & compressed
        ):
            # QEMU's zero_l2_subclusters: "We cannot partially zeroize compressed clusters"
            # (-ENOTSUP), so the block layer writes zeroes over the whole request instead:
            # it maps as data where the model asks for zero bits.
            model.allow_data(op.offset, op.length)
        compressed -= touched
        if op.kind is OpKind.WRITE and op.mode == COMPRESSED:
            compressed |= {c for c in touched
                           if op.offset <= c * cs and end >= min((c + 1) * cs, spec.size)}
    backing = None
    if index > 0:
        backing = (builder._layer_name(index - 1), builder.chain.layers[index - 1].format)
    qemu_make_layer(builder._qemu_img, qemu_io, builder.layer_location(index), spec,
                    spec.build, steps=steps, backing=backing,
                    data_file_name=f"layer{index}.data")


def open_snapshot(builder: ChainBuilder, name_or_id: str) -> Access:
    """The top layer's snapshot ``name_or_id``, opened read-only beside the writable open
    (sharing its lock, as readers of a running image's snapshots do)."""
    spec = builder.chain.top
    cache = builder.chain.l2_cache_tables
    kwargs: dict[str, Any] = {"writable": False, "format": spec.format, "snapshot": name_or_id}
    if cache is not None and getattr(builder.target, "l2_cache_option", False):
        kwargs["l2_cache_tables"] = cache
    below: list[Access] = []
    if builder.workdir is not None:
        kwargs["force_share"] = True
    else:
        # Each layer below, opened read-only, explicitly (memory chains name no files).
        backing: Access = None
        for index in range(builder.top_index):
            layer = builder.chain.layers[index]
            backing = builder.target.open(builder.layer_location(index), writable=False,
                                          format=layer.format, backing=backing,
                                          explicit_backing=layer.format != "raw")
            below.append(backing)
        if backing is not None:
            kwargs["backing"] = backing

    def close_below() -> None:
        for layer_access in reversed(below):
            with contextlib.suppress(Exception):
                layer_access.close()

    try:
        access = builder.target.open_image(builder.layer_location(builder.top_index), **kwargs)
    except BaseException:
        close_below()
        raise
    if below:
        close = access.close

        def close_all() -> None:
            try:
                close()
            finally:
                close_below()

        access.close = close_all
    return access

"""How a session runs issue 13's operations and layer options (see ``features``).

Kept apart from the session so that the session stays about chains and checks: these are
the compressed writes, the internal snapshot operations (whose effect the flat model knows,
:meth:`~pyimago.oracle.model.FlatModel.create_snapshot` and friends) and the snapshot
reads, each checked as it runs.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

from pyimago.reference import InvalidRequestError, PreallocateMode, PyimagoError

from ._check import OracleFailure, content_failure
from .model import Alloc, FlatModel, SavedSnapshot, first_mismatch
from .ops import LayerSpec, Op, OpKind, noise, pattern

__all__ = [
    "FEATURE_CLAUSES",
    "FEATURE_KINDS",
    "create_prealloc",
    "layer_options",
    "run_feature_op",
]

#: The operations this module runs.
FEATURE_KINDS = frozenset({OpKind.WRITE_COMPRESSED, OpKind.CREATE_SNAPSHOT,
                           OpKind.APPLY_SNAPSHOT, OpKind.DELETE_SNAPSHOT,
                           OpKind.READ_SNAPSHOT})

FEATURE_CLAUSES: dict[OpKind, tuple[str, ...]] = {
    OpKind.WRITE_COMPRESSED: ("qcow2.compressed.write-whole-cluster",
                              "qcow2.compressed.write-fallback",
                              "qcow2.compressed.write-unallocated-only"),
    OpKind.CREATE_SNAPSHOT: ("qcow2.snapshots.create", "qcow2.snapshots.table"),
    OpKind.APPLY_SNAPSHOT: ("qcow2.snapshots.apply", "qcow2.snapshots.lookup"),
    OpKind.DELETE_SNAPSHOT: ("qcow2.snapshots.delete", "qcow2.snapshots.lookup"),
    OpKind.READ_SNAPSHOT: ("qcow2.snapshots.open",),
}

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
            clauses=("qcow2.snapshots.list", "qcow2.snapshots.create"),
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
                      (InvalidRequestError,), "qcow2.snapshots.create")
        return
    info = access.create_snapshot(name)
    snap = model.create_snapshot(name)
    got = (info.id, info.name, info.disk_size, info.vm_state_size, info.vm_clock_nsec)
    want = (snap.id, snap.name, snap.size, 0, 0)
    if got != want:
        raise OracleFailure(
            f"create_snapshot({name!r}) returned (id, name, disk size, vm state, vm clock) "
            f"{got}; the model expects {want}",
            clauses=("qcow2.snapshots.create",),
        )


def _by_name_or_id(access: Access, model: FlatModel, op: Op) -> None:
    key = op.mode or ""
    call = access.apply_snapshot if op.kind is OpKind.APPLY_SNAPSHOT else access.delete_snapshot
    if model.find_snapshot(key) is None:
        _expect_error(lambda: call(key), f"{op.kind.value}({key!r}) (no such snapshot)",
                      (PyimagoError,), "qcow2.snapshots.lookup")
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
        if access.size != snap.size:
            raise OracleFailure(
                f"snapshot {key!r} opens with size 0x{access.size:x}, taken at 0x{snap.size:x}",
                clauses=("qcow2.snapshots.open",),
            )
        actual = bytes(access.read(0, snap.size))
    bad = first_mismatch(actual, snap.data, snap.known)
    if bad is not None:
        raise OracleFailure(
            content_failure(f"snapshot {key!r} opened read-only", 0, bad, actual, snap.data),
            offset=bad, clauses=("qcow2.snapshots.open",),
        )
    return snap.size


def compressed_outcome(model: FlatModel, offset: int, length: int) -> bool | None:
    """Whether a compressed write of the cluster at ``offset`` must succeed (True), must be
    refused (False), or may go either way (None): QEMU compresses only into a cluster that
    has no host cluster (qcow2.compressed.write-unallocated-only).  A unit the model knows
    to be unallocated has none (but with extended L2 a preallocated cluster may hide behind
    unallocated subclusters); a unit holding data has one; zero units may or may not."""
    units = range(offset // model.granularity, -(-(offset + length) // model.granularity))
    states = [model.allowed(u) for u in units]
    if any(state == frozenset({Alloc.DATA}) for state in states):
        return False
    if not model.traits.subclusters and all(state == {Alloc.BACKING} for state in states):
        return True
    return None


def _write_compressed(access: Access, model: FlatModel, op: Op, step: int,
                      data_file: bool) -> None:
    make = noise if op.mode == "noise" else pattern
    data = make(step, op.offset, op.length)
    what = f"write_compressed of the cluster at 0x{op.offset:x}"
    g = model.granularity
    cluster = g * 32 if model.traits.subclusters else g
    if op.offset % cluster or (op.length != cluster and op.offset + op.length != model.size):
        _expect_error(lambda: access.write_compressed(data, op.offset),
                      f"write_compressed of 0x{op.length:x} bytes at 0x{op.offset:x} (not one "
                      "whole cluster)", (InvalidRequestError,),
                      "qcow2.compressed.write-whole-cluster")
        return
    if data_file:
        _expect_error(lambda: access.write_compressed(data, op.offset),
                      f"{what} (an image with an external data file)",
                      (io.UnsupportedOperation,), "qcow2.compressed.write-whole-cluster")
        return
    outcome = compressed_outcome(model, op.offset, op.length)
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


def run_feature_op(access: Access, model: FlatModel, op: Op, step: int,
                   open_snapshot: Callable[[str], Access], *, data_file: bool = False) -> int:
    """Run one of :data:`FEATURE_KINDS` on the top layer and the model; returns the bytes
    compared on the way (snapshot reads).  ``data_file``: the top layer has an external
    data file, where QEMU refuses compressed writes and internal snapshots."""
    kind = op.kind
    if kind is OpKind.WRITE_COMPRESSED:
        _write_compressed(access, model, op, step, data_file)
        return 0
    if data_file and kind is not OpKind.READ_SNAPSHOT:
        call = (lambda: access.create_snapshot(op.mode)) if kind is OpKind.CREATE_SNAPSHOT \
            else (lambda: getattr(access, kind.value)(op.mode))
        _expect_error(call, f"{op.describe()} (an image with an external data file)",
                      (io.UnsupportedOperation,), FEATURE_CLAUSES[kind][0])
        return 0
    if kind is OpKind.READ_SNAPSHOT:
        access.flush()
        return read_snapshot(open_snapshot, model, op)
    if kind is OpKind.CREATE_SNAPSHOT:
        _create(access, model, op.mode or "")
    else:
        _by_name_or_id(access, model, op)
    check_snapshot_list(access, model, op.describe())
    return 0

"""The session's tables of operations: the clauses each exercises, which ones change
nothing a power cut could show, which ones get a whole-disk check, and what a cut during one
may leave unspecified."""

from __future__ import annotations

from dataclasses import dataclass

from pyimago.reference import PreallocateMode

from ._feature_run import FEATURE_CLAUSES
from .ops import Op, OpKind

__all__ = [
    "BURST_SLICE_FRACTION",
    "FULL_CHECK",
    "PASSIVE",
    "PAST_END_OPS",
    "SLICE_FRACTION",
    "LogEntry",
    "cut_unspecified",
    "op_clauses",
]

_GROW_CLAUSES = {
    PreallocateMode.NONE: "access.resize.grow-none",
    PreallocateMode.ZERO: "access.resize.grow-zero",
    PreallocateMode.FORMAT_ALLOCATE: "access.resize.grow-format-allocate",
    PreallocateMode.FULL_ALLOCATE: "access.resize.grow-full-allocate",
    PreallocateMode.WRITE_DATA: "access.resize.grow-write-data",
}

_OP_CLAUSES: dict[OpKind, tuple[str, ...]] = {
    OpKind.READ: ("access.read.no-short", "access.read.past-end-zero"),
    OpKind.WRITE: ("access.cow.partial-cluster", "access.write.no-short"),
    OpKind.SWEEP: ("access.cow.partial-cluster",),
    OpKind.WRITE_ZEROES: ("access.write-zeroes.soft", "access.write-zeroes.no-free"),
    OpKind.DISCARD_TO_ZERO: ("access.discard-to-zero.reads-zero", "access.discard-to-zero.frees"),
    OpKind.DISCARD_TO_ANY: ("access.discard-to-any.unspecified",),
    OpKind.DISCARD_TO_BACKING: (
        "access.discard-to-backing.visible",
        "access.discard-to-backing.partial-kept",
    ),
    OpKind.WRITE_PAST_END: ("access.write.past-end",),
    OpKind.FLUSH: ("access.flush.no-sync",),
    OpKind.INVALIDATE: ("access.invalidate-cache",),
    OpKind.REOPEN: ("access.close.flushes",),
    OpKind.READ_PARALLEL: ("access.parallel.same-result",),
    OpKind.WRITE_PARALLEL: ("access.parallel.same-result",),
    OpKind.READINTO: ("access.read.no-short",),
    OpKind.READV: ("access.read.no-short",),
    OpKind.WRITEV: ("access.write.no-short",),
    OpKind.ENSURE_DATA_MAPPING: ("access.cow.partial-cluster",),
    OpKind.GET_MAPPING: ("access.mapping.tiling", "access.mapping.eof-top-only"),
    OpKind.SYNC: ("crash.power-cut",),
    OpKind.POWER_CUT: ("crash.power-cut",),
    **FEATURE_CLAUSES,
}

# Operations that change neither the image nor its storage: no crash timeline point.
PASSIVE = frozenset({OpKind.READ, OpKind.READ_PARALLEL, OpKind.WRITE_PARALLEL,
                      OpKind.POWER_CUT, OpKind.WRITE_PAST_END, OpKind.READINTO, OpKind.READV,
                      OpKind.GET_MAPPING, OpKind.READ_SNAPSHOT})

# After these the whole disk is checked; after the others, the range they touched and a
# rotating slice (the whole disk is checked again at reopen and teardown).
FULL_CHECK = frozenset({OpKind.RESIZE, OpKind.REOPEN, OpKind.INVALIDATE, OpKind.SWEEP,
                        OpKind.APPLY_SNAPSHOT})
#: The rotating slice: this fraction of the disk after every operation.
SLICE_FRACTION = 8
#: The rotating slice after each operation of a burst (dozens run per step).
BURST_SLICE_FRACTION = 32


def op_clauses(op: Op, old_size: int) -> tuple[str, ...]:
    """The spec clauses an operation exercises (a resize: by direction and mode)."""
    if op.kind is OpKind.RESIZE:
        if op.value < old_size:
            return ("access.resize.shrink-discards",)
        return (_GROW_CLAUSES[op.prealloc],)
    return _OP_CLAUSES.get(op.kind, ())


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One logged operation: its step number (also its data pattern), layer and op."""

    step: int
    layer: int
    op: Op


PAST_END_OPS = ("write", "write_zeroes", "discard_to_zero", "discard_to_any", "discard_to_backing")


def cut_unspecified(op: Op, old_size: int) -> tuple[tuple[int, int], ...]:
    """What a cut during ``op`` may leave unspecified beyond what the model leaves unknown:
    a shrink's cut-off tail, until the new size is on storage; the range of an
    ``ensure_data_mapping`` told the data will be overwritten (the mapping may reach storage
    before the caller's data does: the driver cannot order a write it does not make)."""
    if op.kind is OpKind.RESIZE and op.value < old_size:
        return ((op.value, old_size - op.value),)
    # (Not the tail an apply_snapshot of a smaller snapshot cuts off: both implementations
    # switch the L1 table and the size in one header write -- crash.snapshot.copied-conservative
    # -- where QEMU's qcow2_snapshot_goto truncates first.)
    if op.kind is OpKind.ENSURE_DATA_MAPPING and op.mode != "keep":
        return ((op.offset, op.length),)
    return ()

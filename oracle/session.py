"""One oracle session: a chain built with an implementation, driven op by op, checked.

A :class:`Session` is what both the Hypothesis machines and ``pyimago replay`` run: it
builds the chain a :class:`~pyimago.oracle.ops.ChainSpec` describes, applies operations to
the implementation and to the :class:`~pyimago.oracle.model.FlatModel` side by side, and
after every operation checks content, size and mappings.  It records an fsx-style log so a
failure names the operation and the offset that went wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyimago.reference import (
    FileStorage,
    InvalidRequestError,
    MemoryStorage,
    PreallocateMode,
)

from ._check import OracleFailure, check_image, check_small_mapping, content_failure
from ._feature_run import (
    FEATURE_CLAUSES,
    FEATURE_KINDS,
    create_prealloc,
    layer_options,
    run_feature_op,
)
from ._power import PowerCutFailure, PowerCuts
from ._probe import RefcountLayout, refcount_layout
from .crash import CutJudge, qemu_judge, reference_judge
from .model import FlatModel, LayerTraits, first_mismatch
from .ops import RANGED, ChainSpec, LayerSpec, Op, OpKind, pattern
from .targets import ImplementationTarget, reference_target

if TYPE_CHECKING:
    from .fuzz import DriverCapabilities

__all__ = [
    "LogEntry",
    "OracleFailure",
    "RunStats",
    "Session",
    "check_image",
    "describe_chain",
    "op_clauses",
    "traits_for",
]

Access = Any
"""A FormatAccess-like object (the reference's, or any implementation's)."""


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
_PASSIVE = frozenset({OpKind.READ, OpKind.READ_PARALLEL, OpKind.WRITE_PARALLEL,
                      OpKind.POWER_CUT, OpKind.WRITE_PAST_END, OpKind.READINTO, OpKind.READV,
                      OpKind.GET_MAPPING, OpKind.READ_SNAPSHOT})

# After these the whole disk is checked; after the others, the range they touched and a
# rotating slice (the whole disk is checked again at reopen and teardown).
_FULL_CHECK = frozenset({OpKind.RESIZE, OpKind.REOPEN, OpKind.INVALIDATE, OpKind.SWEEP,
                         OpKind.APPLY_SNAPSHOT})
#: The rotating slice: this fraction of the disk after every operation.
_SLICE_FRACTION = 8


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


@dataclass(slots=True)
class RunStats:
    """Counters a campaign accumulates across sessions (for summaries and progress)."""

    examples: int = 0
    steps: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    bytes_compared: int = 0
    chain_depths: Counter[int] = field(default_factory=Counter)
    storage_steps: Counter[str] = field(default_factory=Counter)
    """Steps run on chains of each storage kind (``memory``, ``file``)."""
    storage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time spent in sessions (build to close) on each storage kind."""
    failures: int = 0
    replay_files: list[str] = field(default_factory=list)
    on_example: Callable[[RunStats], None] | None = None
    granules_touched: int = 0
    """Allocation units of top layers that operations touched (distinct per chain)."""
    l2_tables_touched: int = 0
    """L2 tables (guest ranges one table maps) of qcow2 top layers that operations touched."""
    granularities: Counter[int] = field(default_factory=Counter)
    """Chains by the allocation unit of their top layer."""
    unsupported_checked: int = 0
    """Requests the target does not claim that duly raised UnsupportedError."""
    compressed_clusters: int = 0
    """Clusters of built qcow2 layers stored compressed (see ``strategies.COMPRESSED``)."""
    qemu_checks: int = 0
    """``qemu-img check`` runs at teardown."""
    reference_reads: int = 0
    """Times a target's image was read back by the reference and checked (differential)."""
    differential_steps: int = 0
    """Operations also run on a reference shadow chain (differential)."""
    crash_checks: int = 0
    """Times the power-cut states since the previous check were checked."""
    crash_states: int = 0
    """Cut states rebuilt and held to ``crash.power-cut``."""
    crash_judged: int = 0
    """Of those, the ones ``qemu-img check`` (or the reference's ``check()``) judged."""
    crash_leaks: int = 0
    """Leaked clusters the judge counted in cut states (allowed, counted)."""
    refcount_widths: Counter[int] = field(default_factory=Counter)
    """Chains by the refcount width (bits) of their qcow2 top layer."""
    refcount_blocks_added: int = 0
    """Refcount blocks the top layers gained during sessions (read from their headers)."""
    refcount_tables_moved: int = 0
    """Sessions whose top layer's refcount table moved (it grew)."""
    l2_crossings: int = 0
    """Operations on a qcow2 top whose range crossed an L2-table boundary."""
    compressed_reads: int = 0
    """Compressed clusters (of any layer) that reads and partial writes went over."""
    parallel_jobs: int = 0
    """Operations run with parallelization > 1 over two or more allocation units (jobs)."""
    chains: set[str] = field(default_factory=set)
    """The distinct chains built (their JSON), for the diversity figure."""
    features: Counter[str] = field(default_factory=Counter)
    """Issue 13's features met: layer options by chain (``extended_l2 (top)`` when the top
    layer has it, ``extended_l2 (below)`` for a lower one), and the feature operations."""
    features_expected: set[str] = field(default_factory=set)
    """The features the target supports (``features.FEATURES`` names): a run that never
    meets one of them warns."""

    def path_rows(self) -> list[tuple[str, str]]:
        """``(label, value)`` rows of the paths a run took, for the run and fuzz summaries."""
        widths = ", ".join(f"{b}: {n}" for b, n in sorted(self.refcount_widths.items()))
        distinct = len(self.chains)
        share = f" ({distinct / self.examples:.0%} of examples)" if self.examples else ""
        return [
            ("calls by API", ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items()))
             or "none"),
            ("refcount widths", widths or "none"),
            ("refcount blocks added", f"{self.refcount_blocks_added:,} "
                                      f"({self.refcount_tables_moved:,} tables moved)"),
            ("L2-boundary crossings", f"{self.l2_crossings:,}"),
            ("compressed clusters read", f"{self.compressed_reads:,}"),
            ("parallel jobs", f"{self.parallel_jobs:,} operations with 2+ jobs"),
            ("distinct chains", f"{distinct:,}{share}"),
            ("qcow2 features", ", ".join(f"{k} {v}" for k, v in sorted(self.features.items()))
             or "none"),
        ]

    def coverage_warnings(self) -> list[str]:
        """Paths this run never took: each one is a warning in the run's summary."""
        from .ops import OpKind as Kind

        hit = {name.split(" ")[0] for name in self.ops}
        # (issue 13's operations: by the features warnings below, when the target has them)
        skip = {Kind.WRITE_PAST_END.value, Kind.SWEEP.value, *(k.value for k in FEATURE_KINDS)}
        missing = [f"no {k.value} call" for k in Kind if k.value not in hit | skip]
        figures = {
            "no crash state checked": self.crash_states,
            "no refcount block added": self.refcount_blocks_added,
            "no L2-boundary crossing": self.l2_crossings,
            "no compressed cluster read": self.compressed_reads,
            "no parallel job run": self.parallel_jobs,
        }
        missing += [what for what, n in figures.items() if not n]
        met = {name.split(" ")[0] for name, n in self.features.items() if n}
        for name in sorted(self.features_expected):
            needs = _FEATURE_HITS.get(name, (name,))
            missing += [f"no {hit} hit" for hit in needs if hit not in met]
        widths = [b for b in (1, 2, 4, 8, 16, 32, 64) if not self.refcount_widths[b]]
        if widths:
            missing.append("no chain with refcount_bits " + ", ".join(map(str, widths)))
        return missing

    def example_done(self) -> None:
        self.examples += 1
        if self.on_example is not None:
            self.on_example(self)


#: What a run must meet for each supported feature (others: a layer with that option).
_FEATURE_HITS = {
    "snapshots": ("create_snapshot", "apply_snapshot", "delete_snapshot"),
    "snapshot_open": ("read_snapshot",),
}


def describe_chain(chain: ChainSpec) -> str:
    """``ChainSpec.describe``, naming a driver target's own format as such."""
    parts = []
    for layer in chain.layers:
        if layer.format in ("raw", "qcow2"):
            parts.append(layer.describe())
        else:
            zero = "zero clusters" if layer.compat != "0.10" else "no zero clusters"
            extra = f", preallocation={layer.preallocation}" if layer.preallocation != "off" else ""
            parts.append(
                f"{layer.format} {layer.size:#x} bytes, {layer.cluster_size} B units, {zero}{extra}"
            )
    cache = f", L2 cache {chain.l2_cache_tables}" if chain.l2_cache_tables else ""
    return f"[{chain.storage}{cache}] " + " <- ".join(parts)


def traits_for(layer: LayerSpec) -> LayerTraits:
    """The model traits of a layer spec."""
    if layer.format == "raw":
        return LayerTraits.raw()
    if layer.format == "qcow2":
        return LayerTraits.qcow2(layer.cluster_size, layer.compat,
                                 extended_l2=layer.extended_l2)
    # A driver target's own format: its layout's unit and zero clusters (see fuzz.Layout).
    return LayerTraits(layer.format, layer.cluster_size, layer.compat != "0.10")


_CREATE_PREALLOC: dict[str, PreallocateMode | None] = {
    "off": None,
    "metadata": PreallocateMode.FORMAT_ALLOCATE,
    "falloc": PreallocateMode.FULL_ALLOCATE,
    "full": PreallocateMode.WRITE_DATA,
}

_PAST_END_OPS = ("write", "write_zeroes", "discard_to_zero", "discard_to_any", "discard_to_backing")


def _file_reader(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return read


def _cut_unspecified(op: Op, old_size: int) -> tuple[tuple[int, int], ...]:
    """What a cut during ``op`` may leave unspecified beyond what the model leaves unknown:
    a shrink's cut-off tail, until the new size is on storage; the range of an
    ``ensure_data_mapping`` told the data will be overwritten (the mapping may reach storage
    before the caller's data does: the driver cannot order a write it does not make)."""
    if op.kind is OpKind.RESIZE and op.value < old_size:
        return ((op.value, old_size - op.value),)
    if op.kind is OpKind.ENSURE_DATA_MAPPING and op.mode != "keep":
        return ((op.offset, op.length),)
    return ()


class Session:
    """A chain built with one implementation, driven and checked operation by operation."""

    def __init__(
        self,
        target: ImplementationTarget,
        chain: ChainSpec,
        *,
        workdir: str | None = None,
        stats: RunStats | None = None,
        qemu_img: str | None = "auto",
        build: bool = True,
    ) -> None:
        """Build the chain (running each lower layer's ``build`` ops) and open the top.

        With ``build=False`` nothing is created until :meth:`build` is called (so that a
        failure while building still leaves the log behind).

        ``workdir`` is where file-backed chains live (a fresh temporary folder, removed on
        close, when None).  ``qemu_img``: path of qemu-img for the teardown checks, ``"auto"``
        to look it up, None to skip them.
        """
        self.target = target
        self.chain = chain
        self.stats = stats if stats is not None else RunStats()
        self.log: list[LogEntry] = []
        self.applied: list[Op] = []
        """The operations applied to the top layer once the chain was built."""
        self.step = 0
        self.read_parallelization = 1
        self.write_parallelization = 1
        self.closed = False
        self._qemu_img = shutil.which("qemu-img") if qemu_img == "auto" else qemu_img
        self._tmp: str | None = None
        if chain.storage == "file":
            if workdir is None:
                workdir = self._tmp = tempfile.mkdtemp(prefix="pyimago-oracle-")
            self.workdir: str | None = workdir
        else:
            self.workdir = None
        self._memory: list[MemoryStorage] = []
        self._open: list[Access] = []
        self.models: list[FlatModel] = []
        self.access: Access = None
        self.stats.chain_depths[len(chain.layers)] += 1
        self._started = time.monotonic()
        self.capabilities: DriverCapabilities | None = getattr(target, "capabilities", None)
        self.shadow: Session | None = None
        """With a differential target: the same sequence on the reference, in memory."""
        self._differential = bool(getattr(target, "differential", False))
        self._touched: set[int] = set()
        self._refcounts_at_start: RefcountLayout | None = None
        self._compressed: list[tuple[int, int]] = []
        self._recording = False
        self._slice = 0
        self.full_checks = False
        """Check the whole disk after every operation (replays do: exact, not fast)."""
        self.power: PowerCuts | None = None
        """Power-cut recording of the top layer (targets that are ``crash_safe``)."""
        if getattr(target, "crash_safe", False) and not chain.top.data_file:
            # (A top layer with an external data file spreads its writes over two storages;
            # only the qcow2 file is recorded, so such chains are not cut.)
            self.power = PowerCuts(self._cut_judge())
        if build:
            self.build()

    def _cut_judge(self) -> CutJudge | None:
        if self.chain.top.format != "qcow2":
            return None  # raw has no metadata; a driver's own format is its own business
        if self.chain.top.lazy_refcounts:
            # crash.power-cut is QEMU's promise without lazy refcounts: with them a cut may
            # leave refcounts a repair must rebuild; content and the read-only open still
            # hold.
            return None
        if self._qemu_img:
            return qemu_judge(self._qemu_img)
        return reference_judge()

    def build(self) -> None:
        """Create the chain and open its top layer (see the constructor)."""
        try:
            self._build()
            if self._differential:
                self._build_shadow()
        except BaseException:
            self._cleanup()
            raise

    def _build_shadow(self) -> None:
        shadow = Session(
            reference_target(),
            dataclasses.replace(self.chain, storage="memory"),
            stats=RunStats(),
            qemu_img=None,
            build=False,
        )
        shadow.power = None  # the target's own storage is the one cut
        try:
            shadow.build()
        except Exception as exc:
            raise OracleFailure(
                f"differential: the reference fails on this chain, which the target built: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.shadow = shadow

    # -- chain building -----------------------------------------------------------------------

    def layer_location(self, index: int) -> Any:
        """The path (file chains) or MemoryStorage (memory chains) of a layer."""
        if self.workdir is not None:
            return os.path.join(self.workdir, self._layer_name(index))
        return self._memory[index]

    def _layer_name(self, index: int) -> str:
        return f"layer{index}.{self.chain.layers[index].format}"

    def _create(self, index: int) -> None:
        spec = self.chain.layers[index]
        options: dict[str, Any] = {"format": spec.format}
        if spec.preallocation != "off":
            options["preallocation"] = spec.preallocation
        if spec.format != "raw":
            options["cluster_size"] = spec.cluster_size
            options["compat"] = spec.compat
            if spec.refcount_bits != 16 and spec.format == "qcow2":
                options["refcount_bits"] = spec.refcount_bits
            if spec.format == "qcow2":
                options.update(layer_options(spec, index))
            if index > 0:
                options["backing_file"] = self._layer_name(index - 1)
                options["backing_fmt"] = self.chain.layers[index - 1].format
        if self.workdir is None:
            self._memory.append(MemoryStorage(name=self._layer_name(index)))
        if spec.maker == "qemu":
            self._qemu_create(index)
            return
        self.target.create_image(self.layer_location(index), spec.size, **options)

    def _qemu_create(self, index: int) -> None:
        """A layer QEMU makes and fills (``LayerSpec.maker == "qemu"``), the model kept in
        step: each build operation is logged and numbered as the session's own are."""
        from .features import qemu_make_layer

        spec = self.chain.layers[index]
        qemu_io = shutil.which("qemu-io")
        if self.workdir is None or not self._qemu_img or not qemu_io:
            raise RuntimeError(f"layer {index} is made by QEMU: needs a file chain and "
                               "qemu-img and qemu-io")
        model = self.model
        steps: list[int] = []
        for op in spec.build:
            self.step += 1
            steps.append(self.step)
            self.log.append(LogEntry(self.step, index, op))
            if op.kind is OpKind.WRITE:
                model.write(op.offset, pattern(self.step, op.offset, op.length))
            elif op.kind is OpKind.WRITE_ZEROES:
                model.write_zeroes(op.offset, op.length)
            elif op.kind is OpKind.DISCARD_TO_ZERO:
                model.discard_to_zero(op.offset, op.length)
        backing = None
        if index > 0:
            backing = (self._layer_name(index - 1), self.chain.layers[index - 1].format)
        qemu_make_layer(self._qemu_img, qemu_io, self.layer_location(index), spec, spec.build,
                        steps=steps, backing=backing,
                        data_file_name=f"layer{index}.data")
        self.stats.compressed_clusters += sum(
            -(-op.length // spec.cluster_size) for op in spec.build if op.mode == "compressed")

    def _open_snapshot(self, name_or_id: str) -> Access:
        """The top layer's snapshot ``name_or_id``, opened read-only beside the writable
        open (sharing its lock, as ``qemu-img snapshot`` users read a running image)."""
        spec = self.chain.top
        cache = self.chain.l2_cache_tables
        kwargs: dict[str, Any] = {"writable": False, "format": spec.format,
                                  "snapshot": name_or_id}
        if cache is not None and getattr(self.target, "l2_cache_option", False):
            kwargs["l2_cache_tables"] = cache
        opened: list[Access] = []
        if self.workdir is not None:
            kwargs["force_share"] = True
        else:
            below = self._open_below_for_cuts(opened)
            if below is not None:
                kwargs["backing"] = below
        try:
            access = self.target.open_image(self.layer_location(self.top_index), **kwargs)
        except BaseException:
            for layer in reversed(opened):
                with contextlib.suppress(Exception):
                    layer.close()
            raise
        if opened:
            close = access.close

            def close_all() -> None:
                try:
                    close()
                finally:
                    for layer in reversed(opened):
                        with contextlib.suppress(Exception):
                            layer.close()

            access.close = close_all
        return access

    def _open_layer(self, index: int, *, writable: bool) -> Access:
        """Open layer ``index`` (and, for memory chains, each layer below it explicitly)."""
        spec = self.chain.layers[index]
        cache = self.chain.l2_cache_tables
        recorded = self._recorded_top(index, writable)
        if self.workdir is not None:
            access = self.target.open(
                self.layer_location(index) if recorded is None else recorded,
                writable=writable,
                format=spec.format,
                l2_cache_tables=cache if spec.format == "qcow2" else None,
            )
            self._open.append(access)
            return access
        below: Access = None
        if index > 0:
            below = self._open_layer(index - 1, writable=False)
        access = self.target.open(
            self.layer_location(index) if recorded is None else recorded,
            writable=writable,
            format=spec.format,
            backing=below,
            explicit_backing=spec.format != "raw",
            l2_cache_tables=cache if spec.format == "qcow2" else None,
        )
        self._open.append(access)
        return access

    def _recorded_top(self, index: int, writable: bool) -> Any:
        """The recorded storage to open the top layer through, once the chain is built."""
        power = self.power
        if power is None or not self._recording or index != self.top_index or not writable:
            return None
        if self.workdir is None:
            inner: Any = self._memory[index]
        else:
            factory = getattr(self.target, "file_storage", None) or FileStorage
            inner = factory(self.layer_location(index), writable=True)
        return power.recorder(inner, self.model)

    def _close_all(self) -> None:
        # Top first: an overlay may flush through to what it holds open below.
        opened, self._open = self._open, []
        errors: list[BaseException] = []
        for access in reversed(opened):
            try:
                access.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _build(self) -> None:
        layers = self.chain.layers
        for index, spec in enumerate(layers):
            backing = self.models[-1].snapshot() if self.models else None
            prealloc = create_prealloc(spec, _CREATE_PREALLOC[spec.preallocation])
            model = FlatModel(spec.size, traits_for(spec), backing, prealloc=prealloc)
            # Current from the first layer on: a failure while building a lower layer is
            # torn down against the model of the layer being built, not an AttributeError.
            self.model = model
            self._create(index)
            self.models.append(model)
            for name in spec.features():
                where = "top" if index == len(layers) - 1 else "below"
                self.stats.features[f"{name} ({where})"] += 1
            if spec.maker == "qemu" and index < len(layers) - 1:
                # qemu-io ran its build (see _qemu_create): the target reads it back.
                access = self._open_layer(index, writable=False)
                check_image(access, model, what=f"layer {index} (made by QEMU)")
                self._close_all()
                continue
            if index < len(layers) - 1 and spec.build:
                access = self._open_layer(index, writable=True)
                for op in spec.build:
                    self._run(access, model, op, index)
                check_image(access, model, what=f"layer {index}")
                self._close_all()
                self._compress(index)
        self.model = self.models[-1]
        self.access = self._open_layer(len(layers) - 1, writable=True)
        for op in self.chain.top.build:
            self._run(self.access, self.model, op, len(layers) - 1)
        if self._compressed_ranges(self.top_index):
            self.access.flush()
            self._close_all()
            self._compress(self.top_index)
            self.access = self._open_layer(self.top_index, writable=True)
        if self.power is not None:
            self._start_recording()
        self.stats.bytes_compared += check_image(self.access, self.model, what="top")
        self.stats.granularities[self.model.granularity] += 1
        top = self.chain.top
        if top.format == "qcow2":
            self.stats.refcount_widths[top.refcount_bits] += 1
        self.stats.chains.add(json.dumps(self.chain.to_json(), sort_keys=True))
        self._refcounts_at_start = self._top_refcounts()
        self._compressed = [
            (op.offset, op.offset + op.length)
            for layer in self.chain.layers if layer.format == "qcow2"
            for op in layer.build if op.kind is OpKind.WRITE and op.mode == "compressed"
        ]

    def _top_refcounts(self) -> RefcountLayout | None:
        """The top layer's refcount layout as its bytes say (qcow2 tops only)."""
        if self.chain.top.format != "qcow2":
            return None
        location = self.layer_location(self.top_index)
        try:
            if isinstance(location, MemoryStorage):
                data = location.snapshot()
            else:
                with open(location, "rb") as f:
                    data = f.read()
        except OSError:
            return None
        return refcount_layout(data)

    def _start_recording(self) -> None:
        """Reopen the built top through a recording storage; fingerprint the layers below."""
        assert self.power is not None
        self.access.flush()
        self._close_all()
        for index in range(self.top_index):
            location = self.layer_location(index)
            if isinstance(location, MemoryStorage):
                self.power.watch_lower(f"layer {index}", location.snapshot)
            else:
                self.power.watch_lower(f"layer {index}", _file_reader(location))
        self._recording = True
        self.access = self._open_layer(self.top_index, writable=True)

    def check_power_cuts(self, *, final: bool = False) -> int:
        """Check the cut states since the last check (see :class:`PowerCuts`); ``final``:
        the teardown check (more cuts judged, the lower layers compared)."""
        power = self.power
        if power is None or power.rec is None:
            return 0
        opened: list[Access] = []
        try:
            below = self._open_below_for_cuts(opened)
            spec = self.chain.top
            cache = self.chain.l2_cache_tables if spec.format == "qcow2" else None

            def open_cut(storage: MemoryStorage) -> Any:
                return self.target.open(storage, writable=False, format=spec.format,
                                        backing=below, explicit_backing=spec.format != "raw",
                                        l2_cache_tables=cache)

            before = power.stats.states, power.stats.judged, power.stats.leaks
            checked = power.check(open_cut, step=self.step, final=final)
        except PowerCutFailure as failure:
            raise OracleFailure(str(failure), clauses=failure.clauses) from failure
        finally:
            for access in reversed(opened):
                with contextlib.suppress(Exception):
                    access.close()
        self.stats.crash_checks += 1
        self.stats.crash_states += power.stats.states - before[0]
        self.stats.crash_judged += power.stats.judged - before[1]
        self.stats.crash_leaks += power.stats.leaks - before[2]
        return checked

    def _open_below_for_cuts(self, opened: list[Access]) -> Access:
        """The chain below the top, opened read-only, for opening cut states over."""
        if self.top_index == 0:
            return None
        if self.workdir is not None:
            below = self.target.open(self.layer_location(self.top_index - 1), writable=False,
                                     format=self.chain.layers[self.top_index - 1].format)
            opened.append(below)
            return below
        below = None
        for index in range(self.top_index):
            spec = self.chain.layers[index]
            below = self.target.open(self.layer_location(index), writable=False,
                                     format=spec.format, backing=below,
                                     explicit_backing=spec.format != "raw")
            opened.append(below)
        return below

    def _compressed_ranges(self, index: int) -> list[tuple[int, int]]:
        spec = self.chain.layers[index]
        if spec.format != "qcow2":
            return []
        return [(op.offset, op.length) for op in spec.build
                if op.kind is OpKind.WRITE and op.mode == "compressed"]

    def _compress(self, index: int) -> None:
        ranges = self._compressed_ranges(index)
        if ranges:
            from .fuzz._compress import compress_clusters

            self.stats.compressed_clusters += compress_clusters(self.layer_location(index), ranges)

    # -- operations ---------------------------------------------------------------------------

    @property
    def top_index(self) -> int:
        return len(self.chain.layers) - 1

    def apply(self, op: Op) -> None:
        """Apply ``op`` to the top layer and the model, then check the whole image."""
        self.applied.append(op)
        old_size = self.model.size
        unsupported = self.unsupported_reason(op, self.top_index, self.model) is not None
        try:
            self._run(self.access, self.model, op, self.top_index)
            self.stats.steps += 1
            self.stats.ops[op.kind.value + (" (unsupported)" if unsupported else "")] += 1
            self._check_after(op, old_size)
            self._count(op)
            if op.kind in FEATURE_KINDS and not unsupported:
                self.stats.features[op.kind.value] += 1
            if self.power is not None and op.kind not in _PASSIVE:
                self.power.point(self.model, op.describe(), durable=op.kind is OpKind.SYNC,
                                 unspecified=_cut_unspecified(op, old_size))
            self._touch(op, old_size)
            if self.shadow is not None and not unsupported:
                self._apply_shadow(op)
        except OracleFailure as failure:
            extra = [c for c in op_clauses(op, old_size) if c not in failure.clauses]
            failure.clauses = (*failure.clauses, *extra)
            raise

    def _count(self, op: Op) -> None:
        """The path counters of one applied operation (see ``RunStats``)."""
        if op.kind not in RANGED or op.kind is OpKind.WRITE_PAST_END or op.length <= 0:
            return
        g = self.model.granularity
        start, end = op.offset, op.offset + op.length
        if self.chain.top.format == "qcow2" and op.kind is not OpKind.GET_MAPPING:
            span = self.chain.top.l2_span
            if start // span != (end - 1) // span:
                self.stats.l2_crossings += 1
        reads = op.kind in (OpKind.READ, OpKind.READINTO, OpKind.READV)
        if reads or op.kind in (OpKind.WRITE, OpKind.WRITEV, OpKind.ENSURE_DATA_MAPPING):
            for a, b in self._compressed:
                if a < end and start < b:
                    # Reads go through them; writes copy-on-write from the partial clusters.
                    over = min(b, end) - max(a, start)
                    self.stats.compressed_reads += max(1, -(-over // g)) if reads else 1
        n = self.read_parallelization if reads else self.write_parallelization
        if n > 1 and op.kind is not OpKind.GET_MAPPING and (end - 1) // g > start // g:
            self.stats.parallel_jobs += 1

    def _check_after(self, op: Op, old_size: int) -> None:
        """The incremental check: the whole disk after a resize, reopen, cache drop or
        sweep (or when ``full_checks`` is set); else the units the operation touched, one
        unit either side, plus a slice of the disk that rotates from step to step."""
        model = self.model
        size = model.size
        if self.full_checks or op.kind in _FULL_CHECK or size != old_size or size == 0:
            self.stats.bytes_compared += check_image(self.access, model, what="top")
            return
        g = model.granularity
        if op.kind in RANGED and op.offset < size:
            start = max(op.offset - g, 0)
            end = min(op.offset + max(op.length, 1) + g, size)
            self.stats.bytes_compared += check_image(self.access, model, what="top",
                                                     start=start, end=end)
        piece = max(-(-size // _SLICE_FRACTION), g)
        at = self._slice % size
        self._slice = at + piece
        self.stats.bytes_compared += check_image(self.access, model, what="top",
                                                 start=at, end=at + piece)

    def _apply_shadow(self, op: Op) -> None:
        assert self.shadow is not None
        try:
            self.shadow.apply(op)
        except Exception as exc:
            what = "disagrees with the model" if isinstance(exc, OracleFailure) else "fails"
            raise OracleFailure(
                f"differential: the target did {op.describe().split()[0]} but the reference, "
                f"given the same sequence, {what}: {type(exc).__name__}: {exc}"
            ) from exc
        self.stats.differential_steps += 1

    def _touch(self, op: Op, size: int) -> None:
        if op.kind is OpKind.SWEEP:
            stride = max(op.value, 1)
            spans = [(pos, op.length) for pos in range(op.offset, size, stride)]
        elif op.kind in RANGED and op.kind is not OpKind.WRITE_PAST_END:
            spans = [(op.offset, op.length)]
        else:
            return
        g = self.model.granularity
        for offset, length in spans:
            end = min(offset + length, size)
            if end > offset:
                self._touched.update(range(offset // g, (end - 1) // g + 1))

    def unsupported_reason(self, op: Op, layer: int, model: FlatModel) -> str | None:
        """What of ``op`` the target does not claim to support (None: it is claimed)."""
        caps = self.capabilities
        if caps is None or self.chain.layers[layer].format not in caps.formats:
            return None
        kind = op.kind
        if kind.value.startswith("discard_to_") and not caps.supports_discard(kind.value):
            return kind.value
        if kind is OpKind.RESIZE:
            if op.value > model.size and not caps.supports_grow(op.prealloc):
                return f"grow with {op.prealloc.value}" if caps.resize_grow else "grow"
            if op.value < model.size and not caps.resize_shrink:
                return "shrink"
        return None

    def _expect_unsupported(self, access: Access, op: Op, reason: str) -> None:
        try:
            if op.kind is OpKind.RESIZE:
                access.resize(op.value, op.prealloc)
            else:
                getattr(access, op.kind.value)(op.offset, op.length)
        except io.UnsupportedOperation:
            self.stats.unsupported_checked += 1
            return
        except Exception as exc:
            raise OracleFailure(
                f"{op.describe()}: the target does not claim '{reason}', so it must raise "
                f"UnsupportedError; it raised {type(exc).__name__}: {exc}",
                offset=op.offset if op.kind in RANGED else None,
                clauses=("access.unsupported",),
            ) from exc
        raise OracleFailure(
            f"{op.describe()}: the target does not claim '{reason}', but the request did not "
            "raise UnsupportedError",
            offset=op.offset if op.kind in RANGED else None,
            clauses=("access.unsupported",),
        )

    def _run(self, access: Access, model: FlatModel, op: Op, layer: int) -> None:
        self.step += 1
        step = self.step
        self.log.append(LogEntry(step, layer, op))
        kind = op.kind
        off, length = op.offset, op.length
        reason = self.unsupported_reason(op, layer, model)
        if reason is not None:
            self._expect_unsupported(access, op, reason)
        elif kind is OpKind.READ:
            self._compare_read(model, off, length, access.read(off, length), "read")
        elif kind is OpKind.WRITE:
            data = pattern(step, off, length)
            access.write(data, off)
            model.write(off, data)
        elif kind is OpKind.WRITE_ZEROES:
            access.write_zeroes(off, length)
            model.write_zeroes(off, length)
        elif kind is OpKind.DISCARD_TO_ZERO:
            access.discard_to_zero(off, length)
            model.discard_to_zero(off, length)
        elif kind is OpKind.DISCARD_TO_ANY:
            access.discard_to_any(off, length)
            model.discard_to_any(off, length)
        elif kind is OpKind.DISCARD_TO_BACKING:
            access.discard_to_backing(off, length)
            model.discard_to_backing(off, length)
        elif kind is OpKind.WRITE_PAST_END:
            self._past_end(access, model, op, step)
        elif kind is OpKind.RESIZE:
            access.resize(op.value, op.prealloc)
            model.resize(op.value, op.prealloc)
        elif kind is OpKind.FLUSH:
            access.flush()
        elif kind is OpKind.INVALIDATE:
            access.flush()
            access.invalidate_cache()
        elif kind is OpKind.REOPEN:
            self._reopen()
        elif kind is OpKind.SWEEP:
            stride = max(op.value, 1)
            for pos in range(off, model.size, stride):
                n = min(length, model.size - pos)
                data = pattern(step, pos, n)
                access.write(data, pos)
                model.write(pos, data)
                if self.power is not None and self._recording:
                    # Each write of the sweep is a state a cut may show.
                    self.power.point(model, f"{op.describe()}: write at 0x{pos:x}")
        elif kind is OpKind.READ_PARALLEL:
            access.set_read_parallelization(op.value)
            self.read_parallelization = op.value
        elif kind is OpKind.WRITE_PARALLEL:
            access.set_write_parallelization(op.value)
            self.write_parallelization = op.value
        elif kind in (OpKind.READINTO, OpKind.READV):
            buffers = [bytearray(n) for n in op.buffers]
            if kind is OpKind.READINTO:
                access.readinto(buffers[0], off)
            else:
                access.readv(buffers, off)
            self._compare_read(model, off, length, b"".join(buffers), kind.value)
        elif kind is OpKind.WRITEV:
            data = pattern(step, off, length)
            view = memoryview(data)
            cuts = [0]
            for n in op.buffers:
                cuts.append(cuts[-1] + n)
            access.writev([view[a:b] for a, b in itertools.pairwise(cuts)], off)
            model.write(off, data)
        elif kind is OpKind.ENSURE_DATA_MAPPING:
            self._ensure_and_write(access, model, op, step)
        elif kind is OpKind.GET_MAPPING:
            check_small_mapping(access, model, off, length)
        elif kind is OpKind.SYNC:
            access.flush()
            access.sync()
        elif kind is OpKind.POWER_CUT:
            self.check_power_cuts()
        elif kind in FEATURE_KINDS:
            self.stats.bytes_compared += run_feature_op(
                access, model, op, step, self._open_snapshot,
                data_file=bool(self.chain.layers[layer].data_file))
        else:  # pragma: no cover - every kind is handled above
            raise AssertionError(f"unhandled operation {kind}")

    def _compare_read(
        self, model: FlatModel, off: int, length: int, actual: bytes, call: str
    ) -> None:
        if len(actual) != length:
            raise OracleFailure(
                f"{call} of 0x{length:x} bytes at 0x{off:x} returned 0x{len(actual):x}",
                offset=off,
            )
        expected, known = model.read(off, length)
        bad = first_mismatch(actual, expected, known)
        if bad is not None:
            raise OracleFailure(
                content_failure(call, off, bad, actual, expected), offset=off + bad
            )
        self.stats.bytes_compared += length

    def _ensure_and_write(self, access: Access, model: FlatModel, op: Op, step: int) -> None:
        """``ensure_data_mapping``, then the guest data written straight to the storage it
        returned: what a caller doing its own I/O (a block job, an NBD server) does."""
        overwrite = op.mode != "keep"
        # Keeping: what the range reads now must still read so where we do not write.
        before = b"" if overwrite else bytes(access.read(op.offset, op.length))
        if before:
            self._compare_read(model, op.offset, op.length, before, "read before ensure")
        storage, host, mapped = access.ensure_data_mapping(op.offset, op.length, overwrite)
        if not 0 < mapped <= op.length:
            raise OracleFailure(
                f"ensure_data_mapping(0x{op.offset:x}, 0x{op.length:x}) mapped 0x{mapped:x} "
                "bytes: it maps 1..length bytes",
                offset=op.offset,
                clauses=("access.mapping.tiling",),
            )
        # Keeping: write only the first half, so the rest must still read what it did.
        n = mapped if overwrite else max(1, mapped // 2)
        data = pattern(step, op.offset, n)
        storage.write(data, host)
        # The whole mapped range is now this layer's data: ours, then what it read before.
        model.write(op.offset, data + before[n:mapped])

    def _past_end(self, access: Access, model: FlatModel, op: Op, step: int) -> None:
        name = op.mode or "write"
        if name not in _PAST_END_OPS:
            raise ValueError(f"write_past_end: unknown operation {name!r}")
        if model.in_range(op.offset, op.length):
            raise ValueError(f"write_past_end: {op.describe()} lies inside the disk")
        try:
            if name == "write":
                access.write(pattern(step, op.offset, op.length), op.offset)
            else:
                getattr(access, name)(op.offset, op.length)
        except InvalidRequestError:
            return
        except io.UnsupportedOperation:
            # A discard the target does not implement may say so before checking the range.
            if self.capabilities is None or self.capabilities.supports_discard(name):
                raise
            return
        raise OracleFailure(
            f"{name} of 0x{op.length:x} bytes at 0x{op.offset:x} runs past the disk end "
            f"0x{model.size:x} but was not rejected with InvalidRequestError",
            offset=max(op.offset, model.size),
        )

    def _reopen(self) -> None:
        self.access.flush()
        self._close_all()
        if self._differential:
            self.reference_check("after close")
        self.access = self._open_layer(self.top_index, writable=True)
        if self.read_parallelization != 1:
            self.access.set_read_parallelization(self.read_parallelization)
        if self.write_parallelization != 1:
            self.access.set_write_parallelization(self.write_parallelization)

    # -- teardown -----------------------------------------------------------------------------

    def close(self, *, verify: bool = True) -> None:
        """Close the chain; for file chains with qemu-img around, let QEMU check it too."""
        if self.closed:
            return
        self.closed = True
        self.stats.storage_steps[self.chain.storage] += len(self.applied)
        seconds = self.stats.storage_seconds
        seconds[self.chain.storage] = (
            seconds.get(self.chain.storage, 0.0) + time.monotonic() - self._started
        )
        self.stats.granules_touched += len(self._touched)
        if self._touched and self.chain.top.format == "qcow2":
            per_table = max(self.model.granularity // 8, 1)
            self.stats.l2_tables_touched += len({unit // per_table for unit in self._touched})
        try:
            if verify and self.access is not None and not getattr(self.access, "closed", False):
                self.stats.bytes_compared += check_image(self.access, self.model,
                                                         what="top at teardown")
            self._close_all()
            self._count_refcounts()
            if self.power is not None:
                self.power.point(self.model, "close")
                if verify:
                    self.check_power_cuts(final=True)
            if verify and self._differential:
                self.reference_check("at teardown")
            if verify and self.workdir is not None and self._qemu_img:
                self._qemu_verify(self._qemu_img)
        finally:
            self._cleanup()
            if self.shadow is not None:
                with contextlib.suppress(Exception):
                    self.shadow.close(verify=False)

    def _count_refcounts(self) -> None:
        before, after = self._refcounts_at_start, self._top_refcounts()
        if before is None or after is None:
            return
        self.stats.refcount_blocks_added += max(after.blocks - before.blocks, 0)
        self.stats.refcount_tables_moved += after.table_offset != before.table_offset

    def reference_check(self, when: str) -> None:
        """Read the (closed) chain back with ``pyimago.reference``; check it against the model.

        This is how a symmetric on-disk bug is caught: one the target's own reads undo (an
        entry written to the wrong place and read from the same wrong place).
        """
        ref = reference_target()
        opened: list[Access] = []
        try:
            if self.workdir is not None:
                top = ref.open(self.layer_location(self.top_index), writable=False,
                               format=self.chain.top.format)
                opened.append(top)
            else:
                top = None
                for index, spec in enumerate(self.chain.layers):
                    top = ref.open(self.layer_location(index), writable=False,
                                   format=spec.format, backing=top,
                                   explicit_backing=spec.format != "raw")
                    opened.append(top)
            self.stats.bytes_compared += check_image(
                top, self.model, what=f"top {when}, read back by the reference"
            )
            self.stats.reference_reads += 1
        except OracleFailure:
            raise
        except Exception as exc:
            raise OracleFailure(
                f"differential: the reference cannot read the image the target wrote "
                f"({when}): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for access in reversed(opened):
                with contextlib.suppress(Exception):
                    access.close()

    def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self._close_all()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _qemu_verify(self, qemu_img: str) -> None:
        for index, spec in enumerate(self.chain.layers):
            if spec.format != "qcow2":
                continue
            path = self.layer_location(index)
            proc = subprocess.run(
                [qemu_img, "check", "-f", "qcow2", path],
                capture_output=True,
                text=True,
                check=False,
                cwd=self.workdir,  # QEMU 7 finds a relative data file from there
            )
            self.stats.qemu_checks += 1
            if proc.returncode != 0:
                raise OracleFailure(
                    f"qemu-img check of layer {index} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout}{proc.stderr}",
                    clauses=("interop.qemu-check", "qcow2.refcount.no-leaks"),
                )
        top = self.chain.top
        top_path = self.layer_location(self.top_index)
        if top.format not in ("qcow2", "raw"):
            return  # a driver target's own format: QEMU cannot read it
        if top.format == "qcow2":
            assert self.workdir is not None
            out = os.path.join(self.workdir, "converted.raw")
            proc = subprocess.run(
                [qemu_img, "convert", "-f", "qcow2", "-O", "raw", top_path, out],
                capture_output=True,
                text=True,
                check=False,
                cwd=self.workdir,
            )
            if proc.returncode != 0:
                raise OracleFailure(
                    f"qemu-img convert of the top layer failed (exit {proc.returncode}):\n"
                    f"{proc.stdout}{proc.stderr}",
                    clauses=("interop.qemu-read",),
                )
        else:
            out = top_path
        with open(out, "rb") as f:
            data = f.read()
        if len(data) != self.model.size:
            raise OracleFailure(
                f"qemu-img sees a disk of 0x{len(data):x} bytes, the model 0x{self.model.size:x}",
                clauses=("interop.qemu-read",),
            )
        expected, known = self.model.read(0, self.model.size)
        bad = first_mismatch(data, expected, known)
        if bad is not None:
            raise OracleFailure(
                content_failure("qemu-img convert", 0, bad, data, expected),
                offset=bad,
                clauses=("interop.qemu-read",),
            )

    # -- reporting ----------------------------------------------------------------------------

    def format_log(self, *, failed: BaseException | None = None) -> str:
        """The fsx-style numbered log; ops covering the failing offset are marked."""
        offset = failed.offset if isinstance(failed, OracleFailure) else None
        lines = [
            f"pyimago oracle log (target {self.target.name})",
            f"chain: {describe_chain(self.chain)}",
        ]
        layer = -1
        for entry in self.log:
            if entry.layer != layer:
                layer = entry.layer
                title = "top" if layer == self.top_index else f"layer {layer} (build)"
                lines.append(f"    --- {title} ---")
            mark = ""
            if offset is not None and entry.op.touches(offset):
                mark = f"    <== covers 0x{offset:x}"
            lines.append(f"{entry.step:5d} {entry.op.describe()}{mark}")
        if failed is not None:
            where = f" at 0x{offset:x}" if offset is not None else ""
            lines.append(f"*** step {self.step} FAILED{where}: {type(failed).__name__}: {failed}")
            if isinstance(failed, OracleFailure) and failed.clauses:
                lines.append(f"    spec clauses: {', '.join(failed.clauses)}")
        return "\n".join(lines)

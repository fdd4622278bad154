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
    EofMapping,
    IndirectMapping,
    InvalidRequestError,
    MemoryStorage,
    PreallocateMode,
    RawMapping,
    SpecialMapping,
    ZeroMapping,
)

from .model import Alloc, FlatModel, LayerTraits, first_mismatch
from .ops import RANGED, ChainSpec, LayerSpec, Op, OpKind, decode_word, pattern
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


class OracleFailure(AssertionError):
    """The implementation disagreed with the model (or broke a mapping invariant).

    ``offset`` is the guest offset that went wrong, when there is one; ``clauses`` the spec
    clause IDs the failure most likely breaks (the check's own, then the operation's).
    """

    def __init__(
        self, message: str, *, offset: int | None = None, clauses: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.clauses = clauses


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
}


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

    def example_done(self) -> None:
        self.examples += 1
        if self.on_example is not None:
            self.on_example(self)


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
        return LayerTraits.qcow2(layer.cluster_size, layer.compat)
    # A driver target's own format: its layout's unit and zero clusters (see fuzz.Layout).
    return LayerTraits(layer.format, layer.cluster_size, layer.compat != "0.10")


def _hex(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def _word_story(data: bytes) -> str:
    origin = decode_word(data)
    if origin is None:
        return "not written by any step"
    step, offset = origin
    return f"data of step {step} (mod 255) for offset 0x{offset:x}"


def _content_failure(what: str, base: int, index: int, actual: bytes, expected: bytes) -> str:
    word = index - index % 4
    got = actual[word : word + 4]
    want = expected[word : word + 4]
    return (
        f"{what}: byte 0x{base + index:x} reads 0x{actual[index]:02x}, the model expects "
        f"0x{expected[index]:02x}; the word at 0x{base + word:x} reads [{_hex(got)}] "
        f"({_word_story(got)}), expected [{_hex(want)}] ({_word_story(want)})"
    )


def _shallow_kind(mapping: Any, offset: int) -> Alloc:
    if isinstance(mapping, (RawMapping, SpecialMapping)):
        return Alloc.DATA
    if isinstance(mapping, ZeroMapping):
        return Alloc.ZERO if mapping.explicit else Alloc.BACKING
    if isinstance(mapping, IndirectMapping):
        return Alloc.BACKING
    raise OracleFailure(f"get_shallow_mapping(0x{offset:x}) returned {mapping!r}", offset=offset)


def _shallow_units(access: Access, model: FlatModel) -> list[set[Alloc]]:
    """What the layer maps each allocation unit to, walking ``get_shallow_mapping``."""
    size = model.size
    g = model.granularity
    units: list[set[Alloc]] = [set() for _ in range(len(model.alloc))]
    pos = 0
    while pos < size:
        mapping, length = access.get_shallow_mapping(pos, size - pos)
        if isinstance(mapping, EofMapping):
            raise OracleFailure(
                f"get_shallow_mapping(0x{pos:x}) reports EOF before the disk end 0x{size:x}",
                offset=pos,
                clauses=("access.mapping.eof-top-only",),
            )
        if length <= 0 or pos + length > size:
            raise OracleFailure(
                f"get_shallow_mapping(0x{pos:x}, 0x{size - pos:x}) returned {mapping} with "
                f"length 0x{length:x}",
                offset=pos,
                clauses=("access.mapping.tiling",),
            )
        kind = _shallow_kind(mapping, pos)
        for unit in range(pos // g, (pos + length - 1) // g + 1):
            units[unit].add(kind)
        pos += length
    mapping, length = access.get_shallow_mapping(size, g)
    if not isinstance(mapping, EofMapping) or length != 0:
        raise OracleFailure(
            f"get_shallow_mapping at the disk end 0x{size:x} returned ({mapping}, {length}), "
            "not EOF",
            offset=size,
            clauses=("access.mapping.eof-top-only",),
        )
    return units


def check_image(access: Access, model: FlatModel, *, what: str = "image") -> int:
    """Check one image against its model; return how many bytes were compared.

    Size; content on every known byte; ``get_shallow_mapping`` against the model's
    allocation sets; ``get_mapping`` consistency: the lengths tile the disk, EOF only at the
    end, a zero mapping reads zeroes, explicit zeroes only where this layer has them, a raw
    mapping's storage holds what the guest reads.
    """
    size = model.size
    if access.size != size:
        raise OracleFailure(f"{what}: size is 0x{access.size:x}, the model says 0x{size:x}")
    actual = access.read(0, size)
    if len(actual) != size:
        raise OracleFailure(f"{what}: read of 0x{size:x} bytes returned 0x{len(actual):x}")
    expected, known = model.read(0, size)
    bad = first_mismatch(actual, expected, known)
    if bad is not None:
        raise OracleFailure(
            _content_failure(f"{what}: content", 0, bad, actual, expected), offset=bad
        )

    units = _shallow_units(access, model)
    g = model.granularity
    for unit, kinds in enumerate(units):
        start = unit * g
        if len(kinds) != 1:
            names = ", ".join(sorted(k.value for k in kinds))
            raise OracleFailure(
                f"{what}: unit 0x{start:x} (of 0x{g:x} bytes) maps as several kinds: {names}",
                offset=start,
            )
        (kind,) = kinds
        allowed = model.allowed(unit)
        if kind not in allowed:
            names = ", ".join(sorted(k.value for k in allowed))
            raise OracleFailure(
                f"{what}: unit 0x{start:x} (of 0x{g:x} bytes) maps as {kind.value}; the model "
                f"allows only {names}",
                offset=start,
            )

    pos = 0
    while pos < size:
        mapping, length = access.get_mapping(pos, size - pos + g)
        if isinstance(mapping, EofMapping):
            raise OracleFailure(
                f"{what}: get_mapping(0x{pos:x}) reports EOF before the disk end 0x{size:x}",
                offset=pos,
                clauses=("access.mapping.eof-top-only",),
            )
        if length <= 0 or pos + length > size:
            raise OracleFailure(
                f"{what}: get_mapping(0x{pos:x}) returned {mapping} with length 0x{length:x}, "
                f"which does not tile the disk (end 0x{size:x})",
                offset=pos,
                clauses=("access.mapping.tiling",),
            )
        chunk = actual[pos : pos + length]
        if isinstance(mapping, ZeroMapping):
            nonzero = len(chunk) - len(chunk.lstrip(b"\x00"))
            if nonzero != len(chunk):
                raise OracleFailure(
                    f"{what}: get_mapping(0x{pos:x}) says zero for 0x{length:x} bytes but byte "
                    f"0x{pos + nonzero:x} reads 0x{chunk[nonzero]:02x}",
                    offset=pos + nonzero,
                )
            if mapping.explicit:
                for unit in range(pos // g, (pos + length - 1) // g + 1):
                    if units[unit] != {Alloc.ZERO}:
                        raise OracleFailure(
                            f"{what}: get_mapping(0x{pos:x}) reports an explicit zero, but "
                            f"this layer maps unit 0x{unit * g:x} as "
                            f"{'/'.join(k.value for k in units[unit])}: explicit zeroes "
                            "may only come from the top layer",
                            offset=max(pos, unit * g),
                            clauses=("access.mapping.explicit-top-only",),
                        )
        elif isinstance(mapping, RawMapping):
            stored = mapping.storage.read(mapping.offset, length)
            if stored != chunk:
                bad = first_mismatch(stored, chunk, b"\x01" * length)
                assert bad is not None
                raise OracleFailure(
                    f"{what}: get_mapping(0x{pos:x}) maps to {mapping}, whose bytes differ from "
                    f"what the guest reads at 0x{pos + bad:x}",
                    offset=pos + bad,
                    clauses=("access.mapping.tiling",),
                )
            if mapping.writable:
                for unit in range(pos // g, (pos + length - 1) // g + 1):
                    if units[unit] != {Alloc.DATA}:
                        raise OracleFailure(
                            f"{what}: get_mapping(0x{pos:x}) reports {mapping} writable, but "
                            f"this layer does not hold unit 0x{unit * g:x}: data reached "
                            "through a read-only backing must not be writable",
                            offset=max(pos, unit * g),
                            clauses=("access.mapping.writable-gate",),
                        )
        elif not isinstance(mapping, SpecialMapping):
            raise OracleFailure(f"{what}: get_mapping(0x{pos:x}) returned {mapping!r}", offset=pos)
        pos += length
    mapping, length = access.get_mapping(size, g)
    if not isinstance(mapping, EofMapping) or length != 0:
        raise OracleFailure(
            f"{what}: get_mapping at the disk end 0x{size:x} returned ({mapping}, {length}), "
            "not EOF",
            offset=size,
            clauses=("access.mapping.eof-top-only",),
        )
    return size


# create_image's preallocation names, as the grow from 0 they amount to.
_CREATE_PREALLOC: dict[str, PreallocateMode | None] = {
    "off": None,
    "metadata": PreallocateMode.FORMAT_ALLOCATE,
    "falloc": PreallocateMode.FULL_ALLOCATE,
    "full": PreallocateMode.WRITE_DATA,
}

_PAST_END_OPS = ("write", "write_zeroes", "discard_to_zero", "discard_to_any", "discard_to_backing")


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
        if build:
            self.build()

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
            if index > 0:
                options["backing_file"] = self._layer_name(index - 1)
                options["backing_fmt"] = self.chain.layers[index - 1].format
        if self.workdir is None:
            self._memory.append(MemoryStorage(name=self._layer_name(index)))
        self.target.create_image(self.layer_location(index), spec.size, **options)

    def _open_layer(self, index: int, *, writable: bool) -> Access:
        """Open layer ``index`` (and, for memory chains, each layer below it explicitly)."""
        spec = self.chain.layers[index]
        cache = self.chain.l2_cache_tables
        if self.workdir is not None:
            access = self.target.open(
                self.layer_location(index),
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
            self.layer_location(index),
            writable=writable,
            format=spec.format,
            backing=below,
            explicit_backing=spec.format != "raw",
            l2_cache_tables=cache if spec.format == "qcow2" else None,
        )
        self._open.append(access)
        return access

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
            model = FlatModel(
                spec.size, traits_for(spec), backing, prealloc=_CREATE_PREALLOC[spec.preallocation]
            )
            self._create(index)
            self.models.append(model)
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
        self.stats.bytes_compared += check_image(self.access, self.model, what="top")
        self.stats.granularities[self.model.granularity] += 1

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
            self.stats.bytes_compared += check_image(self.access, self.model, what="top")
            self._touch(op, old_size)
            if self.shadow is not None and not unsupported:
                self._apply_shadow(op)
        except OracleFailure as failure:
            extra = [c for c in op_clauses(op, old_size) if c not in failure.clauses]
            failure.clauses = (*failure.clauses, *extra)
            raise

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
            actual = access.read(off, length)
            if len(actual) != length:
                raise OracleFailure(
                    f"read of 0x{length:x} bytes at 0x{off:x} returned 0x{len(actual):x}",
                    offset=off,
                )
            expected, known = model.read(off, length)
            bad = first_mismatch(actual, expected, known)
            if bad is not None:
                raise OracleFailure(
                    _content_failure("read", off, bad, actual, expected), offset=off + bad
                )
            self.stats.bytes_compared += length
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
        elif kind is OpKind.READ_PARALLEL:
            access.set_read_parallelization(op.value)
            self.read_parallelization = op.value
        elif kind is OpKind.WRITE_PARALLEL:
            access.set_write_parallelization(op.value)
            self.write_parallelization = op.value
        else:  # pragma: no cover - every kind is handled above
            raise AssertionError(f"unhandled operation {kind}")

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
            self._close_all()
            if verify and self._differential:
                self.reference_check("at teardown")
            if verify and self.workdir is not None and self._qemu_img:
                self._qemu_verify(self._qemu_img)
        finally:
            self._cleanup()
            if self.shadow is not None:
                with contextlib.suppress(Exception):
                    self.shadow.close(verify=False)

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
                _content_failure("qemu-img convert", 0, bad, data, expected),
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

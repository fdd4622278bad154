"""Chain building for a session: creating each layer, running its build ops, compressing
its clusters, opening the chain (the top through the power-cut recorder once built)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyimago.reference import FileStorage, MemoryStorage, PreallocateMode

from ._check import check_image
from ._feature_run import create_prealloc, layer_options, qemu_create
from ._journal import PairedRecording
from ._probe import RefcountLayout, refcount_layout
from ._run_stats import RunStats
from .model import FlatModel, LayerTraits
from .ops import ChainSpec, LayerSpec, Op, OpKind

if TYPE_CHECKING:
    from ._op_table import LogEntry
    from ._power import PowerCuts
    from .fuzz import DriverCapabilities
    from .session import Session
    from .targets import ImplementationTarget

__all__ = ["Access", "ChainBuilder", "chain_key", "describe_chain", "traits_for"]

Access = Any
"""A FormatAccess-like object (the reference's, or any implementation's)."""


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


def chain_key(chain: ChainSpec) -> str:
    """A chain's identity for the diversity figure (its JSON, keys sorted)."""
    return json.dumps(chain.to_json(), sort_keys=True)


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


def _file_reader(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return read


class ChainBuilder:
    """The chain-building part of a :class:`~pyimago.oracle.session.Session` (its state is
    declared here; the session's constructor sets it)."""

    target: ImplementationTarget
    chain: ChainSpec
    stats: RunStats
    log: list[LogEntry]
    applied: list[Op]
    step: int
    read_parallelization: int
    write_parallelization: int
    closed: bool
    workdir: str | None
    models: list[FlatModel]
    model: FlatModel
    access: Access
    capabilities: DriverCapabilities | None
    shadow: Session | None
    power: PowerCuts | None
    full_checks: bool
    _qemu_img: str | None
    _tmp: str | None
    _memory: list[MemoryStorage]
    _open: list[Access]
    _differential: bool
    _touched: set[int]
    _refcounts_at_start: RefcountLayout | None
    _compressed: list[tuple[int, int]]
    _recording: bool
    _slice: int
    _slice_credit: int

    def _run(self, access: Access, model: FlatModel, op: Op, layer: int) -> None:
        raise NotImplementedError  # the session's operations part (see _apply.Applier)

    @property
    def top_index(self) -> int:
        return len(self.chain.layers) - 1

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
            qemu_create(self, index)  # made and filled by QEMU, the model kept in step
            return
        self.target.create_image(self.layer_location(index), spec.size, **options)

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
                data_file=self._recorded_data_file(index, recorded),
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

    def _recorded_data_file(self, index: int, recorded: Any) -> Any:
        """The recorded top's external data file, recorded with it in one order (None for a
        top without one, or one not opened through the recorder)."""
        if not isinstance(recorded, PairedRecording) or self.workdir is None:
            return None
        factory = getattr(self.target, "file_storage", None) or FileStorage
        inner = factory(os.path.join(self.workdir, f"layer{index}.data"), writable=True)
        return recorded.attach_data_file(inner)

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
                # qemu-io ran its build: the target reads it back.
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
        self.stats.chains.add(chain_key(self.chain))
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
                if self.chain.layers[index].data_file:
                    # crash.readonly-open: a lower layer's data file is read-only too.
                    data = os.path.join(os.path.dirname(location), f"layer{index}.data")
                    self.power.watch_lower(f"layer {index}'s data file", _file_reader(data))
        self._recording = True
        self.access = self._open_layer(self.top_index, writable=True)

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

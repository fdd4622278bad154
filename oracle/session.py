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
import shutil
import tempfile
import time
from collections.abc import Callable

from ._apply import Applier
from ._chain import describe_chain, traits_for
from ._check import OracleFailure, check_image
from ._feature_run import FEATURE_KINDS
from ._journal import PairedRecording
from ._op_table import PASSIVE, LogEntry, cut_unspecified, op_clauses
from ._power import PowerCuts
from ._run_stats import RunStats
from .crash import CutJudge, qemu_judge, reference_judge
from .ops import ChainSpec, Op, OpKind
from .targets import ImplementationTarget, reference_target

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


class Session(Applier):
    """A chain built with one implementation, driven and checked operation by operation.

    Its parts live in private modules: chain building (``_chain``), checking (``_verify``),
    applying operations (``_apply``); this class holds the life cycle.
    """

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
        self.log = []
        self.applied = []
        """The operations applied to the top layer once the chain was built."""
        self.step = 0
        self.read_parallelization = 1
        self.write_parallelization = 1
        self.closed = False
        self._qemu_img = shutil.which("qemu-img") if qemu_img == "auto" else qemu_img
        self._tmp = None
        if chain.storage == "file":
            if workdir is None:
                workdir = self._tmp = tempfile.mkdtemp(prefix="pyimago-oracle-")
            self.workdir = workdir
        else:
            self.workdir = None
        self._memory = []
        self._open = []
        self.models = []
        self.access = None
        self.stats.chain_depths[len(chain.layers)] += 1
        self._started = time.monotonic()
        self.capabilities = getattr(target, "capabilities", None)
        self.shadow = None
        """With a differential target: the same sequence on the reference, in memory."""
        self._differential = bool(getattr(target, "differential", False))
        self._touched = set()
        self._refcounts_at_start = None
        self._compressed = []
        self._recording = False
        self._slice = 0
        self._slice_credit = 0
        self.full_checks = False
        """Check the whole disk after every operation (replays do: exact, not fast)."""
        self.power = None
        """Power-cut recording of the top layer (targets that are ``crash_safe``)."""
        if getattr(target, "crash_safe", False):
            self.power = PowerCuts(self._cut_judge())
            if chain.top.data_file:
                # The top's writes spread over its qcow2 file and its data file: both are
                # recorded in one order, and a cut stops both (crash.oracle-rule).
                self.power.recording = PairedRecording
        if build:
            self.build()

    def _cut_judge(self) -> CutJudge | None:
        if self.chain.top.format != "qcow2":
            return None  # raw has no metadata; a driver's own format is its own business
        if self.chain.top.lazy_refcounts:
            # crash.power-cut is QEMU's promise without lazy refcounts: with them a cut may
            # leave refcounts a repair must rebuild, so qemu-img check -r all judges what is
            # left after repairing; content and the read-only open hold as ever.
            return qemu_judge(self._qemu_img, repair=True, data_file=self._cut_data_file()) \
                if self._qemu_img else None
        if self._qemu_img:
            return qemu_judge(self._qemu_img, data_file=self._cut_data_file())
        return reference_judge()

    def _cut_data_file(self) -> Callable[[], bytearray | None] | None:
        """For a top with an external data file: the data file's bytes in the cut state
        being judged (see :class:`~pyimago.oracle._journal.PairedRecording`)."""
        if not self.chain.top.data_file:
            return None

        def data_state() -> bytearray | None:
            rec = self.power.rec if self.power is not None else None
            return rec.data_state if isinstance(rec, PairedRecording) else None

        return data_state

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

    # -- operations ---------------------------------------------------------------------------

    def apply(self, op: Op, *, burst: bool = False) -> None:
        """Apply ``op`` to the top layer and the model, then check the image (what it
        touched and a rotating slice; ``burst``: an operation of a burst, checked lighter)."""
        self.applied.append(op)
        old_size = self.model.size
        unsupported = self.unsupported_reason(op, self.top_index, self.model) is not None
        try:
            self._run(self.access, self.model, op, self.top_index)
            self.stats.steps += 1
            self.stats.ops[op.kind.value + (" (unsupported)" if unsupported else "")] += 1
            self._check_after(op, old_size, burst=burst)
            self._count(op)
            if op.kind in FEATURE_KINDS and not unsupported:
                self.stats.features[op.kind.value] += 1
            if self.power is not None and op.kind not in PASSIVE:
                self.power.point(self.model, op.describe(), durable=op.kind is OpKind.SYNC,
                                 unspecified=cut_unspecified(op, old_size))
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
            if verify and self.workdir is None:
                self._memory_verify()
        finally:
            self._cleanup()
            if self.shadow is not None:
                with contextlib.suppress(Exception):
                    self.shadow.close(verify=False)

    def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self._close_all()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

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

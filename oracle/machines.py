"""The Hypothesis state machines: any implementation, driven against the flat model.

``make_machine(target)`` builds a ``RuleBasedStateMachine`` class around a target, so the
same machine runs against the reference, ``pyimago.fast``, a mutant or a third party's
implementation::

    TestReference = make_machine(reference_target()).TestCase

Each example builds a chain in ``@initialize`` (see :func:`~pyimago.oracle.strategies.
chain_specs`), then every rule applies one operation to the implementation and the model and
checks the whole disk (content on known bytes, size, mappings).  At teardown, file-backed
chains are checked by ``qemu-img check`` and compared with ``qemu-img convert`` when
qemu-img is installed.

When an example fails, the final (shrunk) run notes the fsx-style operation log in
Hypothesis's report and writes a replay file (``pyimago replay FILE`` runs it again).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from pyimago.reference import PreallocateMode

from ._burst import BURST_MIXES, burst_choices, decode_burst
from ._check import OracleFailure
from ._constants import pin_local_constants
from ._feature_run import ODD_COMPRESSED
from .features import FeatureSupport, probe_features
from .model import Alloc
from .ops import ChainSpec, Op, OpKind
from .replay import DEFAULT_FAILURES_DIR, replay_record, write_replay
from .session import RunStats, Session
from .strategies import (
    PAST_END_NAMES,
    Geometry,
    chain_specs,
    grow_ops,
    mapping_lengths,
    max_disk_size,
    modify_ranges,
    outgrows_refcount_table,
    past_end_ops,
    read_ranges,
    shrink_ops,
    split_buffers,
    straddle_ranges,
    sweep_ops,
)
from .targets import ImplementationTarget

__all__ = ["make_machine"]

# Where data was written is where zeroing, discarding, resizing and reading find bugs.
_HOT_KINDS = frozenset({OpKind.WRITE})
_CLEAR_KINDS = frozenset({OpKind.WRITE_ZEROES, OpKind.DISCARD_TO_ZERO, OpKind.DISCARD_TO_ANY,
                          OpKind.DISCARD_TO_BACKING})

#: Reads at least this long are split into parallel jobs by any implementation that splits.
_LARGE_READ = 256 << 10

#: The aimed rules build their precondition on tops of clusters up to this size only (more
#: would cost more than it finds: the geometry is the same).
_SMALL_CLUSTER = 64 << 10
#: ... and on tops whose L2 tables map up to this much (4 KiB clusters): a disk within one
#: table's reach is grown into a second one first.
_SMALL_SPAN = 2 << 20

#: The aimed rules, each of which builds a situation the others reach only by luck (issue
#: 9's unseen mutants hid there), and how many copies of each are rules (each with its own
#: feature flag: Hypothesis turns some rules off in each example): on
#: one chain in three or four only (a v3 top, small clusters; a backing; snapshots) do they
#: find anything, and the ``ci`` budget runs each plain rule about once per example in three.
_AIMED = {"compressed_beside_zeroes": 3, "shrink_past_table_then_allocate": 3,
          "zero_then_show_backing": 2, "resize_under_snapshot": 2,
          # (and two whose power-cut windows catch crash-order bugs of growth and of
          # zeroing, which grew rarer as the aimed rules above joined the draw)
          "shrink_mid_cluster_then_zero_grow": 2, "rewrite_cleared": 2}

#: Any byte but zero.
_NONZERO = re.compile(rb"[^\x00]")

#: The label of the empty span that closes a chain's branch (any constant will do).
_CHAIN_BRANCH_LABEL = 0x50_79_69_6D_61_67_6F


def _is_final() -> bool:
    try:
        return current_build_context().is_final
    except InvalidArgument:
        return False


def _close_chain_branch() -> None:
    """End the example's chain draw with an empty discarded span.

    Hypothesis mutates about one example in two by copying spans of its later steps, and
    new examples may start with a prefix already run: both keep the chain, and a ``ci`` run
    built well under half as many chains as it ran examples.  A discard kills the branch of
    Hypothesis's choice tree at that point: novel examples avoid the prefix (another chain
    is drawn) and mutations that keep it are given up before they run.  Nothing else
    changes: the span holds no choices (the shrinker has nothing to delete), and the same
    choices always build the same chain, so failures shrink and replay as before.
    """
    try:
        data = current_build_context().data
    except InvalidArgument:
        return
    data.start_span(_CHAIN_BRANCH_LABEL)
    data.stop_span(discard=True)


def _aimed(ready: Callable[[Any], bool]) -> Callable[[Any], Any]:
    """Mark a method as an aimed rule (see ``_AIMED``), ``ready`` its precondition: it
    becomes rules once the machine class is made (:func:`_add_aimed_rule`)."""

    def mark(body: Any) -> Any:
        body.aimed_ready = ready
        return body

    return mark


def _add_aimed_rule(machine: type[Any], name: str, body: Any) -> None:
    """One copy of an aimed rule on the machine class, as ``name``.  Each copy is a rule of
    its own name: Hypothesis draws each as often as any rule, and turns each on or off for
    an example by its own feature flag (copies under one name would share one)."""

    def run(self: Any, data: st.DataObject) -> None:
        body(self, data)

    run.__name__ = run.__qualname__ = name
    setattr(machine, name, precondition(body.aimed_ready)(rule(data=st.data())(run)))


def _add_burst_rule(machine: type[Any], name: str, kinds: tuple[OpKind, ...],
                    near: bool) -> None:
    """One burst rule (see ``_burst.BURST_MIXES``) on the machine class, as ``name``."""

    def run(self: Any, data: st.DataObject) -> None:
        self._burst(data, kinds, near)

    run.__name__ = run.__qualname__ = name
    has_disk = precondition(lambda self: self.session is not None
                            and self.session.model.size > 0)
    setattr(machine, name, has_disk(rule(data=st.data())(run)))


def make_machine(
    target: ImplementationTarget,
    *,
    chains: st.SearchStrategy[ChainSpec] | None = None,
    failures_dir: str | None = DEFAULT_FAILURES_DIR,
    stats: RunStats | None = None,
    qemu_img: str | None = "auto",
    echo_failures: bool = False,
    capabilities: Any = None,
    locality: bool = False,
    features: FeatureSupport | None = None,
    bursts: bool = False,
) -> type[RuleBasedStateMachine]:
    """A state machine class that checks ``target`` against the model.

    ``chains``: the strategy for the chain built in ``@initialize`` (default
    :func:`chain_specs`).  ``failures_dir``: where the final failing run writes its replay file
    (None: nowhere).  ``stats``: counters to accumulate into (for progress displays).
    ``qemu_img``: as for :class:`Session`.  ``echo_failures``: also print the log of the final
    failing run to stderr (Hypothesis's report has it as a note either way).
    ``capabilities``: a ``DriverCapabilities`` (default: the target's own, if it has one);
    rules for what it does not claim are left out, and one rule instead checks that such
    requests raise ``UnsupportedError``.  ``locality``: the distribution for third-party
    drivers: ranges are drawn around what recent operations touched as often as anywhere
    else, so that operations meet on the same clusters more often than chance has them do on
    a disk of hundreds, and ranges end at boundaries (and one byte off them) as often as they
    start there (see ``Geometry.hot`` and ``Geometry.sharp``).
    ``features``: what the target supports of issue 13 (default: probed, see
    :func:`~pyimago.oracle.features.probe_features`); the default chains use its layer
    options, and its operations get rules (compressed writes, snapshot operations).
    ``bursts``: add the burst rules (see ``_burst``): steps of about 25 basic operations
    each, drawn cheaply, for campaigns (``pyimago run``) where checked operations per
    second count; off, the machine and its derandomised ``ci`` stream are as they were.
    """
    # The derandomised stream must not depend on what the process imported before.
    pin_local_constants()
    if features is None:
        features = probe_features(target, qemu=qemu_img is not None)
        if getattr(target, "differential", False) and target.module != "pyimago.reference":
            # The reference shadows every step: only what both support.
            from .targets import reference_target

            ref = probe_features(reference_target(), qemu=qemu_img is not None)
            features = FeatureSupport(features.writable & ref.writable,
                                      features.readable & ref.readable, features.reasons,
                                      features.broken)
    support = features
    chain_strategy = chains if chains is not None else chain_specs(
        features=support, qemu_layers=qemu_img is not None)
    snapshot_names = ("a", "b", "c", "1", "2")
    run_stats = stats if stats is not None else RunStats()
    run_stats.features_expected |= set(support.writable)
    if chains is None and qemu_img is not None:
        run_stats.features_expected |= set(support.readable)
    caps = capabilities if capabilities is not None else getattr(target, "capabilities", None)
    grow_modes = tuple(PreallocateMode)
    past_end_names: tuple[str, ...] = PAST_END_NAMES
    unclaimed: list[tuple[str, str]] = []
    clear_kinds = [OpKind.WRITE_ZEROES, OpKind.DISCARD_TO_ZERO, OpKind.DISCARD_TO_ANY,
                   OpKind.DISCARD_TO_BACKING]
    if caps is not None:
        grow_modes = tuple(m for m in PreallocateMode if caps.supports_grow(m))
        past_end_names = tuple(
            n for n in PAST_END_NAMES if not n.startswith("discard") or caps.supports_discard(n)
        )
        unclaimed += [("discard", n) for n in PAST_END_NAMES
                      if n.startswith("discard") and not caps.supports_discard(n)]
        unclaimed += [("grow", m.value) for m in PreallocateMode if m not in grow_modes]
        if not caps.resize_shrink:
            unclaimed.append(("shrink", ""))
        clear_kinds = [k for k in clear_kinds
                       if k is OpKind.WRITE_ZEROES or caps.supports_discard(k.value)]
    if locality:
        # A write running past the end is the request whose partial application shows.
        past_end_names = ("write", *past_end_names)

    class OracleMachine(RuleBasedStateMachine):
        """Operations on a backing chain, checked against the flat model after each one."""

        def __init__(self) -> None:
            super().__init__()
            self.session: Session | None = None
            self.failed = False
            self.hot: list[int] = []
            self.built: list[int] = []

        # -- plumbing -------------------------------------------------------------------------

        def _report(self, error: BaseException) -> None:
            already, self.failed = self.failed, True
            if already or not _is_final() or self.session is None:
                return
            run_stats.failures += 1
            log = self.session.format_log(failed=error)
            path = None
            if failures_dir is not None:
                path = write_replay(replay_record(self.session, error), failures_dir)
                run_stats.replay_files.append(path)
                log += f"\nreplay file: {path}  (run it again: pyimago replay {path})"
            note(log)
            if echo_failures:
                print(log, file=sys.stderr)

        def _apply(self, op: Op, *, burst: bool = False) -> None:
            assert self.session is not None
            if locality and op.kind in _HOT_KINDS:
                # Its first and last byte: the next range may start or end there.
                self.hot = [*self.hot[-6:], op.offset, op.offset + max(op.length - 1, 0)]
            try:
                self.session.apply(op, burst=burst)
            except Exception as exc:
                self._report(exc)
                raise

        def _geometry(self) -> Geometry:
            assert self.session is not None
            model = self.session.model
            limit = max(
                max_disk_size(model.granularity),
                *(layer.size for layer in self.session.chain.layers),
            )
            hot = tuple(self.built + self.hot)
            top = self.session.chain.top
            span = top.l2_span if top.extended_l2 else 0
            return Geometry(model.size, model.granularity, limit, hot, locality, span)

        def _qcow2_top(self) -> bool:
            session = self.session
            return session is not None and session.chain.top.format == "qcow2" \
                and session.model.size > 0

        def _free_clusters(self, end: int | None = None) -> list[int]:
            """The top's clusters wholly before ``end`` (default: the disk end, a partial
            last cluster included) that it does not hold, as the model knows: writing one
            allocates a host cluster, and compressed data may go there."""
            assert self.session is not None
            cluster = self.session.chain.top.cluster_size
            model = self.session.model
            per = cluster // model.granularity
            stop = -(-model.size // cluster) if end is None else end // cluster
            return [c for c in range(stop)
                    if all(model.allowed(u) == {Alloc.BACKING}
                           for u in range(c * per, min((c + 1) * per, len(model.alloc))))]

        # -- initialisation and teardown ------------------------------------------------------

        @initialize(chain=chain_strategy)
        def build_chain(self, chain: ChainSpec) -> None:
            _close_chain_branch()
            if support.broken:
                # The target has the feature, and its probe (one plain use of it) broke:
                # a bug to report, not a feature to leave out of the run.
                raise OracleFailure("; ".join(
                    f"the {name} probe failed ({support.reasons.get(name, 'read back wrong')})"
                    for name in sorted(support.broken)))
            self.session = Session(
                target, chain, stats=run_stats, qemu_img=qemu_img, build=False
            )
            try:
                self.session.build()
            except Exception as exc:
                self._report(exc)
                raise
            if outgrows_refcount_table(chain.top) and len(chain.layers) == 1:
                # The large chains exist to move the refcount table (issue 9: every width
                # and refcount-table growth in the budget): their first step fills the disk,
                # so that every one of them does, while the power cuts are recorded, rather
                # than the few that happen to draw fill_disk.
                self._apply(Op(OpKind.WRITE, 0, chain.top.size))
            if locality:
                # What the lower layers hold (data, zeroes, compressed clusters) is worth
                # reading, writing over and discarding around for the whole example.
                self.built = [
                    end
                    for layer in chain.layers
                    for op in layer.build[-3:]
                    for end in (op.offset, op.offset + max(op.length - 1, 0))
                ]

        def teardown(self) -> None:
            session = self.session
            if session is None:
                return
            try:
                session.close(verify=not self.failed)
            except Exception as exc:
                self._report(exc)
                raise
            finally:
                run_stats.example_done()

        # -- rules ----------------------------------------------------------------------------

        def _burst(self, data: st.DataObject, kinds: tuple[OpKind, ...], near: bool) -> None:
            # Dozens of basic operations for one step's cost (see _burst): most of a run's
            # checked operations come from the burst rules (added below the class).
            geo = self._geometry()
            raw = data.draw(burst_choices(len(kinds)), label="burst")
            for op in decode_burst(raw, geo, kinds, near=near):
                self._apply(op, burst=True)

        @rule(data=st.data())
        def read(self, data: st.DataObject) -> None:
            offset, length = data.draw(read_ranges(self._geometry()), label="read range")
            self._apply(Op(OpKind.READ, offset, length))

        @rule(data=st.data())
        def write(self, data: st.DataObject) -> None:
            offset, length = data.draw(modify_ranges(self._geometry()), label="write range")
            self._apply(Op(OpKind.WRITE, offset, length))

        @rule(data=st.data())
        def write_clusters(self, data: st.DataObject) -> None:
            geo = self._geometry()
            g = geo.granularity
            first = data.draw(st.integers(0, (geo.size - 1) // g), label="first cluster")
            count = data.draw(st.integers(1, 3), label="clusters")
            offset = first * g
            self._apply(Op(OpKind.WRITE, offset, min(count * g, geo.size - offset)))

        @rule(data=st.data())
        def readinto(self, data: st.DataObject) -> None:
            offset, length = data.draw(read_ranges(self._geometry()), label="range")
            self._apply(Op(OpKind.READINTO, offset, length))

        @rule(data=st.data())
        def readv(self, data: st.DataObject) -> None:
            offset, length = data.draw(read_ranges(self._geometry()), label="range")
            sizes = data.draw(split_buffers(length), label="buffers")
            self._apply(Op(OpKind.READV, offset, length, mode=sizes))

        @rule(data=st.data())
        def writev(self, data: st.DataObject) -> None:
            offset, length = data.draw(modify_ranges(self._geometry()), label="range")
            sizes = data.draw(split_buffers(length), label="buffers")
            self._apply(Op(OpKind.WRITEV, offset, length, mode=sizes))

        @rule(data=st.data())
        def ensure_data_mapping(self, data: st.DataObject) -> None:
            offset, length = data.draw(modify_ranges(self._geometry()), label="range")
            how = data.draw(st.sampled_from(("overwrite", "keep")), label="overwrite")
            self._apply(Op(OpKind.ENSURE_DATA_MAPPING, offset, length, mode=how))

        @rule(data=st.data())
        def get_mapping(self, data: st.DataObject) -> None:
            geo = self._geometry()
            offset, _ = data.draw(read_ranges(geo), label="offset")
            max_length = data.draw(mapping_lengths(geo), label="max_length")
            self._apply(Op(OpKind.GET_MAPPING, offset, max_length))

        @rule(data=st.data())
        def modify_across_boundary(self, data: st.DataObject) -> None:
            # Across an L2-table boundary or up to the disk end, drawn on purpose, not by luck.
            offset, length = data.draw(straddle_ranges(self._geometry()), label="range")
            kind = data.draw(st.sampled_from([OpKind.WRITE, OpKind.WRITEV, *clear_kinds]),
                             label="operation")
            self._apply(Op(kind, offset, length))

        if PreallocateMode.ZERO in grow_modes and (caps is None or caps.resize_shrink):

            @_aimed(lambda self: self.session is not None
                    and self.session.model.size > 2 * self.session.model.granularity)
            def shrink_mid_cluster_then_zero_grow(self, data: st.DataObject) -> None:
                # Data in the last clusters, a shrink that cuts one of them mid-way, a ZERO
                # grow back over them: the old tail must read as zeroes, even from a cache.
                # Now and then the grow goes past what the L1 table reaches (a new L1 table,
                # then the header switched to it).  The power-cut states are checked around
                # these alone: a grow that writes its new size or its new L1 table's
                # address before what they stand for breaks only in a state or two.
                assert self.session is not None
                geo = self._geometry()
                g, size = geo.granularity, geo.size
                top = self.session.chain.top
                power = self.session.power is not None
                if power:
                    self._apply(Op(OpKind.POWER_CUT))
                self._apply(Op(OpKind.WRITE, size - 2 * g, 2 * g))
                sectors = max(g // 512, 1)
                cut = data.draw(st.integers(1, max(2 * sectors - 1, 1)),
                                label="sectors kept") * 512
                new = max(size - 2 * g + cut, 512)
                new -= new % 512
                self._apply(Op(OpKind.RESIZE, value=new, mode=PreallocateMode.NONE.value))
                regrow = size
                if top.format == "qcow2" and data.draw(st.booleans(), label="past the L1"):
                    span = top.l2_span
                    # Past the disk's usual limit where tables map little (the grow must
                    # reach a new L1 entry to grow the L1 table: a disk near its limit is
                    # in its last table's reach already).
                    limit = size + span if span <= _SMALL_SPAN else geo.max_size
                    regrow = min(-(-size // span) * span + span // 2, max(limit, size))
                    regrow = max(regrow - regrow % 512, size)
                self._apply(Op(OpKind.RESIZE, value=regrow, mode=PreallocateMode.ZERO.value))
                if power:
                    self._apply(Op(OpKind.POWER_CUT))

        if PreallocateMode.NONE in grow_modes and (caps is None or caps.resize_shrink):

            @_aimed(lambda self: self._qcow2_top()
                    and self.session.chain.top.l2_span <= _SMALL_SPAN)
            def shrink_past_table_then_allocate(self, data: st.DataObject) -> None:
                # Data in the last L2 table's reach (a disk within one table's reach grows
                # into a second first), a shrink that frees that table, then clusters
                # allocated (the freed table's among them) and flushed: a table freed by the
                # shrink must not be written back over what reuses its cluster.  The writes
                # stay in one table's reach, so that a small cache keeps the freed table (had
                # it stayed cached) until the flush.  Then the old size.
                assert self.session is not None
                top, model = self.session.chain.top, self.session.model
                span, cluster = top.l2_span, top.cluster_size
                size = grown = model.size
                if size <= span:
                    grown = span + cluster
                    self._apply(Op(OpKind.RESIZE, value=grown, mode=PreallocateMode.NONE.value))
                    if model.size != grown:
                        return  # refused (a v2 image with snapshots)
                last = (grown - 1) // span
                at = last * span + data.draw(
                    st.integers(0, (grown - last * span - 1) // cluster), label="cluster") * cluster
                self._apply(Op(OpKind.WRITE, at, min(cluster, grown - at)))
                if data.draw(st.booleans(), label="flushed"):
                    self._apply(Op(OpKind.FLUSH))
                new = last * span - data.draw(st.sampled_from((0, 0, 512, cluster)), label="less")
                self._apply(Op(OpKind.RESIZE, value=max(new, 512),
                               mode=PreallocateMode.NONE.value))
                free = self._free_clusters(max(new, 512))
                if free:
                    # Several, one by one: the lowest free clusters go first, and holes left
                    # by earlier discards may come before the freed table's.
                    table = data.draw(st.sampled_from(free), label="near") * cluster // span
                    for c in [c for c in free if c * cluster // span == table][:8]:
                        self._apply(Op(OpKind.WRITE, c * cluster, cluster))
                    self._apply(Op(OpKind.FLUSH))
                    self._apply(Op(OpKind.READ, table * span, span))
                self._apply(Op(OpKind.RESIZE, value=size, mode=PreallocateMode.NONE.value))

        @precondition(lambda self: self.session is not None
                      and self.session.chain.top.format == "qcow2"
                      and 0 < self.session.model.size <= 3 << 20)
        @rule()
        def fill_disk(self) -> None:
            # Every cluster at once: refcount blocks fill up and are added (narrow clusters,
            # wide refcounts), and on the large chains the refcount table has to grow.
            assert self.session is not None
            self._apply(Op(OpKind.WRITE, 0, self.session.model.size))

        @_aimed(lambda self: self.session is not None)
        def rewrite_cleared(self, data: st.DataObject) -> None:
            # Data, whole clusters zeroed (or discarded) over it, then a small write inside
            # them that need not start or end on a sector: a zero cluster that kept its host
            # cluster is reused by the write, the rest of it zeroed first.  The power-cut
            # states are checked around these three alone, so that every cut between their
            # few storage writes is judged (a sample of a longer stretch would miss the one
            # that splits a sector between the zeroing and the data).
            assert self.session is not None
            geo = self._geometry()
            g = geo.granularity
            first = data.draw(st.integers(0, (geo.size - 1) // g), label="first cluster")
            offset = first * g
            length = min(data.draw(st.integers(1, 2), label="clusters") * g, geo.size - offset)
            cut = self.session.power is not None
            if cut:
                self._apply(Op(OpKind.POWER_CUT))
            self._apply(Op(OpKind.WRITE, offset, length))
            kind = data.draw(st.sampled_from((OpKind.WRITE_ZEROES, *clear_kinds)),
                             label="cleared by")
            self._apply(Op(kind, offset, length))
            at = offset + data.draw(st.integers(0, length - 1), label="at")
            more = data.draw(st.integers(1, min(offset + length - at, 3 * 512)), label="bytes")
            self._apply(Op(OpKind.WRITE, at, more))
            if cut:
                self._apply(Op(OpKind.POWER_CUT))

        if OpKind.DISCARD_TO_BACKING in clear_kinds:

            @_aimed(lambda self: self.session is not None
                    and len(self.session.chain.layers) > 1
                    and self.session.model.size > 0)
            def zero_then_show_backing(self, data: st.DataObject) -> None:
                # Units of one cluster zeroed (zero flags, or zero bits of subclusters), then
                # discarded to the backing, the same units or one more either side, part of
                # the cluster or all of it: the backing must show there again, whatever
                # zero marks the units had.  Then the cluster read back.
                assert self.session is not None
                geo = self._geometry()
                g, size = geo.granularity, geo.size
                cluster = self.session.chain.top.cluster_size
                per = max(cluster // g, 1)
                model = self.session.model
                # Mostly units the backing shows data in (zeroes there hide nothing).
                shown = [u for u in range(len(model.alloc))
                         if model.allowed(u) == {Alloc.BACKING}
                         and _NONZERO.search(model.data, u * g, min((u + 1) * g, size))] \
                    if data.draw(st.integers(0, 3), label="aim") else []
                if shown:
                    unit = data.draw(st.sampled_from(shown), label="unit") * g
                    first = unit // cluster
                else:
                    first = data.draw(st.integers(0, (size - 1) // cluster), label="cluster")
                base = first * cluster
                units = -(-(min(base + cluster, size) - base) // g)
                a = (unit - base) // g if shown else \
                    data.draw(st.integers(0, units - 1), label="first unit")
                b = data.draw(st.integers(a + 1, min(units, a + max(per // 4, 1))),
                              label="end unit")
                zero = data.draw(st.sampled_from((OpKind.WRITE_ZEROES, *clear_kinds)),
                                 label="zeroed by")
                self._apply(Op(zero, base + a * g, min((b - a) * g, size - base - a * g)))
                a = max(a - data.draw(st.integers(0, 1), label="wider head"), 0)
                b = min(b + data.draw(st.integers(0, 1), label="wider tail"), units)
                self._apply(Op(OpKind.DISCARD_TO_BACKING, base + a * g,
                               min((b - a) * g, size - base - a * g)))
                self._apply(Op(OpKind.READ, base, min(cluster, size - base)))

        @precondition(lambda self: self.session is not None
                      and self.session.model.size >= _LARGE_READ)
        @rule(data=st.data())
        def parallel_large_read(self, data: st.DataObject) -> None:
            # Several threads over a read large enough to be split: an implementation may
            # split only large requests into parallel jobs (pyimago.fast from 128 KiB),
            # which the other rules' ranges seldom reach.
            assert self.session is not None
            size = self.session.model.size
            self._apply(Op(OpKind.READ_PARALLEL,
                           value=data.draw(st.integers(2, 4), label="threads")))
            offset = data.draw(st.integers(0, size - _LARGE_READ), label="offset")
            length = data.draw(st.integers(_LARGE_READ, size - offset), label="length")
            kind = data.draw(st.sampled_from((OpKind.READ, OpKind.READINTO, OpKind.READV)),
                             label="call")
            sizes = data.draw(split_buffers(length), label="buffers") \
                if kind is OpKind.READV else ""
            self._apply(Op(kind, offset, length, mode=sizes))

        @rule()
        def sync(self) -> None:
            self._apply(Op(OpKind.SYNC))

        @precondition(lambda self: self.session is not None and self.session.power is not None)
        @rule()
        def power_cut(self) -> None:
            self._apply(Op(OpKind.POWER_CUT))

        @rule(data=st.data())
        def write_zeroes(self, data: st.DataObject) -> None:
            offset, length = data.draw(modify_ranges(self._geometry()), label="range")
            self._apply(Op(OpKind.WRITE_ZEROES, offset, length))

        @rule(data=st.data())
        def discard_to_zero(self, data: st.DataObject) -> None:
            offset, length = data.draw(modify_ranges(self._geometry()), label="range")
            self._apply(Op(OpKind.DISCARD_TO_ZERO, offset, length))

        @rule(data=st.data())
        def discard_to_any(self, data: st.DataObject) -> None:
            offset, length = data.draw(modify_ranges(self._geometry()), label="range")
            self._apply(Op(OpKind.DISCARD_TO_ANY, offset, length))

        @rule(data=st.data())
        def discard_to_backing(self, data: st.DataObject) -> None:
            offset, length = data.draw(modify_ranges(self._geometry()), label="range")
            self._apply(Op(OpKind.DISCARD_TO_BACKING, offset, length))

        @rule(data=st.data())
        def request_past_end(self, data: st.DataObject) -> None:
            self._apply(
                data.draw(past_end_ops(self._geometry(), past_end_names), label="request")
            )

        @rule(data=st.data())
        def grow(self, data: st.DataObject) -> None:
            self._apply(data.draw(grow_ops(self._geometry(), grow_modes), label="grow"))

        @rule(data=st.data())
        def shrink(self, data: st.DataObject) -> None:
            self._apply(data.draw(shrink_ops(self._geometry()), label="shrink"))

        @rule(data=st.data())
        def shrink_and_regrow(self, data: st.DataObject) -> None:
            # The old tail must not come back: the classic resize bug, worth a rule of its own.
            self._apply(data.draw(shrink_ops(self._geometry()), label="shrink"))
            self._apply(data.draw(grow_ops(self._geometry(), grow_modes), label="grow"))

        @rule()
        def flush(self) -> None:
            self._apply(Op(OpKind.FLUSH))

        @rule()
        def flush_and_invalidate_cache(self) -> None:
            self._apply(Op(OpKind.INVALIDATE))

        @rule()
        def reopen(self) -> None:
            self._apply(Op(OpKind.REOPEN))

        @precondition(lambda self: self.session is not None and self.session.model.size > 0)
        @rule(data=st.data())
        def sweep_l2_tables(self, data: st.DataObject) -> None:
            self._apply(data.draw(sweep_ops(self._geometry()), label="sweep"))

        @rule(n=st.integers(1, 4))
        def set_read_parallelization(self, n: int) -> None:
            self._apply(Op(OpKind.READ_PARALLEL, value=n))

        @rule(n=st.integers(1, 4))
        def set_write_parallelization(self, n: int) -> None:
            self._apply(Op(OpKind.WRITE_PARALLEL, value=n))

        if "write_compressed" in support.writable:

            @precondition(lambda self: self._qcow2_top())
            @rule(data=st.data())
            def write_compressed(self, data: st.DataObject) -> None:
                # One whole cluster (or the disk's partial tail), compressible or not.
                assert self.session is not None
                cluster = self.session.chain.top.cluster_size
                size = self.session.model.size
                # Mostly clusters the model knows to be unallocated: those take compressed
                # data (an allocated one refuses it, which the other draws check).
                free = self._free_clusters()
                if free and data.draw(st.integers(0, 2), label="aim") > 0:
                    first = data.draw(st.sampled_from(free), label="free cluster")
                else:
                    first = data.draw(st.integers(0, (size - 1) // cluster), label="cluster")
                how = data.draw(st.sampled_from((None, None, "noise")), label="data")
                offset = first * cluster
                length = min(cluster, size - offset)
                if data.draw(st.integers(0, 7), label="misaligned") == 0:
                    # Not one whole cluster: refused before anything is written.
                    offset, length = (offset + 512, length) if length > 512 and \
                        data.draw(st.booleans(), label="where") else (offset, length - 1 or 2)
                    length = min(length, size - offset)
                self._apply(Op(OpKind.WRITE_COMPRESSED, offset, length, mode=how))

            @precondition(lambda self: self._qcow2_top())
            @rule(data=st.data())
            def compressed_churn(self, data: st.DataObject) -> None:
                # A compressed cluster, then rewritten or discarded (the host cluster it was
                # packed into may be freed), a plain write elsewhere (which may be handed
                # that host cluster), then another compressed cluster (which must not be
                # packed after the first any more): where packing state goes stale.
                assert self.session is not None
                cluster = self.session.chain.top.cluster_size
                free = self._free_clusters(self.session.model.size)
                if len(free) < 3:
                    return
                a, b, c = (data.draw(st.sampled_from(free), label=what) * cluster
                           for what in ("compressed", "plain", "compressed again"))
                self._apply(Op(OpKind.WRITE_COMPRESSED, a, cluster))
                kind = data.draw(st.sampled_from((OpKind.WRITE, *clear_kinds)), label="then")
                self._apply(Op(kind, a, cluster))
                self._apply(Op(OpKind.WRITE, b, cluster))
                if c not in (a, b):
                    self._apply(Op(OpKind.WRITE_COMPRESSED, c, cluster))

            @_aimed(lambda self: self._qcow2_top()
                    and self.session.chain.top.cluster_size <= _SMALL_CLUSTER
                    and self.session.model.size >= 2 * self.session.chain.top.cluster_size)
            def compressed_beside_zeroes(self, data: st.DataObject) -> None:
                # Zero clusters each right before a compressed one, the compressed data packed
                # one after another, each an odd number of bytes long (so every other
                # descriptor holds an odd byte offset: a zero run must stop at a compressed
                # cluster whatever its bits), read in one piece; then the mapping
                # of one compressed cluster from inside it, whose special read is also made
                # into several buffers (each must start where the one before it ended).
                assert self.session is not None
                cluster = self.session.chain.top.cluster_size
                whole = self.session.model.size // cluster
                pairs = min(data.draw(st.integers(2, 4), label="pairs"), whole // 2)
                start = data.draw(st.integers(0, whole - 2 * pairs), label="first cluster")
                squeezed = range(start + 1, start + 2 * pairs, 2)
                free = set(self._free_clusters(self.session.model.size))
                for c in squeezed:
                    if c not in free and OpKind.DISCARD_TO_BACKING in clear_kinds:
                        # Unallocated first: compressed data goes into free clusters only.
                        self._apply(Op(OpKind.DISCARD_TO_BACKING, c * cluster, cluster))
                    self._apply(Op(OpKind.WRITE_COMPRESSED, c * cluster, cluster,
                                   mode=ODD_COMPRESSED))
                for c in squeezed:
                    self._apply(Op(OpKind.WRITE_ZEROES, (c - 1) * cluster, cluster))
                self._apply(Op(OpKind.READ, start * cluster, 2 * pairs * cluster))
                at = data.draw(st.sampled_from(squeezed), label="mapped") * cluster
                at += data.draw(st.integers(0, cluster - 2), label="inside")
                longest = start * cluster + 2 * pairs * cluster - at
                self._apply(Op(OpKind.GET_MAPPING, at,
                               data.draw(st.integers(2, longest), label="max_length")))

        if "snapshots" in support.writable:

            def _snapshot_key(self, data: st.DataObject) -> str:
                # Existing IDs and names mostly, now and then one that does not exist.
                assert self.session is not None
                snaps = self.session.model.snapshots
                taken = [key for snap in snaps for key in (snap.id, snap.name)]
                # A name that is another snapshot's ID: where looking up by ID first shows.
                ids = {snap.id for snap in snaps}
                clash = [s.name for s in snaps if s.name in ids and s.name != s.id]
                return data.draw(st.sampled_from((*taken, *taken, *clash * 4, "9", "zz")),
                                 label="snapshot")

            @precondition(lambda self: self._qcow2_top())
            @rule(data=st.data())
            def create_snapshot(self, data: st.DataObject) -> None:
                # Now and then an existing snapshot's ID as the name (names and IDs are
                # separate: QEMU looks IDs up first).
                assert self.session is not None
                ids = tuple(s.id for s in self.session.model.snapshots)
                name = data.draw(st.sampled_from((*snapshot_names, *ids, *ids)), label="name")
                self._apply(Op(OpKind.CREATE_SNAPSHOT, mode=name))

            @precondition(lambda self: self._qcow2_top())
            @rule(data=st.data())
            def snapshot_named_like_an_id(self, data: st.DataObject) -> None:
                # A snapshot, then one named with its ID, a write, then that key applied or
                # deleted: QEMU looks the ID up first (the other snapshot is not touched).
                assert self.session is not None
                model = self.session.model
                self._apply(Op(OpKind.CREATE_SNAPSHOT, mode="x"))
                key = model.snapshots[-1].id if model.snapshots else "1"
                self._apply(Op(OpKind.CREATE_SNAPSHOT, mode=key))
                self._apply(Op(OpKind.WRITE, 0, min(model.size, 512)))
                kind = data.draw(st.sampled_from((OpKind.APPLY_SNAPSHOT, OpKind.DELETE_SNAPSHOT)),
                                 label="then")
                self._apply(Op(kind, mode=key))

            @precondition(lambda self: self._qcow2_top())
            @rule(data=st.data())
            def modify_under_snapshot(self, data: st.DataObject) -> None:
                # Data, a snapshot sharing it, then the shared clusters zeroed, discarded or
                # partly rewritten, and written again: every change must leave the shared
                # host clusters alone (COPIED clear, copy on write), as reading the snapshot
                # back shows.
                assert self.session is not None
                geo = self._geometry()
                g = geo.granularity
                first = data.draw(st.integers(0, (geo.size - 1) // g), label="first cluster")
                offset = first * g
                length = min(data.draw(st.integers(1, 2), label="clusters") * g,
                             geo.size - offset)
                self._apply(Op(OpKind.WRITE, offset, length))
                self._apply(Op(OpKind.CREATE_SNAPSHOT, mode="s"))
                kind = data.draw(st.sampled_from((OpKind.WRITE_ZEROES, OpKind.WRITE,
                                                  *clear_kinds)), label="then")
                self._apply(Op(kind, offset, length))
                at = offset + data.draw(st.integers(0, length - 1), label="at")
                self._apply(Op(OpKind.WRITE, at, offset + length - at))
                snaps = self.session.model.snapshots
                if snaps and "snapshot_open" in support.writable:
                    self._apply(Op(OpKind.READ_SNAPSHOT, mode=snaps[-1].id))

            @_aimed(lambda self: self._qcow2_top()
                    and self.session.chain.top.compat != "0.10")
            def resize_under_snapshot(self, data: st.DataObject) -> None:
                # A snapshot, the disk resized (grown or shrunk) and written, then the
                # snapshot applied: the disk takes the snapshot's size back, at once, in the
                # open image as in its header.
                assert self.session is not None
                model = self.session.model
                before = len(model.snapshots)
                self._apply(Op(OpKind.CREATE_SNAPSHOT, mode="r"))
                if len(model.snapshots) == before:
                    return  # refused (refcounts too narrow to share the clusters once more)
                key = model.snapshots[-1].id
                geo = self._geometry()
                resize = shrink_ops(geo) if data.draw(st.booleans(), label="shrink") \
                    else grow_ops(geo, grow_modes)
                self._apply(data.draw(resize, label="resize"))
                offset, length = data.draw(modify_ranges(self._geometry()), label="write")
                self._apply(Op(OpKind.WRITE, offset, length))
                self._apply(Op(OpKind.APPLY_SNAPSHOT, mode=key))

            @precondition(lambda self: self._qcow2_top())
            @rule(data=st.data())
            def apply_snapshot(self, data: st.DataObject) -> None:
                self._apply(Op(OpKind.APPLY_SNAPSHOT, mode=self._snapshot_key(data)))

            @precondition(lambda self: self._qcow2_top())
            @rule(data=st.data())
            def delete_snapshot(self, data: st.DataObject) -> None:
                self._apply(Op(OpKind.DELETE_SNAPSHOT, mode=self._snapshot_key(data)))

            if "snapshot_open" in support.writable:

                @precondition(lambda self: self._qcow2_top())
                @rule(data=st.data())
                def read_snapshot(self, data: st.DataObject) -> None:
                    self._apply(Op(OpKind.READ_SNAPSHOT, mode=self._snapshot_key(data)))

        if locality:

            @rule(data=st.data())
            def write_then_clear(self, data: st.DataObject) -> None:
                # Data, then zeroing or discarding around it: where allocation bugs show.
                geo = self._geometry()
                offset, length = data.draw(modify_ranges(geo), label="write")
                self._apply(Op(OpKind.WRITE, offset, length))
                kind = data.draw(st.sampled_from(clear_kinds), label="then")
                if data.draw(st.booleans(), label="same clusters"):
                    # The clusters just written, give or take a byte at either end.
                    g = geo.granularity
                    start = offset - offset % g + data.draw(st.sampled_from((0, 0, 1, -1)))
                    end = -(-(offset + length) // g) * g + data.draw(
                        st.sampled_from((0, 0, -1, 1))
                    )
                    start, end = min(max(start, 0), geo.size - 1), min(end, geo.size)
                    offset, length = start, max(end - start, 1)
                else:
                    offset, length = data.draw(modify_ranges(self._geometry()), label="range")
                self._apply(Op(kind, offset, length))

            @precondition(lambda self: self.session is not None and bool(self.built + self.hot))
            @rule(data=st.data())
            def read_back(self, data: st.DataObject) -> None:
                # Unaligned reads where something was put: the read path's offset arithmetic
                # (compressed clusters, chunks of a backing) is checked by no aligned read.
                geo = self._geometry()
                hot = data.draw(st.sampled_from(geo.hot), label="near")
                delta = data.draw(st.integers(-geo.granularity, geo.granularity), label="delta")
                length = data.draw(st.integers(1, 2 * geo.granularity), label="length")
                self._apply(Op(OpKind.READ, max(min(hot + delta, geo.size), 0), length))

        if unclaimed:

            @rule(data=st.data())
            def unsupported_request(self, data: st.DataObject) -> None:
                # What the target does not claim must raise UnsupportedError (the session
                # knows from the capabilities) and leave the image as it was.
                geo = self._geometry()
                what, detail = data.draw(st.sampled_from(unclaimed), label="unclaimed")
                if what == "discard":
                    offset, length = data.draw(modify_ranges(geo), label="range")
                    op = Op(OpKind(detail), offset, length)
                elif what == "grow":
                    more = data.draw(st.integers(1, 16), label="sectors") * 512
                    op = Op(OpKind.RESIZE, value=geo.size + more, mode=detail)
                else:
                    new = data.draw(st.integers(1, max(geo.size // 512 - 1, 1)), label="sectors")
                    op = Op(OpKind.RESIZE, value=min(new * 512, geo.size),
                            mode=PreallocateMode.NONE.value)
                self._apply(op)

    for name, (kinds, near) in BURST_MIXES.items() if bursts else ():
        _add_burst_rule(OracleMachine, name, tuple(k for k in kinds if k not in _CLEAR_KINDS
                                                   or k in clear_kinds), near)

    if caps is not None:
        # Rules for what the target does not claim are left out (before Hypothesis collects
        # the rules, which it does on first use).
        dropped = [f"discard_to_{k}" for k in ("zero", "any", "backing")
                   if not caps.supports_discard(f"discard_to_{k}")]
        if not grow_modes:
            dropped += ["grow", "shrink_and_regrow"]
        if not caps.resize_shrink:
            dropped += ["shrink", "shrink_and_regrow"]
        for name in dict.fromkeys(dropped):
            delattr(OracleMachine, name)

    for name, weight in _AIMED.items():
        body = vars(OracleMachine).get(name)
        if body is not None:
            delattr(OracleMachine, name)
            for copy in range(weight):
                _add_aimed_rule(OracleMachine, f"{name}_{copy}" if copy else name, body)

    # Hypothesis derives the derandomised (ci) stream from the class's source and __name__:
    # the same name for every target, so every target meets the same examples.
    OracleMachine.__name__ = "OracleMachine"
    OracleMachine.__qualname__ = f"OracleMachine[{target.name}]"
    return OracleMachine


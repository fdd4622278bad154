"""Counters a campaign accumulates across sessions: the figures of run and fuzz summaries."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RunStats"]

#: What a run must meet for each supported feature (others: a layer with that option).
_FEATURE_HITS = {
    "snapshots": ("create_snapshot", "apply_snapshot", "delete_snapshot"),
    "snapshot_open": ("read_snapshot",),
}
#: Issue 13's operations: warned about by feature, when the target has them.
_FEATURE_OPS = frozenset(
    {"write_compressed", "create_snapshot", "apply_snapshot", "delete_snapshot", "read_snapshot"}
)


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
    reference_checks: int = 0
    """The reference's ``check()`` of memory chains' qcow2 layers at teardown."""
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
    crash_mutations: int = 0
    """Storage mutations the power-cut checks covered (a cut after each was possible)."""
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
        skip = {Kind.WRITE_PAST_END.value, Kind.SWEEP.value, *_FEATURE_OPS}
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

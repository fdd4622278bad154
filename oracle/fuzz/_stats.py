"""What a conformance run exercised, so that a green run can be told from one that tested little."""

from __future__ import annotations

from dataclasses import dataclass

from ..session import RunStats

__all__ = ["ConformanceStats"]


def _kib(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True, slots=True)
class ConformanceStats:
    """The counters of one ``run_driver_conformance`` run.

    ``ops`` counts operations by kind (``"write"``, ``"discard_to_backing"``, ...; requests
    the target does not claim are counted as ``"<kind> (unsupported)"``), most frequent first;
    ``chain_depths`` chains by number of layers; ``storages`` steps by storage kind;
    ``granularities`` chains by the allocation unit of their top layer.
    ``granules_touched`` / ``l2_tables_touched`` add up, over chains, the distinct allocation
    units (and, for qcow2, L2 tables) of the top layer that operations touched.
    """

    target: str
    examples: int
    steps: int
    seconds: float
    ops: tuple[tuple[str, int], ...]
    chain_depths: tuple[tuple[int, int], ...]
    storages: tuple[tuple[str, int], ...]
    granularities: tuple[tuple[int, int], ...]
    granules_touched: int
    l2_tables_touched: int
    bytes_compared: int
    unsupported_checked: int
    compressed_clusters: int
    qemu_checks: int
    reference_reads: int
    differential_steps: int
    preflight_checks: int
    failures: int
    replay_files: tuple[str, ...]
    paths: tuple[tuple[str, str], ...] = ()
    """The paths the run took (crash states, refcount widths, ...: ``RunStats.path_rows``)."""
    warnings: tuple[str, ...] = ()
    """Paths the run never took (``RunStats.coverage_warnings``)."""
    crash_checks: int = 0
    """Times the power-cut states since the previous check were checked (``crash_safe``
    targets)."""
    crash_states: int = 0
    """Cut states rebuilt and held to ``crash.power-cut``."""
    crash_judged: int = 0
    """Of those, the ones ``qemu-img check`` (or the reference's ``check()``) judged."""
    crash_leaks: int = 0
    """Leaked clusters the judge counted in cut states (allowed, counted)."""

    @classmethod
    def from_run(
        cls, target: str, stats: RunStats, seconds: float, *, preflight_checks: int = 0
    ) -> ConformanceStats:
        """Freeze the counters a run accumulated."""
        return cls(
            target=target,
            examples=stats.examples,
            steps=stats.steps,
            seconds=seconds,
            ops=tuple(stats.ops.most_common()),
            chain_depths=tuple(sorted(stats.chain_depths.items())),
            storages=tuple(sorted(stats.storage_steps.items())),
            granularities=tuple(sorted(stats.granularities.items())),
            granules_touched=stats.granules_touched,
            l2_tables_touched=stats.l2_tables_touched,
            bytes_compared=stats.bytes_compared,
            unsupported_checked=stats.unsupported_checked,
            compressed_clusters=stats.compressed_clusters,
            qemu_checks=stats.qemu_checks,
            reference_reads=stats.reference_reads,
            differential_steps=stats.differential_steps,
            preflight_checks=preflight_checks,
            failures=stats.failures,
            replay_files=tuple(stats.replay_files),
            paths=tuple(stats.path_rows()),
            warnings=tuple(stats.coverage_warnings()),
            crash_checks=stats.crash_checks,
            crash_states=stats.crash_states,
            crash_judged=stats.crash_judged,
            crash_leaks=stats.crash_leaks,
        )

    def op_count(self, kind: str) -> int:
        """How many operations of ``kind`` ran (0 if none)."""
        return dict(self.ops).get(kind, 0)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0

    def rows(self) -> list[tuple[str, str]]:
        """``(label, value)`` pairs: what the CLI's table and the pytest summary show."""
        rows = [
            ("examples", f"{self.examples:,}"),
            ("steps", f"{self.steps:,} ({self.steps_per_second:,.0f}/s, {self.seconds:.1f} s)"),
            ("operations", ", ".join(f"{k} {v}" for k, v in self.ops) or "none"),
            ("chain depths", ", ".join(f"{d}: {n}" for d, n in self.chain_depths) or "none"),
            ("steps by storage", ", ".join(f"{s} {n}" for s, n in self.storages) or "none"),
            ("allocation units", ", ".join(f"{g} B: {n}" for g, n in self.granularities)
             or "none"),
            ("granules touched", f"{self.granules_touched:,}"),
            ("L2 tables touched", f"{self.l2_tables_touched:,}"),
            ("bytes compared", f"{self.bytes_compared:,} ({_kib(self.bytes_compared)})"),
            ("unsupported checked", f"{self.unsupported_checked + self.preflight_checks:,}"),
            ("compressed clusters", f"{self.compressed_clusters:,}"),
            ("qemu-img checks", f"{self.qemu_checks:,}"),
            ("differential", f"{self.differential_steps:,} steps on the reference, "
                             f"{self.reference_reads:,} images read back by it"),
            *self.paths,
            ("power cuts", f"{self.crash_states:,} cut states in {self.crash_checks:,} checks, "
                           f"{self.crash_judged:,} judged, {self.crash_leaks:,} leaked clusters"),
            ("failures", f"{self.failures}"),
        ]
        rows += [("warning", what) for what in self.warnings]
        rows += [("replay file", path) for path in self.replay_files]
        return rows

    def summary(self) -> str:
        """A few lines for logs and test output."""
        width = max(len(label) for label, _ in self.rows())
        lines = [f"pyimago conformance of {self.target}:"]
        lines += [f"  {label:<{width}}  {value}" for label, value in self.rows()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

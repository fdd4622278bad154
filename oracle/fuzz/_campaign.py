"""``pyimago fuzz TARGET --workers N``: a campaign of N seeded workers under pytest-xdist.

The campaign is a pytest run (``-n N``) of one test, parametrised once per worker by the
``_campaign_plugin``; each worker runs :func:`run_driver_conformance` with its own seed,
against the shared example database when one is given, and keeps its counters in a JSON file
of the campaign folder.  This process starts pytest, shows the workers' progress from those
files while it runs, and at the end merges every worker's :class:`ConformanceStats` into one
table and one JSON file (``summary.json``).

Seeds: worker ``w`` of ``N``, in its round ``r`` (``--duration`` campaigns run rounds until
the time is up), uses ``seed + w + r * N``: no two workers, nor two rounds, share one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..database import redact
from ..targets import ImplementationTarget, resolve_target
from ._merge import merge_stats, stats_from_json, stats_to_json
from ._stats import ConformanceStats
from ._target import DriverTarget, load_target

__all__ = [
    "SUMMARY_FILE",
    "CampaignResult",
    "CampaignSpec",
    "WorkerReport",
    "empty_stats",
    "load_campaign_target",
    "new_seed",
    "run_campaign",
    "worker_error_text",
    "write_worker_report",
]

_TESTS = Path(__file__).with_name("_campaign_tests.py")
_PLUGIN = "pyimago.oracle.fuzz._campaign_plugin"
SUMMARY_FILE = "summary.json"


def load_campaign_target(spec: str) -> DriverTarget | ImplementationTarget:
    """A campaign's target: ``module:attribute`` (a driver, as ``pyimago fuzz`` takes), or an
    implementation by name (``reference``, ``pyimago.fast``)."""
    if ":" in spec:
        return load_target(spec)
    return resolve_target(spec)


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """What every worker of a campaign runs (handed to pytest as JSON)."""

    target: str
    workers: int
    seed: int
    folder: str
    profile: str | None = None
    examples: int | None = None
    steps: int | None = None
    database: str | None = None
    failures_dir: str | None = None
    qemu: bool = True
    paths: tuple[str, ...] = ()
    duration: float | None = None
    """Seconds: workers run rounds until this much time has passed (None: one round)."""
    tx: tuple[str, ...] = ()
    """pytest-xdist gateway specs (``2*ssh=host//python=...``) instead of ``-n workers``."""

    def seed_of(self, worker: int, round_: int = 0) -> int:
        """The seed of ``worker``'s round ``round_``: never the same for two (worker, round)."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} is not one of {self.workers}")
        return self.seed + worker + round_ * self.workers

    def next_round(self, elapsed: float, examples: int, seconds: float) -> int | None:
        """Examples for a worker's next round, after ``examples`` in ``seconds`` of rounds and
        ``elapsed`` seconds since it started; None when it is done.  A ``--duration``
        campaign sizes its last rounds to what the time left holds at the pace so far, so
        that it ends near its time even when one round of the full size would not fit."""
        if self.duration is None:
            return None
        left = self.duration - elapsed
        size = self.examples or 1
        if left <= 0:
            return None
        if examples == 0 or seconds <= 0:
            return size
        per_example = seconds / examples
        if left < per_example / 2:
            return None
        return max(1, min(size, round(left / per_example)))

    def report_path(self, worker: int, *, final: bool = True) -> Path:
        """Where ``worker``'s report goes: the final one (written by pytest's controlling
        process from the test report, so that it arrives from remote workers too), or the
        one the worker rewrites as it goes (``final=False``: progress on this machine)."""
        name = f"worker-{worker}.json" if final else f"worker-{worker}.progress.json"
        return Path(self.folder) / name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CampaignSpec:
        obj = json.loads(text)
        obj["paths"] = tuple(obj.get("paths", ()))
        obj["tx"] = tuple(obj.get("tx", ()))
        return cls(**obj)


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """One worker's state, as its JSON file has it."""

    worker: int
    seeds: tuple[int, ...]
    state: str
    """``running``, ``passed`` or ``failed``."""
    stats: ConformanceStats
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "seeds": list(self.seeds),
            "state": self.state,
            "stats": stats_to_json(self.stats),
            "error": self.error,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> WorkerReport:
        return cls(int(obj["worker"]), tuple(obj["seeds"]), str(obj["state"]),
                   stats_from_json(obj["stats"]), obj.get("error"))


def write_worker_report(spec: CampaignSpec, report: WorkerReport, *, final: bool) -> None:
    """Write a worker's report atomically (the campaign's process may be reading it)."""
    path = spec.report_path(report.worker, final=final)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report.to_json()))
    os.replace(tmp, path)


def _read_reports(spec: CampaignSpec, *, final: bool) -> list[WorkerReport]:
    reports = []
    for worker in range(spec.workers):
        path = spec.report_path(worker, final=final)
        try:
            reports.append(WorkerReport.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return reports


@dataclass(frozen=True, slots=True)
class CampaignResult:
    """What a campaign did: the merged counters, each worker's report, pytest's status."""

    spec: CampaignSpec
    stats: ConformanceStats
    workers: tuple[WorkerReport, ...]
    wall_seconds: float
    pytest_status: int
    log: str

    @property
    def failed(self) -> bool:
        return any(w.state == "failed" for w in self.workers)

    @property
    def complete(self) -> bool:
        """Every worker reported an end (passed or failed)."""
        return len(self.workers) == self.spec.workers and all(
            w.state in ("passed", "failed") for w in self.workers
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "pyimago-campaign",
            "version": 1,
            "target": self.spec.target,
            "workers": self.spec.workers,
            "seed": self.spec.seed,
            "profile": self.spec.profile,
            "database": None if self.spec.database is None else redact(self.spec.database),
            "duration": self.spec.duration,
            "wall_seconds": self.wall_seconds,
            "failed": self.failed,
            "stats": stats_to_json(self.stats),
            "per_worker": [w.to_json() for w in self.workers],
        }


def _pytest_command(spec: CampaignSpec) -> list[str]:
    # No ini file (the campaign must not pick up the settings of whatever project it runs
    # in), and paths that exist on every host with pyimago installed at the same place.
    nodes = [f"--tx={tx}" for tx in spec.tx] if spec.tx else ["-n", str(spec.workers)]
    return [
        sys.executable, "-m", "pytest", str(_TESTS),
        "-p", _PLUGIN, f"--pyimago-campaign={spec.to_json()}", *nodes,
        "-c", os.devnull, "--rootdir", str(_TESTS.parent),
        "--import-mode=importlib", "-p", "no:cacheprovider",
        "-q", "--no-header", "-o", "console_output_style=classic",
    ]


def empty_stats(spec: CampaignSpec) -> ConformanceStats:
    """The counters of a worker that has not finished an example yet."""
    from ..session import RunStats

    return ConformanceStats.from_run(spec.target, RunStats(), 0.0)


def run_campaign(spec: CampaignSpec, *, progress: bool = True) -> CampaignResult:
    """Run the campaign ``spec`` describes; return the merged result (also written as
    ``summary.json`` into the campaign folder)."""
    folder = Path(spec.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for worker in range(spec.workers):
        for final in (True, False):
            spec.report_path(worker, final=final).unlink(missing_ok=True)
    log_path = folder / "pytest.log"
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(_pytest_command(spec), stdout=log, stderr=subprocess.STDOUT)
        try:
            if progress:
                _show_progress(spec, proc, start)
            status = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    wall = time.monotonic() - start
    reports = tuple(_read_reports(spec, final=True))
    stats = (
        merge_stats([r.stats for r in reports], parallel=True) if reports else empty_stats(spec)
    )
    result = CampaignResult(spec, stats, reports, wall, status, str(log_path))
    (folder / SUMMARY_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return result


def _show_progress(spec: CampaignSpec, proc: subprocess.Popen[bytes], start: float) -> None:
    from .._progress import progress_bar

    budget = spec.examples
    if budget is None:
        from ._run import conformance_settings

        budget = conformance_settings(profile=spec.profile).max_examples
    with progress_bar() as bar:
        unit = "s" if spec.duration else "examples"
        total = int(spec.duration) if spec.duration else budget
        tasks = [
            bar.add_task(f"worker {w} (seed {spec.seed_of(w)})", total=total, detail="starting")
            for w in range(spec.workers)
        ]
        overall = bar.add_task(f"campaign: {spec.target}", total=total * spec.workers,
                               detail="")
        while True:
            running = proc.poll() is None
            elapsed = time.monotonic() - start
            done = 0
            steps = 0
            cuts = 0
            failures = 0
            for report in _read_reports(spec, final=False):
                s = report.stats
                count = min(int(elapsed), total) if spec.duration else s.examples
                if report.state != "running":
                    count = total
                done += count
                steps += s.steps
                cuts += s.crash_states
                failures += s.failures
                bar.update(
                    tasks[report.worker],
                    completed=count,
                    detail=f"{report.state}: {s.examples:,} examples, {s.steps:,} steps "
                           f"({unit} budget {total:,})",
                )
            bar.update(overall, completed=done,
                       detail=f"{steps:,} steps, {steps / max(elapsed, 1e-9):,.0f}/s, "
                              f"{cuts:,} cut states, {failures} failures")
            if not running:
                break
            time.sleep(0.5)


def worker_error_text(error: BaseException) -> str:
    """How a worker's failure is kept in its report: as ``pyimago fuzz`` prints a failure
    (the exception with Hypothesis's shrunk program, the oracle's log, the replay file)."""
    from .._cli_support import format_failure

    return format_failure(error)


def new_seed() -> int:
    """A campaign's base seed when none is given."""
    return random.SystemRandom().randrange(1 << 32)

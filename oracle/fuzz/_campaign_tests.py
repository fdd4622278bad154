"""The one test of a ``pyimago fuzz --workers`` campaign: a worker.

Collected by path by the campaign's pytest run (see ``_campaign``); each item is one worker,
running conformance rounds with its own seeds until its budget is spent or it finds a
failure, and keeping its counters in its report file as it goes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import pytest
from pyimago.oracle.fuzz import ConformanceStats, run_driver_conformance
from pyimago.oracle.fuzz._campaign import (
    CampaignSpec,
    WorkerReport,
    empty_stats,
    load_campaign_target,
    worker_error_text,
    write_worker_report,
)
from pyimago.oracle.fuzz._campaign_plugin import OPTION, REPORT_PROPERTY
from pyimago.oracle.fuzz._merge import merge_stats

# Reports are rewritten at most this often while a round runs (and always at its end).
_REPORT_EVERY = 0.5


def test_campaign_worker(pyimago_campaign_worker: int, request: pytest.FixtureRequest) -> None:
    spec = CampaignSpec.from_json(request.config.getoption(OPTION))
    worker = pyimago_campaign_worker
    for folder in [*reversed(spec.paths), os.getcwd()]:
        if folder not in sys.path:
            sys.path.insert(0, folder)
    target = load_campaign_target(spec.target)
    try:
        os.makedirs(spec.folder, exist_ok=True)
        progress_files = True
    except OSError:
        # A remote worker without the campaign's folder: its final report still arrives.
        progress_files = False
    done: list[ConformanceStats] = []
    seeds: list[int] = []
    start = time.monotonic()
    last_write = 0.0

    def report(state: str, current: ConformanceStats | None, error: str | None = None) -> None:
        runs = [*done, *([current] if current is not None else [])]
        stats = merge_stats(runs, parallel=False) if runs else empty_stats(spec)
        entry = WorkerReport(worker, tuple(seeds), state, stats, error)
        if state != "running":
            request.node.user_properties.append((REPORT_PROPERTY, entry.to_json()))
        if progress_files:
            write_worker_report(spec, entry, final=False)

    def tick(stats: ConformanceStats) -> None:
        nonlocal last_write
        now = time.monotonic()
        if now - last_write >= _REPORT_EVERY:
            last_write = now
            # Called inside the Hypothesis run, where an error would be taken for the
            # target's failure: progress is best effort (the final report is written outside).
            with contextlib.suppress(Exception):
                report("running", stats)

    round_ = 0
    examples = spec.examples
    while True:
        seed = spec.seed_of(worker, round_)
        seeds.append(seed)
        final: list[ConformanceStats] = []

        def keep(stats: ConformanceStats, final: list[ConformanceStats] = final) -> None:
            final[:] = [stats]
            tick(stats)

        try:
            run_driver_conformance(
                target,
                profile=spec.profile,
                max_examples=examples,
                steps=spec.steps,
                seed=seed,
                failures_dir=spec.failures_dir,
                qemu_img="auto" if spec.qemu else None,
                progress=keep,
                database=spec.database,
                worker=f"worker {worker}, seed {seed}",
            )
        except Exception as exc:
            report("failed", final[0] if final else None, worker_error_text(exc))
            raise
        done.extend(final)
        round_ += 1
        so_far = merge_stats(done, parallel=False) if done else empty_stats(spec)
        examples = spec.next_round(time.monotonic() - start, so_far.examples, so_far.seconds)
        if examples is None:
            break
    report("passed", None)

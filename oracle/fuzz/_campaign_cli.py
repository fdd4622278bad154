"""The campaign options of ``pyimago fuzz`` (``--database``, ``--workers`` and friends) and
the command-line side of a campaign: checks up front, progress, the merged summary."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from pyimago._args import fail, output_dir, output_file, positive_float, positive_int

from .._cli_support import add_import_paths, target_error
from ..database import redact
from ._campaign import SUMMARY_FILE, CampaignResult, CampaignSpec, new_seed, run_campaign

__all__ = ["add_campaign_options", "campaign_main", "check_database"]

_PROG = "pyimago fuzz"

#: Examples per round of a ``--duration`` campaign when ``--examples`` is not given: a round
#: ends every few minutes even with the ``deep`` profile's long programs, so the campaign
#: ends close to its time.
DURATION_ROUND = 25


def add_campaign_options(parser: argparse.ArgumentParser) -> None:
    """``--database``, ``--workers``, ``--duration``, ``--campaign-dir``, ``--json``."""
    group = parser.add_argument_group("campaigns")
    group.add_argument("--database", metavar="URL", default=None,
                       help="example database shared by every run: a directory or "
                            "redis://host:port/N (the 'campaign' extra); its failures are "
                            "replayed first, new ones saved there")
    group.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="run a campaign of N seeded workers through pytest-xdist")
    group.add_argument("--duration", type=positive_float, default=None, metavar="MINUTES",
                       help="with --workers: each worker runs rounds of --examples "
                            f"(default {DURATION_ROUND}) until this much time has passed")
    group.add_argument("--campaign-dir", type=output_dir, default=None, metavar="DIR",
                       help="with --workers: where workers' reports, pytest's log and "
                            "summary.json go (default .pyimago-campaign/TIMESTAMP)")
    group.add_argument("--tx", action="append", default=[], metavar="SPEC",
                       help="with --workers: run the workers on pytest-xdist gateways "
                            "(e.g. 2*ssh=host//python=/opt/pyimago/bin/python; repeatable) "
                            "instead of N local processes")
    group.add_argument("--json", type=output_file, default=None, metavar="FILE",
                       help="with --workers: also write the merged summary to FILE")


def check_database(url: str | None) -> None:
    """Exit with a one-line error (status 2) unless ``url`` (if any) opens."""
    if url is None:
        return
    from ..database import DatabaseError, open_database

    try:
        open_database(url)
    except DatabaseError as exc:
        fail(_PROG, str(exc))


def campaign_main(args: argparse.Namespace) -> int:
    """``pyimago fuzz TARGET --workers N ...``; returns the exit status."""
    if args.junit:
        fail(_PROG, "--junit is for single runs; a campaign writes --json")
    if args.seed is not None and args.seed < 0:
        fail(_PROG, f"--seed {args.seed}: must not be negative")
    missing = [name for name in ("pytest", "xdist") if importlib.util.find_spec(name) is None]
    if missing:
        fail(_PROG, f"--workers needs {' and '.join(missing)}; install the 'campaign' extra: "
                    "pip install 'pyimago[campaign]'")
    check_database(args.database)
    paths = add_import_paths(args.path)
    from ._campaign import load_campaign_target

    try:
        target = load_campaign_target(args.target)
    except Exception as exc:
        fail(_PROG, f"cannot load {args.target}: {target_error(exc)}")
    folder = args.campaign_dir or os.path.join(
        ".pyimago-campaign", time.strftime("%Y%m%d-%H%M%S")
    )
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(_PROG, f"--campaign-dir {folder}: {exc.strerror or exc}")
    database = args.database
    if database is not None and "://" not in database:
        database = os.path.abspath(database)
    spec = CampaignSpec(
        target=args.target,
        workers=args.workers,
        seed=args.seed if args.seed is not None else new_seed(),
        folder=os.path.abspath(folder),
        profile=args.profile,
        examples=args.examples if args.examples or not args.duration else DURATION_ROUND,
        steps=args.steps,
        database=database,
        failures_dir=os.path.abspath(args.failures_dir) if args.failures_dir else None,
        qemu=not args.no_qemu,
        paths=tuple(paths),
        duration=None if args.duration is None else args.duration * 60.0,
        tx=tuple(args.tx),
    )
    result = run_campaign(spec, progress=not args.no_progress)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    _report(result, target.name)
    if result.failed:
        return 1
    if result.pytest_status != 0 or not result.complete:
        print(f"{_PROG}: the campaign's workers did not all finish (pytest exit "
              f"{result.pytest_status}); see {result.log}", file=sys.stderr)
        return 2
    return 0


def _report(result: CampaignResult, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    for worker in result.workers:
        if worker.error:
            print(worker.error, file=sys.stderr)
            print(f"{_PROG}: {name} FAILED in worker {worker.worker} "
                  f"(seeds {', '.join(map(str, worker.seeds))})", file=sys.stderr)
    for path in result.stats.replay_files:
        print(f"replay file: {path}  (run it again: pyimago replay {path})", file=sys.stderr)
    spec = result.spec
    table = Table(title=f"pyimago fuzz campaign: {name}, {spec.workers} workers",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("wall time", f"{result.wall_seconds:.1f} s")
    table.add_row("database", "none" if spec.database is None else redact(spec.database))
    for label, value in result.stats.rows():
        if label == "failures":
            value = f"[red]{value}[/red]" if result.failed else "[green]none[/green]"
        if label != "replay file":
            table.add_row(label, value)
    for worker in result.workers:
        s = worker.stats
        table.add_row(
            f"worker {worker.worker}",
            f"{worker.state}: seeds {', '.join(map(str, worker.seeds))}; {s.examples:,} "
            f"examples, {s.steps:,} steps, {s.failures} failures",
        )
    table.add_row("summary", os.path.join(spec.folder, SUMMARY_FILE))
    Console().print(table)
    if not result.failed and result.complete:
        print(f"{_PROG}: {name} conforms ({result.stats.examples} examples, "
              f"{result.stats.steps} steps, {spec.workers} workers)")

"""``pyimago run`` and ``pyimago replay``: the oracle's machines, and recorded failures.

The ``pyimago`` command itself is :mod:`pyimago.cli` (a table of subcommands); these are two
of its rows.  Arguments are checked before any work starts (one-line errors, exit 2).

``pyimago run``
    Runs the state machines against an implementation (the reference by default) for a
    budget of examples, with a progress display, and prints a summary: examples, steps,
    operations per second (on in-memory chains, where the implementation's speed is all that
    is measured), bytes compared, failures.  Exit status 1 when a failure was found; its
    shrunk operation log is printed and its replay file written.
``pyimago replay FILE``
    Runs a replay file's sequence again (against the target it names, or ``--target``),
    prints the operation log and exits 1 if it still fails.  ``pyimago replay --database
    URL`` lists the failures saved in a campaign's example database and reruns them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from hypothesis import seed as hypothesis_seed
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test
from pyimago._args import CliParser, existing_dir, existing_file, fail, output_dir, positive_int

from ._cli_support import add_import_paths, budget_note, format_failure, target_error
from .features import probe_features
from .machines import make_machine
from .profiles import PROFILES, load_profile_from_env, oracle_settings, register_profiles
from .replay import DEFAULT_FAILURES_DIR, ReplayFileError, load_replay, run_replay
from .session import RunStats
from .strategies import chain_specs
from .targets import ImplementationTarget, resolve_target

__all__ = ["main", "replay_main", "run_main"]

_STORAGES = {"memory": ("memory",), "file": ("file",), "mixed": ("memory", "memory", "file")}


def _target(prog: str, option: str, spec: str) -> ImplementationTarget:
    """The target ``spec`` names, or a one-line usage error naming it."""
    try:
        return resolve_target(spec)
    except Exception as exc:
        fail(prog, f"{option} {spec}: {target_error(exc)}")


def _run_parser() -> CliParser:
    run = CliParser(
        prog="pyimago run",
        description="Run the oracle's state machines against an implementation for a budget "
                    "of examples and print a summary (operations per second, bytes "
                    "compared).  Exit status 1 when a failure was found: its shrunk "
                    "operation log is printed and its replay file written.",
    )
    run.add_argument("--target", default="reference",
                     help="implementation: 'reference', a module, or module:attribute")
    run.add_argument("--profile", choices=PROFILES, default=None,
                     help="Hypothesis profile (default: $HYPOTHESIS_PROFILE, ci on CI, else dev)")
    run.add_argument("--examples", type=positive_int, default=None, help="examples to run")
    run.add_argument("--steps", type=positive_int, default=None,
                     help="operations per example (at most)")
    run.add_argument("--seed", type=int, default=None, help="random seed (reproducible runs)")
    run.add_argument("--storage", choices=sorted(_STORAGES), default="mixed",
                     help="where chains live (default: mostly memory, some files)")
    run.add_argument("--failures-dir", type=output_dir, default=DEFAULT_FAILURES_DIR,
                     help=f"where replay files go (default {DEFAULT_FAILURES_DIR})")
    run.add_argument("--path", action="append", default=[], metavar="DIR", type=existing_dir,
                     help="also import the target from DIR (the current folder always is)")
    run.add_argument("--no-qemu", action="store_true", help="skip the qemu-img teardown checks")
    run.add_argument("--no-progress", action="store_true", help="no progress display")
    run.add_argument("--no-bursts", action="store_true",
                     help="only single-operation steps (no burst rules: the machine as the "
                          "test suite runs it)")
    run.add_argument("--database", metavar="URL", default=None,
                     help="example database shared by every run: a directory or "
                          "redis://host:port/N; its failures are replayed first")
    return run


def _replay_parser() -> CliParser:
    replay = CliParser(
        prog="pyimago replay",
        description="Run a replay file's sequence again (against the target it names, or "
                    "--target), print the operation log; exit status 1 if it still fails.",
    )
    replay.add_argument("file", nargs="?", default=None, type=existing_file,
                        help="a replay file written by a failing run")
    replay.add_argument("--database", metavar="URL", default=None,
                        help="instead of a file: list and rerun the failures saved in this "
                             "example database (a directory or redis://host:port/N)")
    replay.add_argument("--list", action="store_true",
                        help="with --database: only list the saved failures")
    replay.add_argument("--target", default=None,
                        help="implementation to run it against (default: the file's)")
    replay.add_argument("--path", action="append", default=[], metavar="DIR", type=existing_dir,
                        help="also import the target from DIR (the current folder always is)")
    replay.add_argument("--no-qemu", action="store_true", help="skip the qemu-img checks")
    replay.add_argument("--quiet", action="store_true", help="print only the verdict")
    return replay


def _rate(steps: int, seconds: float) -> str:
    return f"{steps / seconds:,.0f} ops/s" if seconds > 0 else "n/a"


def _summary(
    stats: RunStats, target: str, profile: str, wall: float, failed: bool, budget: int
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"pyimago oracle: {target}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("profile", profile)
    table.add_row("examples", budget_note(stats.examples, budget, failed=failed))
    table.add_row("steps", f"{stats.steps:,}")
    table.add_row("wall time", f"{wall:.1f} s")
    table.add_row("throughput (all)", _rate(stats.steps, wall))
    seconds = sum(stats.storage_seconds.values())
    table.add_row("checked ops/s", _rate(stats.steps, seconds) + "  (in sessions)")
    for storage in sorted(stats.storage_steps):
        table.add_row(
            f"throughput ({storage})",
            f"{_rate(stats.storage_steps[storage], stats.storage_seconds[storage])}"
            f"  ({stats.storage_steps[storage]:,} steps in "
            f"{stats.storage_seconds[storage]:.1f} s)",
        )
    table.add_row("bytes compared", f"{stats.bytes_compared:,}")
    depths = ", ".join(f"{d}: {n}" for d, n in sorted(stats.chain_depths.items()))
    table.add_row("chain depths", depths)
    table.add_row("crash states checked",
                  f"{stats.crash_states:,} in {stats.crash_checks:,} checks "
                  f"of {stats.crash_mutations:,} mutations "
                  f"({stats.crash_judged:,} judged, {stats.crash_leaks:,} leaked clusters)")
    for label, value in stats.path_rows():
        table.add_row(label, value)
    for what in stats.coverage_warnings():
        table.add_row("[yellow]warning[/yellow]", f"zero hits: {what}")
    table.add_row("failures", "[red]yes[/red]" if failed else "[green]none[/green]")
    for path in stats.replay_files:
        table.add_row("replay file", path)
    console.print(table)


def run_main(argv: Sequence[str]) -> int:
    """``pyimago run``; returns the exit status."""
    args = _run_parser().parse_args(list(argv))
    add_import_paths(args.path)
    target = _target("pyimago run", "--target", args.target)
    register_profiles()
    profile = args.profile or load_profile_from_env()
    base = settings.get_profile(profile)
    overrides: dict[str, object] = {}
    if args.examples is not None:
        overrides["max_examples"] = args.examples
    if args.steps is not None:
        overrides["stateful_step_count"] = args.steps
    database = None
    if args.database is not None:
        from .database import DatabaseError, open_database

        try:
            overrides["database"] = database = open_database(args.database)
        except DatabaseError as exc:
            fail("pyimago run", str(exc))
    run_settings = oracle_settings(base, **overrides)
    stats = RunStats()
    # Issue 13's features the target supports: layer options and their operations; QEMU
    # makes lower layers with the options it only reads (file chains, qemu-img around).
    storages = _STORAGES[args.storage]
    qemu_layers = not args.no_qemu and "file" in storages
    support = probe_features(target, qemu=qemu_layers)
    if qemu_layers:
        stats.features_expected |= support.readable
    machine = make_machine(
        target,
        features=support,
        chains=chain_specs(storages=storages, features=support, qemu_layers=qemu_layers),
        failures_dir=args.failures_dir,
        stats=stats,
        qemu_img=None if args.no_qemu else "auto",
        bursts=not args.no_bursts,
    )
    if args.seed is not None:
        machine = hypothesis_seed(args.seed)(machine)

    error: BaseException | None = None
    start = time.monotonic()
    if args.no_progress:
        try:
            run_state_machine_as_test(machine, settings=run_settings)
        except Exception as exc:
            error = exc
    else:
        from ._progress import progress_bar

        with progress_bar() as progress:
            task = progress.add_task(
                f"oracle vs {target.name}", total=run_settings.max_examples, detail=""
            )

            def tick(s: RunStats) -> None:
                elapsed = time.monotonic() - start
                # Hypothesis may run a few examples beyond the budget (and many more while
                # shrinking a failure): the bar then just keeps up with the count.
                progress.update(
                    task,
                    completed=s.examples,
                    total=max(s.examples, run_settings.max_examples),
                    detail=f"{s.steps:,} steps, {_rate(s.steps, elapsed)}",
                )

            stats.on_example = tick
            try:
                run_state_machine_as_test(machine, settings=run_settings)
            except Exception as exc:
                error = exc
    wall = time.monotonic() - start
    if error is not None and database is not None:
        from .database import save_replay_files

        save_replay_files(database, stats.replay_files)
    if error is not None:
        print(format_failure(error), file=sys.stderr)
    _summary(stats, target.name, profile, wall, error is not None, run_settings.max_examples)
    return 1 if error is not None else 0


def replay_main(argv: Sequence[str]) -> int:
    """``pyimago replay``; returns the exit status."""
    prog = "pyimago replay"
    args = _replay_parser().parse_args(list(argv))
    if (args.file is None) == (args.database is None):
        fail(prog, "name a replay file or --database URL (one of them)")
    if args.database is not None:
        from .replay_db import replay_database

        add_import_paths(args.path)
        return replay_database(args.database, target=args.target, list_only=args.list,
                               qemu_img=None if args.no_qemu else "auto", quiet=args.quiet)
    try:
        replay = load_replay(args.file)
    except ReplayFileError as exc:
        fail(prog, str(exc))
    add_import_paths(args.path)
    spec = args.target or replay.target or "reference"
    target = _target(prog, "--target" if args.target else f"{args.file}: target", spec)
    result = run_replay(replay, target, qemu_img=None if args.no_qemu else "auto")
    if not args.quiet:
        print(result.log)
    if result.failed:
        print(f"replay FAILED against {target.name}: {result.error}", file=sys.stderr)
        return 1
    print(f"replay passed against {target.name} ({len(replay.ops)} operations)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``pyimago`` command (:func:`pyimago.cli.main`), for ``python -m pyimago.oracle``."""
    from pyimago.cli import main as dispatch

    return dispatch(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

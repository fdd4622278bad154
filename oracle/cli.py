"""``pyimago``: run the oracle's machines, and replay recorded failures.

``pyimago run``
    Runs the state machines against an implementation (the reference by default) for a
    budget of examples, with a progress display, and prints a summary: examples, steps,
    operations per second (on in-memory chains, where the implementation's speed is all that
    is measured), bytes compared, failures.  Exit status 1 when a failure was found; its
    shrunk operation log is printed and its replay file written.
``pyimago replay FILE``
    Runs a replay file's sequence again (against the target it names, or ``--target``),
    prints the operation log and exits 1 if it still fails.
``pyimago fuzz module:target``
    Fuzzes a third party's format driver (a ``DriverTarget``) against the oracle; see
    :mod:`pyimago.oracle.fuzz`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence

from hypothesis import seed as hypothesis_seed
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from .machines import make_machine
from .profiles import PROFILES, load_profile_from_env, oracle_settings, register_profiles
from .replay import DEFAULT_FAILURES_DIR, load_replay, run_replay
from .session import RunStats
from .strategies import chain_specs
from .targets import resolve_target

__all__ = ["main"]

_STORAGES = {"memory": ("memory",), "file": ("file",), "mixed": ("memory", "memory", "file")}


_DELEGATED_HELP = {
    "conformance": "per-clause conformance report of an implementation "
                   "(see 'pyimago conformance --help')",
    "fuzz": "fuzz a format driver (module:target) against the oracle "
            "(see 'pyimago fuzz --help')",
}


def _delegated(name: str, rest: list[str]) -> int:
    if name == "conformance":
        from .report import conformance_main

        return conformance_main(rest)
    if name == "fuzz":
        from .fuzz._cli import fuzz_main

        return fuzz_main(rest)
    raise AssertionError(name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyimago",
        description="pyimago's test oracle: model-checked state machines over disk images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the state machines for a budget of examples")
    run.add_argument("--target", default="reference",
                     help="implementation: 'reference', a module, or module:attribute")
    run.add_argument("--profile", choices=PROFILES, default=None,
                     help="Hypothesis profile (default: $HYPOTHESIS_PROFILE, ci on CI, else dev)")
    run.add_argument("--examples", type=int, default=None, help="examples to run")
    run.add_argument("--steps", type=int, default=None, help="operations per example (at most)")
    run.add_argument("--seed", type=int, default=None, help="random seed (reproducible runs)")
    run.add_argument("--storage", choices=sorted(_STORAGES), default="mixed",
                     help="where chains live (default: mostly memory, some files)")
    run.add_argument("--failures-dir", default=DEFAULT_FAILURES_DIR,
                     help=f"where replay files go (default {DEFAULT_FAILURES_DIR})")
    run.add_argument("--no-qemu", action="store_true", help="skip the qemu-img teardown checks")
    run.add_argument("--no-progress", action="store_true", help="no progress display")

    # Subcommands with their own argument parsers; main() hands them the rest of argv.
    for name, help_text in _DELEGATED_HELP.items():
        sub.add_parser(name, help=help_text, add_help=False)

    replay = sub.add_parser("replay", help="re-run a replay file")
    replay.add_argument("file", help="a replay file written by a failing run")
    replay.add_argument("--target", default=None,
                        help="implementation to run it against (default: the file's)")
    replay.add_argument("--no-qemu", action="store_true", help="skip the qemu-img checks")
    replay.add_argument("--quiet", action="store_true", help="print only the verdict")
    return parser


def _rate(steps: int, seconds: float) -> str:
    return f"{steps / seconds:,.0f} ops/s" if seconds > 0 else "n/a"


def _summary(stats: RunStats, target: str, profile: str, wall: float, failed: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"pyimago oracle: {target}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("profile", profile)
    table.add_row("examples", f"{stats.examples:,}")
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
    for label, value in stats.path_rows():
        table.add_row(label, value)
    for what in stats.coverage_warnings():
        table.add_row("[yellow]warning[/yellow]", f"zero hits: {what}")
    table.add_row("failures", "[red]yes[/red]" if failed else "[green]none[/green]")
    for path in stats.replay_files:
        table.add_row("replay file", path)
    console.print(table)


def _run(args: argparse.Namespace) -> int:
    register_profiles()
    profile = args.profile or load_profile_from_env()
    base = settings.get_profile(profile)
    overrides: dict[str, object] = {}
    if args.examples is not None:
        overrides["max_examples"] = args.examples
    if args.steps is not None:
        overrides["stateful_step_count"] = args.steps
    run_settings = oracle_settings(base, **overrides)
    target = resolve_target(args.target)
    stats = RunStats()
    machine = make_machine(
        target,
        chains=chain_specs(storages=_STORAGES[args.storage]),
        failures_dir=args.failures_dir,
        stats=stats,
        qemu_img=None if args.no_qemu else "auto",
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
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
        ) as progress:
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
    if error is not None:
        print("".join(traceback.format_exception(error)), file=sys.stderr)
    _summary(stats, target.name, profile, wall, error is not None)
    return 1 if error is not None else 0


def _replay(args: argparse.Namespace) -> int:
    replay = load_replay(args.file)
    if os.getcwd() not in sys.path:
        # A target named module:attribute (a driver under test) may live in the current folder.
        sys.path.insert(0, os.getcwd())
    target = resolve_target(args.target or replay.target or "reference")
    result = run_replay(replay, target, qemu_img=None if args.no_qemu else "auto")
    if not args.quiet:
        print(result.log)
    if result.failed:
        print(f"replay FAILED against {target.name}: {result.error}", file=sys.stderr)
        return 1
    print(f"replay passed against {target.name} ({len(replay.ops)} operations)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyimago`` command."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in _DELEGATED_HELP:
        return _delegated(words[0], words[1:])
    args = _parser().parse_args(words)
    if args.command == "run":
        return _run(args)
    return _replay(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

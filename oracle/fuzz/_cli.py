"""``pyimago fuzz module:target``: a conformance campaign against a driver, for people and CI.

Runs :func:`~pyimago.oracle.fuzz.run_driver_conformance` with a progress bar, stops at the
first failure, prints Hypothesis's shrunk program and the oracle's operation log, writes the
replay file (``pyimago replay FILE`` runs it again), prints what the run exercised, and
exits 0 (conforms) or 1 (a failure); 2 when the target cannot be loaded.  ``--junit FILE``
writes the verdict as JUnit XML for CI.
"""

from __future__ import annotations

import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence

from pyimago._args import CliParser, existing_dir, fail, output_dir, output_file, positive_int

from .._cli_support import add_import_paths, budget_note, format_failure, target_error
from ..profiles import PROFILES
from ..replay import DEFAULT_FAILURES_DIR
from ..session import RunStats
from ._campaign_cli import add_campaign_options, campaign_main, check_database
from ._run import conformance_settings, run_driver_conformance
from ._stats import ConformanceStats
from ._target import load_target

__all__ = ["fuzz_main", "write_junit"]


def _parser() -> CliParser:
    parser = CliParser(
        prog="pyimago fuzz",
        description="Fuzz a format driver against pyimago's oracle (stops at the first failure).",
    )
    parser.add_argument("target", help="module:attribute naming a DriverTarget (or a function "
                                       "returning one), e.g. chunkmap:target")
    parser.add_argument("--examples", type=positive_int, default=None,
                        help="examples (chains) to run (default: the profile's)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="operations per example, at most (default: the profile's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed: a random run that can be repeated")
    parser.add_argument("--profile", choices=PROFILES, default=None,
                        help="Hypothesis profile (default: $HYPOTHESIS_PROFILE, ci on CI, "
                             "else dev); deep is for long campaigns")
    parser.add_argument("--junit", metavar="FILE", default=None, type=output_file,
                        help="write the verdict as JUnit XML to FILE")
    parser.add_argument("--failures-dir", default=DEFAULT_FAILURES_DIR, type=output_dir,
                        help=f"where the replay file goes (default {DEFAULT_FAILURES_DIR})")
    parser.add_argument("--path", action="append", default=[], metavar="DIR", type=existing_dir,
                        help="also import from DIR (the current folder always is)")
    parser.add_argument("--no-qemu", action="store_true",
                        help="skip the qemu-img checks at teardown of file chains")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_campaign_options(parser)
    return parser


def write_junit(
    path: str, stats: ConformanceStats, error: BaseException | None, *, suite: str = "pyimago.fuzz"
) -> None:
    """The verdict of one campaign as a JUnit XML file (one test case: the target)."""
    failed = error is not None
    root = ET.Element("testsuites")
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests="1",
        failures="1" if failed else "0",
        errors="0",
        skipped="0",
        time=f"{stats.seconds:.3f}",
    )
    case = ET.SubElement(ts, "testcase", classname=suite, name=stats.target,
                         time=f"{stats.seconds:.3f}")
    props = ET.SubElement(case, "properties")
    for label, value in stats.rows():
        ET.SubElement(props, "property", name=label, value=value)
    if error is not None:
        failure = ET.SubElement(
            case, "failure", message=str(error).splitlines()[0] if str(error) else "",
            type=type(error).__name__,
        )
        failure.text = "".join(traceback.format_exception(error))
    ET.SubElement(case, "system-out").text = stats.summary()
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _print_stats(stats: ConformanceStats, failed: bool, budget: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pyimago fuzz: {stats.target}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in stats.rows():
        if label == "failures":
            value = "[red]yes[/red]" if failed else "[green]none[/green]"
        elif label == "examples":
            value = budget_note(stats.examples, budget, failed=failed)
        table.add_row(label, value)
    Console().print(table)


def fuzz_main(argv: Sequence[str]) -> int:
    """``pyimago fuzz``; returns the exit status."""
    args = _parser().parse_args(list(argv))
    if args.workers is not None:
        return campaign_main(args)
    if args.tx or args.duration is not None or args.campaign_dir or args.json:
        fail("pyimago fuzz", "--tx, --duration, --campaign-dir and --json need --workers N")
    check_database(args.database)
    add_import_paths(args.path)
    try:
        target = load_target(args.target)
    except Exception as exc:
        fail("pyimago fuzz", f"cannot load {args.target}: {target_error(exc)}")
    settings = conformance_settings(profile=args.profile, max_examples=args.examples,
                                    steps=args.steps, seed=args.seed)
    name = target.name
    last: list[ConformanceStats] = []
    error: BaseException | None = None
    start = time.monotonic()

    def run(progress: Callable[[ConformanceStats], None] | None = None) -> None:
        def tick(stats: ConformanceStats) -> None:
            last[:] = [stats]
            if progress is not None:
                progress(stats)

        run_driver_conformance(
            target,
            settings=settings,
            seed=args.seed,
            failures_dir=args.failures_dir,
            qemu_img=None if args.no_qemu else "auto",
            progress=tick,
            database=args.database,
        )

    try:
        if args.no_progress:
            run()
        else:
            from .._progress import progress_bar

            with progress_bar() as bar:
                task = bar.add_task(f"fuzzing {name}", total=settings.max_examples, detail="")

                def show(stats: ConformanceStats) -> None:
                    # Shrinking a failure runs examples past the budget: keep up with them.
                    bar.update(
                        task,
                        completed=stats.examples,
                        total=max(stats.examples, settings.max_examples),
                        detail=f"{stats.steps:,} steps, {stats.steps_per_second:,.0f}/s",
                    )

                run(show)
    except Exception as exc:
        error = exc
    stats = last[0] if last else ConformanceStats.from_run(
        name, RunStats(), time.monotonic() - start
    )
    if error is not None:
        # Hypothesis's shrunk program, the oracle's log and the replay file are its notes.
        print(format_failure(error), file=sys.stderr)
        print(f"pyimago fuzz: {name} FAILED", file=sys.stderr)
    _print_stats(stats, error is not None, settings.max_examples)
    if args.junit:
        write_junit(args.junit, stats, error)
    if error is None:
        runs = budget_note(stats.examples, settings.max_examples, failed=False)
        print(f"pyimago fuzz: {name} conforms (examples: {runs}; {stats.steps:,} steps)")
    return 1 if error is not None else 0


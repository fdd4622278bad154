"""``pyimago conformance``: run the conformance suite and the machines, write the report."""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Final

from pyimago._args import (
    CliParser,
    existing_dir,
    fail,
    output_dir,
    output_file,
    positive_float,
    positive_int,
)
from pyimago.oracle._cli_support import add_import_paths
from pyimago.oracle.conformance import IMPL_ENV, ImplError, load_impl
from pyimago.oracle.conformance._crosshair_run import CROSSHAIR_MISSING
from pyimago.specs import ClauseRegistryError, load_areas, load_clauses

from ._build import build_report
from ._html import render_html
from ._machines import run_machines
from ._model import MachineRun, Report
from ._render import render_json, render_junit, render_markdown
from ._suite import run_suite

__all__ = ["FORMATS", "RENDERERS", "conformance_main", "environment", "run_conformance"]

RENDERERS: Final[dict[str, Callable[[Report], str]]] = {
    "md": render_markdown,
    "html": render_html,
    "json": render_json,
    "junit": render_junit,
}
FORMATS: Final = tuple(RENDERERS)

#: Where an HTML report goes without -o (HTML on a terminal helps nobody).
DEFAULT_HTML: Final = "pyimago-conformance.html"

_SUFFIX_FORMAT: Final = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
                         ".json": "json", ".xml": "junit"}

_EPILOG: Final = f"""\
output:
  md, json and junit go to standard output unless -o FILE is given; html goes to
  -o FILE, or to ./{DEFAULT_HTML} without -o.  Without --format the format follows the
  suffix of -o (.md, .html, .json, .xml for junit), else md.  Progress goes to stderr.

implementations (--impl, also ${IMPL_ENV} of the suite):
  reference             pyimago.reference (the default)
  fast                  pyimago.fast
  some.module           a module exposing open_image and create_image
  some.module:attr      a module-like object (an oracle ImplementationTarget, say) or a
                        callable returning one

exit status:
  0  no `must` clause failed (should/may failures and skips do not count)
  1  a `must` clause failed, or the run itself broke (listed under Errors)
  2  bad arguments, or the implementation cannot be loaded
"""


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """What the run depended on: Python, pyimago, Hypothesis, pytest, qemu-img, the OS."""
    qemu = "not installed"
    exe = shutil.which("qemu-img")
    if exe:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
            match = re.search(r"version ([\w.]+)", out)
            qemu = match.group(1) if match else out.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            qemu = "unusable"
    return {
        "python": platform.python_version(),
        "pyimago": _version("pyimago"),
        "pytest": _version("pytest"),
        "hypothesis": _version("hypothesis"),
        "qemu-img": qemu,
        "platform": platform.platform(terse=True),
    }


def run_conformance(
    impl: str = "reference",
    *,
    machines: bool = True,
    profile: str = "ci",
    examples: int | None = None,
    failures_dir: str = ".pyimago-failures",
    suite_timeout: float | None = None,
    progress: Callable[[str], None] | None = None,
    import_paths: tuple[str, ...] = (),
) -> Report:
    """Run the suite (and, with ``machines``, the oracle's machines) against ``impl``."""
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    generated = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    loaded = load_impl(impl)
    errors: list[str] = []
    try:
        areas, clauses = load_areas(), load_clauses()
    except ClauseRegistryError as exc:
        areas, clauses = {}, {}
        errors.append(f"spec clause registry: {exc}")
    say(f"conformance suite: running against {loaded.name} ...")
    with tempfile.TemporaryDirectory(prefix="pyimago-conformance-") as tmp:
        suite = run_suite(impl, Path(tmp), timeout=suite_timeout, import_paths=import_paths,
                          progress=progress)
    if suite.load_error is not None:
        machines = False  # nothing to check them against: the report says why, once
    else:
        counts: dict[str, int] = {}
        for record in suite.tests.values():
            counts[record.outcome] = counts.get(record.outcome, 0) + 1
        shown = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        say(f"conformance suite: {len(suite.tests)} tests in {suite.duration:.1f} s ({shown})")
    env = environment()
    not_run = sum(1 for r in suite.tests.values() if CROSSHAIR_MISSING in r.message)
    if not_run:
        env["crosshair"] = f"not installed: {not_run} check{_s(not_run)} not run"
    machine_run: MachineRun | None = None
    if machines:
        say(f"machines: profile {profile}, running ...")
        machine_run = run_machines(impl, profile=profile, examples=examples,
                                   failures_dir=failures_dir, progress=progress)
        say(f"machines: {machine_run.outcome} ({machine_run.runs} runs, "
            f"{machine_run.steps} steps, {machine_run.duration:.1f} s)")
    return build_report(
        impl=impl,
        impl_name=loaded.name,
        areas=areas,
        clauses=clauses,
        suite=suite,
        machines=machine_run,
        generated=generated,
        duration=time.monotonic() - started,
        environment=env,
        errors=tuple(errors),
    )


def _also_file(text: str) -> str:
    if Path(text).suffix.lower() not in _SUFFIX_FORMAT:
        raise argparse.ArgumentTypeError(
            f"{text}: suffix must be one of {', '.join(sorted(_SUFFIX_FORMAT))}")
    return output_file(text)


def _parser() -> CliParser:
    parser = CliParser(
        prog="pyimago conformance",
        description=(
            "Check which clauses of pyimago's contract (specs/) an implementation meets: run "
            "the clause-tagged conformance suite and the oracle's state machines against it "
            "and report pass / fail / skip / not-applicable / untested per clause."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--impl", default="reference", metavar="IMPL",
                        help="the implementation to check (default: reference; see below)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="report format (default: from -o's suffix, else md)")
    parser.add_argument("-o", "--output", metavar="FILE", default=None, type=output_file,
                        help="write the report to FILE ('-' for standard output)")
    parser.add_argument("--also", action="append", default=[], metavar="FILE", type=_also_file,
                        help="also write the same report to FILE, in the format its suffix "
                             "names (.md, .html, .json, .xml); repeatable")
    parser.add_argument("--examples", type=positive_int, default=None, metavar="N",
                        help="examples the machines run (default: the profile's)")
    parser.add_argument("--profile", choices=("ci", "dev", "deep"), default="ci",
                        help="Hypothesis profile of the machines (default: ci)")
    parser.add_argument("--no-machines", action="store_true",
                        help="run only the conformance suite, not the oracle's machines")
    parser.add_argument("--failures-dir", default=".pyimago-failures", metavar="DIR",
                        type=output_dir,
                        help="where failing machine runs write replay files")
    parser.add_argument("--path", action="append", default=[], metavar="DIR", type=existing_dir,
                        help="also import the implementation from DIR (the current folder "
                             "always is); the suite's subprocess gets the same folders")
    parser.add_argument("--suite-timeout", type=positive_float, default=None, metavar="SECONDS",
                        help="stop the conformance suite after this long (default: no limit)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return parser


def conformance_main(argv: list[str] | None = None) -> int:
    """The ``pyimago conformance`` command; returns the exit status."""
    prog = "pyimago conformance"
    args = _parser().parse_args(argv)
    fmt: str = args.format or _SUFFIX_FORMAT.get(Path(args.output or "").suffix.lower(), "md")
    output: str | None = args.output
    if output is None and fmt == "html":
        output = DEFAULT_HTML
    if output is not None and output != "-":
        try:
            output = output_file(output)  # the HTML default: checked like -o
        except argparse.ArgumentTypeError as exc:
            fail(prog, str(exc))
    import_paths = add_import_paths(args.path)
    try:
        load_impl(args.impl)
    except ImplError as exc:
        fail(prog, f"--impl {exc}")

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    report = run_conformance(
        args.impl,
        machines=not args.no_machines,
        profile=args.profile,
        examples=args.examples,
        failures_dir=args.failures_dir,
        suite_timeout=args.suite_timeout,
        progress=progress,
        import_paths=tuple(import_paths),
    )
    text = RENDERERS[fmt](report)
    if output is None or output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(output).write_text(text, encoding="utf-8")
        progress(f"report: {output}")
    for extra in args.also:
        Path(extra).write_text(
            RENDERERS[_SUFFIX_FORMAT[Path(extra).suffix.lower()]](report), encoding="utf-8"
        )
        progress(f"report: {extra}")
    if report.load_error is not None:
        # Nothing was tested: one line, exit 2 (the report says so too).
        print(f"{prog}: {report.load_error}", file=sys.stderr)
    else:
        progress(report.summary_line())
    return report.exit_code

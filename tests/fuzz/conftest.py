"""Set-up of the fuzzing tests: the chunkmap sample and the mutants package.

``tests/`` is not a package (pytest runs with ``--import-mode=importlib``), so the mutants
are loaded by path as ``pyimago_tests_fuzz_mutants``; the chunkmap sample is imported by name
from ``examples/``, as ``pyimago fuzz chunkmap:target`` imports it.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
EXAMPLES = _HERE.parent.parent / "examples"
_NAME = "pyimago_tests_fuzz_mutants"

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _NAME, _HERE / "mutants" / "__init__.py",
        submodule_search_locations=[str(_HERE / "mutants")],
    )
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)


# -- the kill rate, summed up at the end of the run -------------------------------------------
# Test reports reach the controlling process under xdist too, user properties included.

_kills: list[tuple[str, bool, float, int]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _kills.extend(value for name, value in report.user_properties if name == "pyimago_kill")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _kills:
        return
    caught = sorted(seconds for _, ok, seconds, _ in _kills if ok)
    missed = sorted(name for name, ok, _, _ in _kills if not ok)
    median = statistics.median(caught) if caught else float("nan")
    terminalreporter.section("pyimago oracle kill rate")
    terminalreporter.write_line(
        f"caught {len(caught)}/{len(_kills)} mutants ({len(caught) / len(_kills):.0%}); "
        f"median time to catch {median:.2f} s (ci budget, no shrinking)"
    )
    for name, ok, seconds, examples in sorted(_kills):
        verdict = f"caught after {examples} examples, {seconds:.1f} s" if ok else "SURVIVED"
        terminalreporter.write_line(f"  {name:42s} {verdict}")
    if missed:
        terminalreporter.write_line(f"survivors: {', '.join(missed)}")
    _kills.clear()

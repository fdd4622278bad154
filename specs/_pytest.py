"""pytest plugin: check ``@pytest.mark.clause`` citations and report outcomes per clause.

Enable it with ``pytest_plugins = ["pyimago.specs._pytest"]`` (or ``-p pyimago.specs._pytest``).
It

* fails the run at collection (``pytest.UsageError``, listing every offender) when a test
  cites a clause ID the registry in ``specs/*.toml`` does not define, or a marker cites none
  (under pytest-xdist, where a worker cannot stop the run cleanly, each offending test errors
  at setup with the same message instead);
* records each test's clauses as ``("clause", id)`` user properties, so they travel with the
  test reports (to the xdist controller and into JUnit XML);
* with ``--clause-report=FILE`` writes, on the controlling process, JSON with the tests and
  outcome counts of every clause and the clauses that no test cites (``untested``).

The JSON layout is described in ``specs/README.md``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

import pytest

from . import Clause, ClauseRegistryError, load_clauses

__all__ = [
    "CITATION_ERROR_PROPERTY",
    "CLAUSE_PROPERTY",
    "REPORT_VERSION",
    "build_report",
    "pytest_addoption",
    "pytest_configure",
]

#: Name of the user property (one per cited clause) attached to every report of a test.
CLAUSE_PROPERTY: Final = "clause"

#: User property carrying a bad citation from an xdist worker to the controller's report.
CITATION_ERROR_PROPERTY: Final = "clause-error"

#: Bumped whenever the JSON layout of ``--clause-report`` changes incompatibly.
REPORT_VERSION: Final = 1

Outcome = Literal["passed", "failed", "skipped"]
_OUTCOMES: Final[tuple[Outcome, ...]] = ("passed", "failed", "skipped")
_PLUGIN_NAME: Final = "pyimago-clause-tracker"
_BAD_CITATIONS: Final = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyimago-specs", "pyimago spec clauses")
    group.addoption(
        "--clause-report",
        metavar="FILE",
        default=None,
        help="write the outcome of the tests citing each spec clause, as JSON, to FILE",
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        clauses = load_clauses()
    except ClauseRegistryError as exc:
        raise pytest.UsageError(f"spec clause registry: {exc}") from exc
    if not config.pluginmanager.has_plugin(_PLUGIN_NAME):
        config.pluginmanager.register(_ClauseTracker(config, clauses), _PLUGIN_NAME)


def _check_citation(
    mark_args: Sequence[object], nodeid: str, known: dict[str, Clause]
) -> tuple[list[str], list[str]]:
    """One ``clause`` marker's valid clause IDs, and a message for each bad argument."""
    if not mark_args:
        return [], [f"{nodeid}: @pytest.mark.clause needs at least one clause id"]
    ids: list[str] = []
    errors: list[str] = []
    for arg in mark_args:
        if not isinstance(arg, str):
            errors.append(f"{nodeid}: @pytest.mark.clause takes clause id strings, not {arg!r}")
        elif arg not in known:
            close = difflib.get_close_matches(arg, list(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            errors.append(f"{nodeid}: cites unknown spec clause {arg!r}{hint}")
        else:
            ids.append(arg)
    return ids, errors


def _properties(report: pytest.TestReport, name: str) -> list[str]:
    # user_properties come back from xdist workers as lists or tuples.
    return [str(prop[1]) for prop in report.user_properties if len(prop) == 2 and prop[0] == name]


def build_report(
    clauses: dict[str, Clause],
    clauses_of: dict[str, Sequence[str]],
    outcome_of: dict[str, Outcome],
    citation_errors: Sequence[str] = (),
) -> dict[str, object]:
    """The ``--clause-report`` JSON document.

    ``clauses_of`` maps each test node ID to the clauses it cites; ``outcome_of`` maps the
    node IDs that ran to their final outcome; ``citation_errors`` lists bad citations.
    """
    tests_of: dict[str, list[str]] = {cid: [] for cid in clauses}
    for nodeid in sorted(clauses_of):
        for cid in clauses_of[nodeid]:
            tests_of[cid].append(nodeid)

    per_clause: dict[str, object] = {}
    totals = dict.fromkeys(_OUTCOMES, 0)
    for cid in sorted(clauses):
        counts = dict.fromkeys(_OUTCOMES, 0)
        for nodeid in tests_of[cid]:
            outcome = outcome_of.get(nodeid)
            if outcome is not None:
                counts[outcome] += 1
        clause = clauses[cid]
        per_clause[cid] = {
            "area": clause.area,
            "strength": clause.strength,
            "tests": tests_of[cid],
            "outcomes": counts,
        }
    for nodeid in clauses_of:
        outcome = outcome_of.get(nodeid)
        if outcome is not None:
            totals[outcome] += 1

    untested = sorted(cid for cid, tests in tests_of.items() if not tests)
    return {
        "version": REPORT_VERSION,
        "summary": {
            "clauses": len(clauses),
            "tested": len(clauses) - len(untested),
            "untested": len(untested),
            "tests": len(clauses_of),
            "outcomes": totals,
        },
        "clauses": per_clause,
        "untested": untested,
        "citation_errors": sorted(set(citation_errors)),
        "tests": {
            nodeid: {"outcome": outcome_of.get(nodeid, "not-run"), "clauses": list(cids)}
            for nodeid, cids in sorted(clauses_of.items())
        },
    }


class _ClauseTracker:
    """Per-run state; registered as a plugin object so in-process runs never share it."""

    def __init__(self, config: pytest.Config, clauses: dict[str, Clause]) -> None:
        self._config = config
        self._clauses = clauses
        self._clauses_of: dict[str, list[str]] = {}
        self._outcome_of: dict[str, Outcome] = {}
        self._written: Path | None = None
        self._in_worker = hasattr(config, "workerinput")
        self._usage_error = False
        self._citation_errors: list[str] = []

    # -- collection (in each xdist worker, or the only process) -------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # tryfirst: check every collected test, before -k / -m deselect some of them.
        errors: list[str] = []
        for item in items:
            ids: list[str] = []
            bad: list[str] = []
            for mark in item.iter_markers(name="clause"):
                valid, wrong = _check_citation(mark.args, item.nodeid, self._clauses)
                ids.extend(valid)
                bad.extend(wrong)
            errors.extend(bad)
            for cid in dict.fromkeys(ids):
                item.user_properties.append((CLAUSE_PROPERTY, cid))
            if bad and self._in_worker:
                item.stash[_BAD_CITATIONS] = bad
                item.user_properties.extend((CITATION_ERROR_PROPERTY, msg) for msg in bad)
        if errors and not self._in_worker:
            self._usage_error = True
            raise pytest.UsageError(
                "bad spec clause citations (clauses are defined in specs/*.toml):\n  "
                + "\n  ".join(errors)
            )

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # An xdist worker cannot stop the run cleanly (a UsageError there crashes the worker
        # and hides the message), so each offending test errors out with it instead.
        bad = item.stash.get(_BAD_CITATIONS, None)
        if bad:
            pytest.fail("bad spec clause citation: " + "; ".join(bad), pytrace=False)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # The final selection; under xdist the controller learns it from the reports instead.
        for item in session.items:
            ids = [str(v) for k, v in item.user_properties if k == CLAUSE_PROPERTY]
            if ids:
                self._clauses_of[item.nodeid] = ids

    # -- outcomes (on the controller under xdist) ---------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._citation_errors.extend(_properties(report, CITATION_ERROR_PROPERTY))
        ids = _properties(report, CLAUSE_PROPERTY)
        if not ids:
            return
        self._clauses_of.setdefault(report.nodeid, ids)
        previous = self._outcome_of.get(report.nodeid)
        if report.failed:
            # Any failing phase (setup, call, teardown) fails the test.
            self._outcome_of[report.nodeid] = "failed"
        elif report.skipped:
            # Skips and xfails; a teardown cannot undo a failure.
            if previous != "failed":
                self._outcome_of[report.nodeid] = "skipped"
        elif report.when == "call" and previous is None:
            self._outcome_of[report.nodeid] = "passed"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        target = self._config.getoption("clause_report")
        if target is None or self._in_worker or self._usage_error:
            return
        document = build_report(
            self._clauses, dict(self._clauses_of), self._outcome_of, self._citation_errors
        )
        # Relative to where pytest was started, like --junitxml.
        path = self._config.invocation_params.dir / Path(str(target))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        self._written = path

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self._written is None:
            return
        tested = {cid for cids in self._clauses_of.values() for cid in cids}
        failing = sorted(
            {
                cid
                for nodeid, cids in self._clauses_of.items()
                if self._outcome_of.get(nodeid) == "failed"
                for cid in cids
            }
        )
        terminalreporter.write_line(
            f"clause report: {self._written} ({len(tested)} of {len(self._clauses)} clauses "
            f"cited, {len(failing)} with failing tests)"
        )

"""pytest plugin of the conformance report: every test's outcome, message and traceback.

Enabled with ``-p pyimago.oracle.report._plugin --conformance-results=FILE``; writes JSON::

    {"version": 1,
     "tests": {nodeid: {"path", "name", "clauses", "outcome", "message", "details",
                        "duration"}},
     "collect_errors": [{"nodeid", "message"}]}

``outcome`` is ``passed``, ``failed`` (any phase failed), ``skipped``, ``not-applicable`` (a
skip whose reason starts with ``not applicable: ``) or ``not-run``.  It complements the spec
plugin's ``--clause-report`` with what the report shows for failures and skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

import pytest
from pyimago.oracle.conformance import NOT_APPLICABLE, PROGRESS_ENV

__all__ = [
    "NOT_APPLICABLE",
    "RESULTS_VERSION",
    "pytest_addoption",
    "pytest_configure",
]

RESULTS_VERSION: Final = 1

#: Longest traceback text kept per test.
_DETAILS_LIMIT: Final = 8000
_PLUGIN_NAME: Final = "pyimago-conformance-results"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyimago-conformance", "pyimago conformance report")
    group.addoption(
        "--conformance-results",
        metavar="FILE",
        default=None,
        help="write every test's outcome, message and traceback as JSON to FILE",
    )


def pytest_configure(config: pytest.Config) -> None:
    target = config.getoption("conformance_results")
    if target and not config.pluginmanager.has_plugin(_PLUGIN_NAME):
        config.pluginmanager.register(_Recorder(config, Path(str(target))), _PLUGIN_NAME)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr or "")
    return reason.removeprefix("Skipped: ")


def _failure_message(report: pytest.TestReport | pytest.CollectReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if isinstance(message, str) and message:
        return message
    text = report.longreprtext.strip()
    return text.splitlines()[-1] if text else "failed"


def _truncate(text: str) -> str:
    if len(text) <= _DETAILS_LIMIT:
        return text
    half = _DETAILS_LIMIT // 2
    return f"{text[:half]}\n[... {len(text) - _DETAILS_LIMIT} characters left out ...]\n" + text[
        -half:
    ]


class _Recorder:
    """Collects per-test results; one per pytest session (registered as a plugin object)."""

    def __init__(self, config: pytest.Config, target: Path) -> None:
        self._config = config
        self._target = target
        self._tests: dict[str, dict[str, Any]] = {}
        self._collect_errors: list[dict[str, str]] = []
        self._done = 0

    def _entry(self, nodeid: str) -> dict[str, Any]:
        return self._tests.setdefault(
            nodeid,
            {
                "path": "",
                "name": nodeid.rsplit("::", 1)[-1],
                "clauses": [],
                "outcome": "not-run",
                "message": "",
                "details": "",
                "duration": 0.0,
            },
        )

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            entry = self._entry(item.nodeid)
            entry["path"] = str(item.path)
            entry["name"] = item.name
            entry["clauses"] = list(
                dict.fromkeys(
                    str(arg) for mark in item.iter_markers(name="clause") for arg in mark.args
                )
            )

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._collect_errors.append(
                {"nodeid": report.nodeid, "message": _truncate(report.longreprtext)}
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self._entry(report.nodeid)
        entry["duration"] += report.duration
        previous = entry["outcome"]
        if report.failed:
            if previous != "failed":
                entry["outcome"] = "failed"
                phase = "" if report.when == "call" else f" (in {report.when})"
                entry["message"] = _failure_message(report) + phase
                entry["details"] = _truncate(report.longreprtext)
        elif report.skipped:
            if previous != "failed":
                reason = _skip_reason(report)
                if hasattr(report, "wasxfail"):
                    reason = f"expected failure: {report.wasxfail}"
                if reason.startswith(NOT_APPLICABLE):
                    entry["outcome"] = "not-applicable"
                    entry["message"] = reason.removeprefix(NOT_APPLICABLE)
                else:
                    entry["outcome"] = "skipped"
                    entry["message"] = reason
        elif report.when == "call" and previous == "not-run":
            entry["outcome"] = "passed"

    def _progress(self, running: str) -> None:
        # How far the run is, for the runner's progress lines (run_suite reads the file).
        where = os.environ.get(PROGRESS_ENV)
        if where:
            Path(where).write_text(f"{self._done} {len(self._tests)} {running}\n",
                                   encoding="utf-8")

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._progress(nodeid)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._done += 1
        self._progress("")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self._config, "workerinput"):
            return
        path = self._config.invocation_params.dir / self._target
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "version": RESULTS_VERSION,
            "exitstatus": int(exitstatus),
            "tests": dict(sorted(self._tests.items())),
            "collect_errors": self._collect_errors,
        }
        path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")

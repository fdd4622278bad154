"""Conformance reports: which clauses of pyimago's contract does an implementation meet?

``pyimago conformance --impl fast --format html -o report.html`` (see
:func:`conformance_main`) runs the clause-tagged conformance suite
(:mod:`pyimago.oracle.conformance`) with pytest in a subprocess and, unless told not to, the
oracle's state machines, then writes a report in the manner of h2spec: clauses grouped by
area, each *pass*, *fail*, *skip*, *not-applicable* or *untested*, failures with the
requirement, what was expected, what happened and the command that replays the check, and a
summary of counts per strength (must / should / may).

Formats: Markdown, one self-contained HTML file, JUnit XML (one testsuite per area, one
testcase per clause) and JSON (documented in ``SCHEMA.md``; ``schema_version`` 1).

Programmatic use::

    from pyimago.oracle.report import render_html, run_conformance
    report = run_conformance("fast", machines=False)
    assert not report.failed_must
"""

from __future__ import annotations

from ._build import build_report, split_failure
from ._cli import FORMATS, RENDERERS, conformance_main, environment, run_conformance
from ._html import render_html
from ._machines import run_machines
from ._model import (
    MACHINES_AREA,
    MACHINES_CLAUSE,
    OUTCOMES,
    SCHEMA_VERSION,
    STATUSES,
    AreaResult,
    ClauseResult,
    Evidence,
    MachineRun,
    Outcome,
    Report,
    Status,
    clause_status,
)
from ._render import render_json, render_junit, render_markdown
from ._suite import SuiteResult, TestRecord, run_suite

__all__ = [
    "FORMATS",
    "MACHINES_AREA",
    "MACHINES_CLAUSE",
    "OUTCOMES",
    "RENDERERS",
    "SCHEMA_VERSION",
    "STATUSES",
    "AreaResult",
    "ClauseResult",
    "Evidence",
    "MachineRun",
    "Outcome",
    "Report",
    "Status",
    "SuiteResult",
    "TestRecord",
    "build_report",
    "clause_status",
    "conformance_main",
    "environment",
    "render_html",
    "render_json",
    "render_junit",
    "render_markdown",
    "run_conformance",
    "run_machines",
    "run_suite",
    "split_failure",
]

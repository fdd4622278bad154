"""The report's sentences: plurals, the verdict when nothing ran or CrossHair did not, and
sources a reader can open."""

from __future__ import annotations

import dataclasses

from pyimago.oracle.report import Report, render_markdown
from pyimago.oracle.report._render import source_link, verdict


def test_plurals(report: Report) -> None:
    one = dataclasses.replace(report, errors=("boom",))
    assert "had 1 problem;" in verdict(one)
    two = dataclasses.replace(report, errors=("boom", "bang"))
    assert "had 2 problems;" in verdict(two)
    assert "(s)" not in render_markdown(report)


def test_load_error_verdict_and_exit_status(report: Report) -> None:
    broken = dataclasses.replace(report, load_error="cannot load implementation 'x': boom",
                                 errors=("cannot load implementation 'x': boom",))
    assert verdict(broken).startswith("NOT RUN: cannot load implementation 'x'")
    assert broken.exit_code == 2


def test_crosshair_not_run_is_in_the_header(report: Report) -> None:
    clean = dataclasses.replace(
        report,
        areas=tuple(dataclasses.replace(a, clauses=tuple(c for c in a.clauses
                                                         if c.status != "fail"))
                    for a in report.areas),
        machines=None,
        environment={**report.environment, "crosshair": "not installed: 2 checks not run"},
    )
    assert verdict(clean) == "PASS: no clause failed (CrossHair not installed: 2 checks not run)."
    assert "**CrossHair not installed: 2 checks not run**" in render_markdown(clean)


def test_sources_can_be_opened(report: Report) -> None:
    clause = report.clauses[0]
    web = dataclasses.replace(clause, source="QEMU qcow2.txt", url="https://example.org/q")
    assert source_link(web) == "QEMU qcow2.txt (<https://example.org/q>)"
    decision = dataclasses.replace(clause, source="our decision", url="issue:10")
    assert source_link(decision) == "our decision (pyimago issue #10)"

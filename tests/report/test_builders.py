"""The report model and its renderers, on the synthetic result set of ``_synthetic.py``."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from importlib import resources
from typing import Any, cast

import pytest
from pyimago.oracle.report import (
    SCHEMA_VERSION,
    STATUSES,
    Evidence,
    Outcome,
    Report,
    clause_status,
    render_html,
    render_json,
    render_junit,
    render_markdown,
    split_failure,
)
from pyimago_tests_report_synthetic import make_report

# -- the model -----------------------------------------------------------------------------------


def _ev(outcome: str) -> Evidence:
    return Evidence("test", f"t::{outcome}", cast(Outcome, outcome))


@pytest.mark.parametrize(
    ("outcomes", "status"),
    [
        ((), "untested"),
        (("passed",), "pass"),
        (("passed", "failed"), "fail"),
        (("passed", "skipped", "not-applicable"), "pass"),
        (("skipped", "not-applicable"), "skip"),
        (("not-run",), "skip"),
        (("not-applicable", "not-applicable"), "not-applicable"),
        (("failed", "not-applicable"), "fail"),
    ],
)
def test_clause_status_rules(outcomes: tuple[str, ...], status: str) -> None:
    assert clause_status(_ev(o) for o in outcomes) == status


def test_every_status_and_the_summary(report: Report) -> None:
    status = {c.id: c.status for c in report.clauses}
    assert status == {
        "access.passes": "pass",
        "access.fails": "fail",
        "access.skips": "skip",
        "access.untested": "untested",
        "access.should-fails": "fail",
        "qcow2.header.na": "not-applicable",
        "qcow2.header.mixed": "pass",
        "oracle.machines": "fail",
    }
    summary = report.summary()
    assert summary["must"] == {"pass": 1, "fail": 2, "skip": 1, "not-applicable": 1,
                               "untested": 1}
    assert summary["should"] == {"pass": 0, "fail": 1, "skip": 0, "not-applicable": 0,
                                 "untested": 0}
    assert summary["may"]["pass"] == 1
    assert report.summary_line() == (
        "must: 1 pass, 2 fail, 1 skip, 1 not-applicable, 1 untested | should: 1 fail | "
        "may: 1 pass"
    )
    assert [c.id for c in report.failed_must] == ["access.fails", "oracle.machines"]
    assert report.exit_code == 1


def test_exit_code_ignores_should_failures_but_not_run_errors() -> None:
    from pyimago_tests_report_synthetic import RECORDS

    only_should = [r for r in RECORDS if r.name != "test_fail"]
    assert make_report(records=only_should, machines=None).exit_code == 0
    assert make_report(records=only_should, machines=None, errors=("boom",)).exit_code == 1


@pytest.mark.parametrize(
    ("message", "expected", "actual"),
    [
        ("Failed: DID NOT RAISE <class 'pyimago.reference._errors.CorruptImageError'>",
         "CorruptImageError raised", "the call returned without raising it"),
        ("AssertionError: L2 bit 1: expected CorruptImageError, got no error",
         "CorruptImageError", "L2 bit 1: no error"),
        ("AssertionError: the snapshot changed\nassert b'\\x00' == b'\\x01'",
         "b'\\x01'", "the snapshot changed (got b'\\x00')"),
        ("TypeError: unsupported operand", "no exception", "TypeError: unsupported operand"),
        ("AssertionError: something odd", "", "something odd"),
    ],
)
def test_split_failure(message: str, expected: str, actual: str) -> None:
    assert split_failure(message) == (expected, actual)


def test_failures_carry_expected_happened_and_replay(report: Report) -> None:
    (clause,) = [c for c in report.clauses if c.id == "access.fails"]
    (failure,) = clause.failures
    assert failure.expected == "512 bytes back"
    assert failure.actual.startswith("writing 512 bytes: 511")
    assert failure.replay == (
        "PYIMAGO_CONFORMANCE_IMPL=synthetic:target python -m pytest -p no:cacheprovider "
        "/suite/test_synthetic.py::test_fail"
    )
    (machine,) = [c for c in report.clauses if c.id == "oracle.machines"]
    assert machine.failures[0].replay == "pyimago replay /tmp/failures/replay-1.json"


# -- Markdown ------------------------------------------------------------------------------------


def test_markdown(report: Report) -> None:
    md = render_markdown(report)
    assert md.startswith("# pyimago conformance report: synthetic\n")
    assert "**FAIL: 2 must clauses failed: access.fails, oracle.machines.**" in md
    assert f"Summary: {report.summary_line()}" in md
    assert "| must | 1 | 2 | 1 | 1 | 1 |" in md
    assert "| should | 0 | 1 | 0 | 0 | 0 |" in md
    assert "## access: FormatAccess operations" in md
    assert "## oracle: Oracle state machines" in md
    assert ("| ∅ n/a | `qcow2.header.na` | must | Not applicable here | qemu-img not installed |"
            in md)
    assert "| ? untested | `access.untested` | must | Nobody checks this | no check cites" in md
    assert "| ↷ skip | `access.skips` | must | A skipped clause | zstandard missing |" in md
    # A failure: requirement, expected, happened, replay, details (in a longer fence).
    section = md[md.index("#### ✘ `access.fails`"):]
    assert "- **Requirement:** The requirement of access.fails." in section
    assert "  - **Expected:** `512 bytes back`" in section
    assert "  - **Happened:** ``writing 512 bytes: 511 <script>" in section
    assert "/suite/test_synthetic.py::test_fail`" in section
    assert "````\nTraceback text\n```\n" in section
    assert "- **Replay:** `pyimago replay /tmp/failures/replay-1.json`" in md
    assert md.rstrip().endswith(f"Summary: {report.summary_line()}")


# -- JSON ----------------------------------------------------------------------------------------


def _documented() -> dict[str, set[str]]:
    """Field names per section of SCHEMA.md (the backticked first column of each table)."""
    text = (resources.files("pyimago.oracle.report") / "SCHEMA.md").read_text(encoding="utf-8")
    sections: dict[str, set[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        match = re.match(r"^\| `([a-z_]+)` \|", line)
        if match and current:
            sections.setdefault(current, set()).add(match.group(1))
    return sections


def test_json_follows_the_documented_schema(report: Report) -> None:
    data: dict[str, Any] = json.loads(render_json(report))
    doc = _documented()
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert set(data) == doc["Top level"]
    assert set(data["summary"]) == doc["`summary`"]
    assert set(data["machines"]) == doc["`machines`"]
    assert set(data["summary"]["totals"]) == set(STATUSES)
    assert set(data["summary"]["by_strength"]) == {"must", "should", "may"}
    for area in data["areas"]:
        assert set(area) == doc["`areas[]`"]
        assert set(area["counts"]) == set(STATUSES)
        for clause in area["clauses"]:
            assert set(clause) == doc["`areas[].clauses[]`"]
            assert clause["status"] in STATUSES
            for ev in clause["evidence"]:
                assert set(ev) == doc["`areas[].clauses[].evidence[]`"]
    statuses = {c["id"]: c["status"] for a in data["areas"] for c in a["clauses"]}
    assert statuses["access.untested"] == "untested"
    assert statuses["qcow2.header.na"] == "not-applicable"
    assert data["summary"]["failed_must"] == ["access.fails", "oracle.machines"]
    assert data["exit_code"] == 1
    assert data["machines"]["replay"] == "pyimago replay /tmp/failures/replay-1.json"
    # Stable: the same report renders to the same text.
    assert render_json(report) == render_json(make_report())


# -- JUnit ---------------------------------------------------------------------------------------


def test_junit_parses_with_one_suite_per_area(report: Report) -> None:
    root = ET.fromstring(render_junit(report).encode())
    assert root.tag == "testsuites"
    assert root.get("failures") == "3"
    assert root.get("skipped") == "3"
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["access", "qcow2-header", "oracle"]
    cases = {c.get("name"): c for s in root.findall("testsuite") for c in s.findall("testcase")}
    assert set(cases) == {c.id for c in report.clauses}
    assert suites["access"].get("tests") == "5"
    assert suites["access"].get("failures") == "2"
    failure = cases["access.fails"].find("failure")
    assert failure is not None and failure.get("type") == "must"
    assert "Requirement: The requirement of access.fails." in (failure.text or "")
    assert "Replay: PYIMAGO_CONFORMANCE_IMPL=synthetic:target" in (failure.text or "")
    assert "\x01" not in (failure.text or ""), "control characters must not reach the XML"
    for cid, prefix in [("access.skips", "skip: "), ("qcow2.header.na", "not-applicable: "),
                        ("access.untested", "untested: ")]:
        skipped = cases[cid].find("skipped")
        assert skipped is not None and (skipped.get("message") or "").startswith(prefix), cid
    assert cases["access.passes"].find("failure") is None
    assert cases["access.passes"].find("skipped") is None
    props = {p.get("name"): p.get("value") for p in cases["access.passes"].iter("property")}
    assert props["strength"] == "must" and props["status"] == "pass"


def test_junit_reports_run_errors() -> None:
    root = ET.fromstring(render_junit(make_report(errors=("cannot collect x\ntrace",))))
    suite = root.find("testsuite[@name='pyimago.errors']")
    assert suite is not None
    error = suite.find("testcase/error")
    assert error is not None and error.get("message") == "cannot collect x"
    assert root.get("errors") == "1"


# -- HTML ----------------------------------------------------------------------------------------


def test_html_is_self_contained_and_escaped(report: Report) -> None:
    html = render_html(report)
    assert html.startswith("<!DOCTYPE html>")
    lowered = html.lower()
    for external in ("<script", "<link", " src=", "@import", "url("):
        assert external not in lowered, f"the page references {external!r}"
    assert "<style>" in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert 'id="summary"' in html and 'id="summary-line"' in html
    assert report.summary_line() in html
    # Failed clauses come expanded, with expected / happened / replay.
    match = re.search(r'<details class="clause s-fail" id="clause-access.fails" open>(.*?)'
                      r"</div></details>", html, re.S)
    assert match, "the failed clause is not an expanded <details>"
    body = match.group(1)
    for text in ("Requirement", "Expected", "Happened", "Replay", "512 bytes back",
                 "/suite/test_synthetic.py::test_fail"):
        assert text in body, text
    assert '<details class="clause s-pass" id="clause-access.passes">' in html
    for name in ("access", "qcow2-header", "oracle"):
        assert f'<section id="area-{name}">' in html
    assert html.count("<details") == html.count("</details>")

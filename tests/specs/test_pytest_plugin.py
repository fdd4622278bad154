"""The pytest plugin pyimago.specs._pytest: citation checks and the per-clause report."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from pyimago.specs import load_clauses

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "pyimago.specs._pytest", "-p", "no:cacheprovider")

# The project declares the marker in pyproject.toml; the inner runs get the same declaration
# and --strict-markers, as in the real suite.
INI = """
[pytest]
addopts = --strict-markers
markers =
    clause(*ids): the spec clauses this test checks
"""

MIXED_OUTCOMES = """
import pytest

@pytest.mark.clause("access.read.no-short")
def test_pass():
    pass

@pytest.mark.clause("access.read.no-short", "access.write.past-end")
def test_fail():
    assert False

@pytest.mark.clause("access.write.past-end")
def test_skip():
    pytest.skip("not today")

@pytest.mark.clause("access.flush.no-sync")
@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown")

@pytest.mark.clause("access.sync.no-flush")
def test_teardown_error(broken_teardown):
    pass

@pytest.mark.clause("raw.passthrough")
class TestClassLevel:
    @pytest.mark.parametrize("n", [1, 2])
    def test_param(self, n):
        pass

def test_uncited():
    pass
"""

BAD_CITATIONS = """
import pytest

@pytest.mark.clause("access.read.no-shrt")
def test_typo():
    pass

@pytest.mark.clause()
def test_empty():
    pass

@pytest.mark.clause(42)
def test_not_a_string():
    pass

@pytest.mark.clause("access.read.no-short")
def test_fine():
    pass
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    return pytester


def read_report(pytester: pytest.Pytester, name: str = "report.json") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / name).read_text(encoding="utf-8"))
    return data


def assert_mixed_report(report: dict[str, Any]) -> None:
    clauses = report["clauses"]
    assert report["version"] == 1
    assert set(clauses) == set(load_clauses())
    assert clauses["access.read.no-short"]["outcomes"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert clauses["access.read.no-short"]["tests"] == [
        "test_mixed.py::test_fail",
        "test_mixed.py::test_pass",
    ]
    assert clauses["access.write.past-end"]["outcomes"] == {
        "passed": 0,
        "failed": 1,
        "skipped": 1,
    }
    # xfail counts as skipped; a teardown error fails an otherwise passing test.
    assert clauses["access.flush.no-sync"]["outcomes"]["skipped"] == 1
    assert clauses["access.sync.no-flush"]["outcomes"] == {"passed": 0, "failed": 1, "skipped": 0}
    # A class-level marker covers every parametrized case.
    assert clauses["raw.passthrough"]["outcomes"]["passed"] == 2
    assert clauses["access.write.past-end"]["strength"] == "must"
    assert clauses["access.write.past-end"]["area"] == "access"

    cited = {
        "access.read.no-short",
        "access.write.past-end",
        "access.flush.no-sync",
        "access.sync.no-flush",
        "raw.passthrough",
    }
    assert set(report["untested"]) == set(load_clauses()) - cited
    assert report["untested"] == sorted(report["untested"])
    assert "test_mixed.py::test_uncited" not in report["tests"]
    assert report["tests"]["test_mixed.py::test_fail"] == {
        "outcome": "failed",
        "clauses": ["access.read.no-short", "access.write.past-end"],
    }
    assert report["summary"]["tests"] == 7
    assert report["summary"]["outcomes"] == {"passed": 3, "failed": 2, "skipped": 2}
    assert report["summary"]["tested"] == len(cited)
    assert report["citation_errors"] == []


def test_unknown_clause_stops_the_run_at_collection(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_bad=BAD_CITATIONS)
    result = inner.runpytest(*PLUGIN, "--clause-report=report.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*bad spec clause citations*",
            "*test_bad.py::test_typo: cites unknown spec clause 'access.read.no-shrt'"
            " (did you mean access.read.no-short*",
            "*test_bad.py::test_empty: @pytest.mark.clause needs at least one clause id*",
            "*test_bad.py::test_not_a_string: @pytest.mark.clause takes clause id strings*",
        ]
    )
    # No test ran, and no report pretends otherwise.
    assert not (inner.path / "report.json").exists()


def test_deselected_tests_are_still_checked(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_bad=BAD_CITATIONS)
    result = inner.runpytest(*PLUGIN, "-k", "test_fine")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_clause_report_counts_outcomes_per_clause(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_mixed=MIXED_OUTCOMES)
    result = inner.runpytest(*PLUGIN, "--clause-report=report.json")
    result.assert_outcomes(passed=5, failed=1, skipped=1, xfailed=1, errors=1)
    result.stdout.fnmatch_lines(["clause report: *report.json (5 of * clauses cited, 3 with*"])
    assert_mixed_report(read_report(inner))


def test_no_report_without_the_option(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_mixed=MIXED_OUTCOMES)
    result = inner.runpytest(*PLUGIN)
    result.assert_outcomes(passed=5, failed=1, skipped=1, xfailed=1, errors=1)
    assert not list(inner.path.glob("*.json"))
    assert "clause report" not in result.stdout.str()


def test_clauses_reach_junit_xml_as_properties(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_mixed=MIXED_OUTCOMES)
    inner.runpytest(*PLUGIN, "--junitxml=junit.xml")
    root = ET.parse(inner.path / "junit.xml").getroot()
    case = next(c for c in root.iter("testcase") if c.get("name") == "test_fail")
    props = [(p.get("name"), p.get("value")) for p in case.iter("property")]
    assert props == [("clause", "access.read.no-short"), ("clause", "access.write.past-end")]


def test_report_under_xdist_matches_a_serial_run(inner: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    inner.makepyfile(test_mixed=MIXED_OUTCOMES, test_bad=BAD_CITATIONS)
    result = inner.runpytest_subprocess(*PLUGIN, "-n", "2", "--clause-report=report.json")
    # Workers cannot stop the run, so the bad citations error at setup instead.
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*ERROR*test_bad.py::test_typo*bad spec clause citation*"])
    report = read_report(inner)
    errors = report.pop("citation_errors")
    assert any("'access.read.no-shrt'" in e for e in errors)
    assert any("test_empty" in e for e in errors)
    report["citation_errors"] = []
    # test_bad.py::test_fine also cites access.read.no-short and passes.
    report["clauses"]["access.read.no-short"]["tests"].remove("test_bad.py::test_fine")
    report["clauses"]["access.read.no-short"]["outcomes"]["passed"] -= 1
    del report["tests"]["test_bad.py::test_fine"]
    report["summary"]["tests"] -= 1
    report["summary"]["outcomes"]["passed"] -= 1
    assert_mixed_report(report)

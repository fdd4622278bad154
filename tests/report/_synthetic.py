"""A synthetic result set for the report builders: every status, strength and failure kind.

Loaded by ``conftest.py`` as ``pyimago_tests_report_synthetic`` (``tests/`` is not a package).

Two areas with made-up clauses (so the tests do not depend on the real registry's size), test
records with every outcome, a failing machine run, and text that needs escaping in every
format (markup, table pipes, backticks, a control character, non-ASCII).
"""

from __future__ import annotations

from pyimago.oracle.report import MachineRun, Report, build_report
from pyimago.oracle.report._suite import SuiteResult, TestRecord
from pyimago.specs import Area, Clause, Strength

NASTY = "<script>alert('x')</script> a|b `tick` \x01 ünï"


def _clause(cid: str, strength: Strength, title: str) -> Clause:
    return Clause(
        id=cid,
        area=cid.split(".")[0] if not cid.startswith("qcow2") else "qcow2-header",
        strength=strength,
        title=title,
        requirement=f"The requirement of {cid}.",
        quote=f"The quote of {cid}.",
        source="synthetic source",
        url="https://example.invalid/spec" if strength != "may" else "issue:6",
        divergence="We differ on purpose." if cid == "access.fails" else None,
    )


CLAUSES = {
    c.id: c
    for c in [
        _clause("access.passes", "must", "A passing clause"),
        _clause("access.fails", "must", "A failing must clause"),
        _clause("access.skips", "must", "A skipped clause"),
        _clause("access.untested", "must", "Nobody checks this"),
        _clause("access.should-fails", "should", "A failing should clause"),
        _clause("qcow2.header.na", "must", "Not applicable here"),
        _clause("qcow2.header.mixed", "may", "Passes once, not applicable once"),
    ]
}
AREAS = {
    "access": Area("access", "FormatAccess operations", "The access area.",
                   ("access.passes", "access.fails", "access.skips", "access.untested",
                    "access.should-fails")),
    "qcow2-header": Area("qcow2-header", "qcow2 header", "", ("qcow2.header.na",
                                                             "qcow2.header.mixed")),
}


def _record(name: str, clauses: tuple[str, ...], outcome: str, message: str = "",
            details: str = "") -> TestRecord:
    return TestRecord(
        nodeid=f"test_synthetic.py::{name}",
        path="/suite/test_synthetic.py",
        name=name,
        clauses=clauses,
        outcome=outcome,
        message=message,
        details=details,
        duration=0.25,
    )


RECORDS = [
    _record("test_pass", ("access.passes", "qcow2.header.mixed"), "passed"),
    _record("test_pass_too", ("access.fails",), "passed"),
    _record("test_fail", ("access.fails",), "failed",
            f"AssertionError: writing 512 bytes: expected 512 bytes back, got 511 {NASTY}",
            f"Traceback text\n```\nE   AssertionError {NASTY}"),
    _record("test_raises", ("access.should-fails",), "failed",
            "Failed: DID NOT RAISE <class 'pyimago.reference._errors.CorruptImageError'>",
            "trace"),
    _record("test_skip", ("access.skips",), "skipped", "zstandard missing"),
    _record("test_na", ("qcow2.header.na", "qcow2.header.mixed"), "not-applicable",
            "qemu-img not installed"),
]


def make_suite(records: list[TestRecord] = RECORDS) -> SuiteResult:
    clause_tests: dict[str, tuple[str, ...]] = {cid: () for cid in CLAUSES}
    for r in records:
        for cid in r.clauses:
            clause_tests[cid] = (*clause_tests[cid], r.nodeid)
    return SuiteResult({r.nodeid: r for r in records}, clause_tests, (), 1, 1.5)


FAILED_MACHINES = MachineRun(
    outcome="failed",
    profile="ci",
    max_examples=5,
    runs=17,
    steps=40,
    duration=2.0,
    message="OracleFailure: byte 0x1ff reads 0x00, the model expects 0x7f",
    details="1 WRITE 0x0 thru 0x1ff <== covers 0x1ff",
    replay_files=("/tmp/failures/replay-1.json",),
    ops={"write": 3, "read": 2},
)


def make_report(
    *,
    records: list[TestRecord] = RECORDS,
    machines: MachineRun | None = FAILED_MACHINES,
    errors: tuple[str, ...] = (),
) -> Report:
    return build_report(
        impl="synthetic:target",
        impl_name="synthetic",
        areas=AREAS,
        clauses=CLAUSES,
        suite=make_suite(records),
        machines=machines,
        generated="2025-01-01T00:00:00+00:00",
        duration=3.5,
        environment={"python": "3.11", "qemu-img": "not installed"},
        errors=errors,
    )


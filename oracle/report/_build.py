"""Assemble a :class:`~._model.Report` from the suite's results, the machines and the registry."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from pyimago.specs import Area, Clause

from ._model import (
    MACHINES_AREA,
    MACHINES_CLAUSE,
    AreaResult,
    ClauseResult,
    Evidence,
    MachineRun,
    Outcome,
    Report,
)
from ._suite import SuiteResult, TestRecord, replay_command

__all__ = ["build_report", "machine_clause", "split_failure"]

_DID_NOT_RAISE: Final = re.compile(r"DID NOT RAISE (?:<class '(?:[\w.]+\.)?(\w+)'>|(\w+))")
_COMPARE: Final = re.compile(r"^assert (.+?) (==|!=|in|not in|is|is not) (.+)$")
_EXPECTED_GOT: Final = re.compile(
    r"^(?:(?P<what>.+?): )?expected (?P<exp>.+?), got:? (?P<act>.+)$"
)

_OUTCOMES: Final[dict[str, Outcome]] = {
    "passed": "passed",
    "failed": "failed",
    "skipped": "skipped",
    "not-applicable": "not-applicable",
}


def split_failure(message: str) -> tuple[str, str]:
    """(expected, actual) told apart from a test's failure message, where possible.

    The suite's own ``"<case>: expected <X>, got <Y>"`` messages and ``pytest.raises``
    failures say what was expected; comparisons are written ``assert actual == expected``;
    other exceptions are what happened where nothing was expected to be raised.  Anything
    else comes back as ``("", message)``.
    """
    text = message.strip()
    raised = _DID_NOT_RAISE.search(text)
    if raised:
        name = raised.group(1) or raised.group(2)
        return f"{name} raised", "the call returned without raising it"
    lines = text.splitlines()
    head = lines[0] if lines else ""
    head = head.removeprefix("AssertionError: ")
    said = _EXPECTED_GOT.match(head)
    if said:
        what = f"{said.group('what')}: " if said.group("what") else ""
        return said.group("exp"), what + said.group("act")
    for line in lines[1:]:
        match = _COMPARE.match(line.strip())
        if match and match.group(2) == "==":
            # The first line is the suite's own sentence; the comparison follows it.
            return match.group(3), f"{head} (got {match.group(1)})" if head else match.group(1)
    if text.startswith("AssertionError"):
        return "", head
    exc_name = text.split(":", 1)[0]
    if re.fullmatch(r"[A-Za-z_][\w.]*(Error|Exception|Warning)", exc_name):
        return "no exception", text
    return "", text


def _evidence(impl: str, record: TestRecord) -> Evidence:
    outcome = _OUTCOMES.get(record.outcome, "not-run")
    expected, actual = ("", "")
    if outcome == "failed":
        expected, actual = split_failure(record.message)
    message = record.message
    if outcome == "not-run" and not message:
        message = "collected but never run"
    return Evidence(
        kind="test",
        id=record.nodeid,
        outcome=outcome,
        message=message,
        expected=expected,
        actual=actual,
        details=record.details if outcome == "failed" else "",
        replay=replay_command(impl, record),
        duration=record.duration,
    )


def machine_clause() -> Clause:
    """The synthetic clause the oracle's machines are reported under."""
    return Clause(
        id=MACHINES_CLAUSE,
        area=MACHINES_AREA,
        strength="must",
        title="The implementation agrees with the flat model on random operation sequences",
        requirement=(
            "Driven by the oracle's Hypothesis state machines over backing chains of raw and "
            "qcow2 layers (reads, writes, zeroing, the three discards, resizes, flushes, "
            "reopens, cache sweeps, parallel requests), every byte the model knows reads as "
            "the model says, the size matches, mappings tile the disk and agree with the "
            "layer's allocation, and file chains pass qemu-img check."
        ),
        quote="The machines run green against the reference in CI on every combination above.",
        source="pyimago issue 3 (the oracle)",
        url="issue:3",
    )


def _machine_evidence(run: MachineRun) -> Evidence:
    budget = (
        f"{run.runs} runs for a budget of {run.max_examples} examples, {run.steps} steps, "
        f"profile {run.profile}"
    )
    return Evidence(
        kind="machine",
        id="machines",
        outcome=run.outcome,
        message=run.message or budget,
        expected="every step agrees with the model" if run.outcome == "failed" else "",
        actual=run.message if run.outcome == "failed" else "",
        details=run.details,
        replay=run.replay,
        duration=run.duration,
    )


def _clause_result(clause: Clause, evidence: tuple[Evidence, ...]) -> ClauseResult:
    return ClauseResult(
        id=clause.id,
        area=clause.area,
        strength=clause.strength,
        title=clause.title,
        requirement=clause.requirement,
        quote=clause.quote,
        source=clause.source,
        url=clause.url,
        divergence=clause.divergence,
        errata=clause.errata,
        evidence=evidence,
    )


def build_report(
    *,
    impl: str,
    impl_name: str,
    areas: Mapping[str, Area],
    clauses: Mapping[str, Clause],
    suite: SuiteResult | None,
    machines: MachineRun | None,
    generated: str,
    duration: float,
    environment: Mapping[str, str],
    errors: tuple[str, ...] = (),
) -> Report:
    """The report: every registry clause with the evidence citing it, grouped by area.

    A suite that could not load the implementation is one error; its clauses are untested.
    """
    load_error = suite.load_error if suite is not None else None
    if load_error is not None:
        suite = None
    evidence: dict[str, list[Evidence]] = {cid: [] for cid in clauses}
    if suite is not None:
        for record in suite.tests.values():
            ev = _evidence(impl, record)
            for cid in record.clauses:
                if cid in evidence:
                    evidence[cid].append(ev)
        # Tests the spec plugin saw but ours did not (should not happen): still evidence.
        for cid, nodeids in suite.clause_tests.items():
            for nodeid in nodeids:
                if nodeid not in suite.tests and cid in evidence:
                    evidence[cid].append(Evidence("test", nodeid, "not-run", "no result"))

    machine_ev = _machine_evidence(machines) if machines is not None else None
    if machine_ev is not None and machines is not None and machines.outcome == "failed":
        for cid in machines.clauses:
            if cid in evidence:
                evidence[cid].append(machine_ev)

    results: list[AreaResult] = []
    for name, area in areas.items():
        results.append(
            AreaResult(
                name=name,
                title=area.title,
                description=area.description,
                clauses=tuple(
                    _clause_result(clauses[cid], tuple(evidence[cid]))
                    for cid in area.clause_ids
                    if cid in clauses
                ),
            )
        )
    if machine_ev is not None:
        results.append(
            AreaResult(
                name=MACHINES_AREA,
                title="Oracle state machines",
                description=(
                    "The oracle's model-checking machines (pyimago.oracle) run against the "
                    "implementation for a bounded budget; reported as one synthetic clause."
                ),
                clauses=(_clause_result(machine_clause(), (machine_ev,)),),
            )
        )
    all_errors = tuple(errors) + (suite.errors if suite is not None else ())
    if load_error is not None:
        all_errors = (*errors, load_error)
    return Report(
        impl=impl,
        impl_name=impl_name,
        generated=generated,
        duration=duration,
        environment=dict(environment),
        areas=tuple(results),
        machines=machines,
        errors=all_errors,
        suite_duration=suite.duration if suite is not None else 0.0,
        load_error=load_error,
    )

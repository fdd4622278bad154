"""The conformance report as data: clauses grouped by area, each with its status and evidence.

Every renderer (Markdown, HTML, JUnit, JSON) reads a :class:`Report`; ``SCHEMA.md`` documents
its JSON form, which :meth:`Report.to_json` produces.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, get_args

__all__ = [
    "MACHINES_AREA",
    "MACHINES_CLAUSE",
    "OUTCOMES",
    "SCHEMA_VERSION",
    "STATUSES",
    "STRENGTHS",
    "AreaResult",
    "ClauseResult",
    "Evidence",
    "MachineRun",
    "Outcome",
    "Report",
    "Status",
    "clause_status",
]

#: Version of the JSON layout (``schema_version``); bumped only on incompatible changes.
SCHEMA_VERSION: Final = 1

Status: TypeAlias = Literal["pass", "fail", "skip", "not-applicable", "untested"]
#: A clause's status, in the order reports list them.
STATUSES: Final[tuple[Status, ...]] = get_args(Status)

Outcome: TypeAlias = Literal["passed", "failed", "skipped", "not-applicable", "not-run"]
#: The outcome of one piece of evidence (a test, or a machine campaign).
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

Strength: TypeAlias = Literal["must", "should", "may"]
STRENGTHS: Final[tuple[Strength, ...]] = get_args(Strength)

#: The synthetic area and clause the oracle's state machines are reported under when a
#: failure cannot be attributed to registry clauses.
MACHINES_AREA: Final = "oracle"
MACHINES_CLAUSE: Final = "oracle.machines"


@dataclass(frozen=True, slots=True)
class Evidence:
    """One check that cites a clause: a conformance test, or the oracle's machines."""

    kind: Literal["test", "machine"]
    id: str
    """A pytest node ID (``test_access.py::test_x``), or ``machines`` for the oracle."""
    outcome: Outcome
    message: str = ""
    """Failures: the assertion message or exception; skips: the reason."""
    expected: str = ""
    """Failures: what the check expected, where it can be told (else empty)."""
    actual: str = ""
    """Failures: what happened instead, where it can be told (else the message)."""
    details: str = ""
    """Failures: the traceback or the machine's operation log (may be long)."""
    replay: str = ""
    """A shell command that runs this check again."""
    duration: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "outcome": self.outcome,
            "message": self.message,
            "expected": self.expected,
            "actual": self.actual,
            "details": self.details,
            "replay": self.replay,
            "duration": round(self.duration, 3),
        }


def clause_status(evidence: Iterable[Evidence]) -> Status:
    """A clause's status from its evidence: any failure fails it, else any pass passes it,
    else a skip (or a check that never ran) skips it, else it is not applicable; a clause
    with no evidence is untested."""
    outcomes = {e.outcome for e in evidence}
    if not outcomes:
        return "untested"
    if "failed" in outcomes:
        return "fail"
    if "passed" in outcomes:
        return "pass"
    if outcomes & {"skipped", "not-run"}:
        return "skip"
    return "not-applicable"


@dataclass(frozen=True, slots=True)
class ClauseResult:
    """One clause of the registry and what the run found out about it."""

    id: str
    area: str
    strength: Strength
    title: str
    requirement: str
    quote: str
    source: str
    url: str
    divergence: str | None
    errata: str | None
    evidence: tuple[Evidence, ...]

    @property
    def status(self) -> Status:
        return clause_status(self.evidence)

    @property
    def failures(self) -> tuple[Evidence, ...]:
        return tuple(e for e in self.evidence if e.outcome == "failed")

    @property
    def reason(self) -> str:
        """Why a clause was skipped or not applicable (the first reason given)."""
        for e in self.evidence:
            if e.outcome in ("skipped", "not-applicable", "not-run") and e.message:
                return e.message
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "area": self.area,
            "strength": self.strength,
            "status": self.status,
            "title": self.title,
            "requirement": self.requirement,
            "quote": self.quote,
            "source": self.source,
            "url": self.url,
            "divergence": self.divergence,
            "errata": self.errata,
            "reason": self.reason,
            "evidence": [e.to_json() for e in self.evidence],
        }


@dataclass(frozen=True, slots=True)
class AreaResult:
    """One area (a registry file, or the synthetic ``oracle`` area) and its clauses."""

    name: str
    title: str
    description: str
    clauses: tuple[ClauseResult, ...]

    def counts(self) -> dict[Status, int]:
        out = dict.fromkeys(STATUSES, 0)
        for c in self.clauses:
            out[c.status] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "counts": self.counts(),
            "clauses": [c.to_json() for c in self.clauses],
        }


@dataclass(frozen=True, slots=True)
class MachineRun:
    """What running the oracle's state machines against the implementation gave."""

    outcome: Outcome
    profile: str
    max_examples: int
    """The budget: examples Hypothesis generates (before shrinking)."""
    runs: int = 0
    """Test cases run, shrinking included."""
    steps: int = 0
    duration: float = 0.0
    message: str = ""
    details: str = ""
    replay_files: tuple[str, ...] = ()
    clauses: tuple[str, ...] = ()
    """Registry clauses a failure was attributed to (empty: the synthetic clause only)."""
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def replay(self) -> str:
        return "\n".join(f"pyimago replay {path}" for path in self.replay_files)

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "profile": self.profile,
            "max_examples": self.max_examples,
            "runs": self.runs,
            "steps": self.steps,
            "duration": round(self.duration, 3),
            "message": self.message,
            "details": self.details,
            "replay_files": list(self.replay_files),
            "replay": self.replay,
            "clauses": list(self.clauses),
            "ops": dict(sorted(self.ops.items())),
        }


@dataclass(frozen=True, slots=True)
class Report:
    """A whole conformance report."""

    impl: str
    """How the implementation was named (``reference``, ``fast``, ``module:attr``)."""
    impl_name: str
    generated: str
    """When the run started (ISO 8601, UTC)."""
    duration: float
    environment: dict[str, str]
    areas: tuple[AreaResult, ...]
    machines: MachineRun | None = None
    errors: tuple[str, ...] = ()
    """Problems of the run itself (collection errors, a crashed suite, bad citations)."""
    suite_duration: float = 0.0
    load_error: str | None = None
    """Why the suite could not load the implementation (then every clause is untested)."""

    @property
    def clauses(self) -> tuple[ClauseResult, ...]:
        return tuple(c for a in self.areas for c in a.clauses)

    def summary(self) -> dict[Strength, dict[Status, int]]:
        """Counts of clauses per strength and status."""
        out: dict[Strength, dict[Status, int]] = {s: dict.fromkeys(STATUSES, 0) for s in STRENGTHS}
        for c in self.clauses:
            out[c.strength][c.status] += 1
        return out

    def totals(self) -> dict[Status, int]:
        out = dict.fromkeys(STATUSES, 0)
        for c in self.clauses:
            out[c.status] += 1
        return out

    @property
    def failed_must(self) -> tuple[ClauseResult, ...]:
        return tuple(c for c in self.clauses if c.strength == "must" and c.status == "fail")

    @property
    def exit_code(self) -> int:
        """0 when no ``must`` clause failed and the run itself worked, else 1; 2 when the
        implementation could not be loaded (nothing was tested)."""
        if self.load_error is not None:
            return 2
        return 1 if self.failed_must or self.errors else 0

    def summary_line(self) -> str:
        """``must: 95 pass, 1 fail, ... | should: ... | may: ...`` (statuses with a count)."""
        parts = []
        for strength, counts in self.summary().items():
            shown = ", ".join(f"{n} {status}" for status, n in counts.items() if n) or "none"
            parts.append(f"{strength}: {shown}")
        return " | ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "pyimago conformance",
            "impl": self.impl,
            "impl_name": self.impl_name,
            "generated": self.generated,
            "duration": round(self.duration, 3),
            "suite_duration": round(self.suite_duration, 3),
            "environment": dict(self.environment),
            "exit_code": self.exit_code,
            "summary": {
                "line": self.summary_line(),
                "totals": self.totals(),
                "by_strength": self.summary(),
                "failed_must": [c.id for c in self.failed_must],
            },
            "errors": list(self.errors),
            "load_error": self.load_error,
            "machines": self.machines.to_json() if self.machines is not None else None,
            "areas": [a.to_json() for a in self.areas],
        }

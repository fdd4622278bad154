"""The text renderings of a report: Markdown, JSON and JUnit XML."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import Final

from ._model import STATUSES, ClauseResult, Report, Status

__all__ = ["STATUS_LABEL", "STATUS_MARK", "render_json", "render_junit", "render_markdown"]

#: Short marks and labels per status, shared with the HTML renderer.
STATUS_MARK: Final[dict[Status, str]] = {
    "pass": "✔",
    "fail": "✘",
    "skip": "↷",
    "not-applicable": "∅",
    "untested": "?",
}
STATUS_LABEL: Final[dict[Status, str]] = {
    "pass": "pass",
    "fail": "FAIL",
    "skip": "skip",
    "not-applicable": "n/a",
    "untested": "untested",
}

# XML 1.0 forbids most control characters even as character references.
_XML_INVALID: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _n(count: int, singular: str, plural: str | None = None) -> str:
    """``1 clause``, ``2 clauses``."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def verdict(report: Report) -> str:
    """One sentence: did the implementation meet every ``must`` clause?"""
    if report.load_error is not None:
        return f"NOT RUN: {report.load_error}; no clause was tested."
    if report.errors:
        return f"ERROR: the run itself had {_n(len(report.errors), 'problem')}; see Errors."
    failed = report.failed_must
    if failed:
        return (f"FAIL: {_n(len(failed), 'must clause')} failed: "
                f"{', '.join(c.id for c in failed)}.")
    crosshair = report.environment.get("crosshair", "")
    caveat = f"; CrossHair {crosshair}" if crosshair.startswith("not installed") else ""
    others = [c for c in report.clauses if c.status == "fail"]
    if others:
        return (f"PASS: no must clause failed ({_n(len(others), 'should/may clause')} "
                f"failed{caveat}).")
    return f"PASS: no clause failed{f' ({caveat[2:]})' if caveat else ''}."


# -- JSON ----------------------------------------------------------------------------------------


def render_json(report: Report) -> str:
    """The report as JSON (layout: ``SCHEMA.md``)."""
    return json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"


# -- Markdown ------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip()}\n{fence}"


def _inline(text: str) -> str:
    text = " ".join(text.split())
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _counts(counts: dict[Status, int]) -> str:
    return ", ".join(f"{n} {STATUS_LABEL[s]}" for s, n in counts.items() if n) or "none"


def source_link(clause: ClauseResult) -> str:
    """Where the clause comes from, as a reader can open it: the source and its link (an
    ``issue:N`` source is a decision recorded on pyimago's tracker)."""
    if clause.url.startswith("https://"):
        return f"{clause.source} (<{clause.url}>)"
    if clause.url.startswith("issue:"):
        return f"{clause.source} (pyimago issue #{clause.url.removeprefix('issue:')})"
    return clause.source


def _markdown_failure(clause: ClauseResult) -> list[str]:
    lines = [
        f"#### {STATUS_MARK['fail']} `{clause.id}` ({clause.strength}): {clause.title}",
        "",
        f"- **Requirement:** {clause.requirement}",
        f"- **Source:** {source_link(clause)}",
    ]
    for ev in clause.failures:
        lines.append(f"- **Check:** `{ev.id}`")
        if ev.expected:
            lines.append(f"  - **Expected:** {_inline(ev.expected)}")
        lines.append(f"  - **Happened:** {_inline(ev.actual or ev.message)}")
        if ev.replay:
            for command in ev.replay.splitlines():
                lines.append(f"  - **Replay:** {_inline(command)}")
        if ev.details:
            lines += ["", "<details><summary>Details</summary>", "", _fence(ev.details), "",
                      "</details>", ""]
    lines.append("")
    return lines


def render_markdown(report: Report) -> str:
    """A Markdown report in the manner of h2spec: a summary, then clauses area by area."""
    out = [
        f"# pyimago conformance report: {report.impl_name}",
        "",
        f"**{verdict(report)}**",
        "",
        f"Summary: {report.summary_line()}",
        "",
        "| strength | " + " | ".join(STATUS_LABEL[s] for s in STATUSES) + " |",
        "|---|" + "---:|" * len(STATUSES),
    ]
    for strength, counts in report.summary().items():
        out.append(f"| {strength} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    totals = report.totals()
    out.append("| **total** | " + " | ".join(f"**{totals[s]}**" for s in STATUSES) + " |")
    out += ["", _run_line(report), ""]
    crosshair = report.environment.get("crosshair", "")
    if crosshair.startswith("not installed"):
        out += [f"**CrossHair {crosshair}**: their clauses are not counted as passed.", ""]
    if report.errors:
        out += ["## Errors", ""]
        for error in report.errors:
            out += [_fence(error), ""]
    for area in report.areas:
        out += [
            f"## {area.name}: {area.title}",
            "",
            f"{len(area.clauses)} clauses: {_counts(area.counts())}.",
            "",
            "| | clause | strength | title | note |",
            "|---|---|---|---|---|",
        ]
        for c in area.clauses:
            note = c.reason if c.status in ("skip", "not-applicable") else ""
            if c.status == "untested":
                note = "no check cites this clause"
            if c.status == "fail":
                note = f"{_n(len(c.failures), 'failing check')}, below"
            out.append(
                f"| {STATUS_MARK[c.status]} {STATUS_LABEL[c.status]} | `{c.id}` | {c.strength} | "
                f"{_cell(c.title)} | {_cell(note)} |"
            )
        out.append("")
        for c in area.clauses:
            if c.status == "fail":
                out += _markdown_failure(c)
    out += ["---", "", f"Summary: {report.summary_line()}", ""]
    return "\n".join(out)


def _run_line(report: Report) -> str:
    tests = len({e.id for c in report.clauses for e in c.evidence if e.kind == "test"})
    parts = [
        f"Implementation `{report.impl}`",
        f"generated {report.generated}",
        f"{tests} tests in {report.suite_duration:.1f} s",
    ]
    m = report.machines
    if m is not None:
        parts.append(
            f"machines: {m.outcome}, {m.max_examples} examples budget, {m.runs} runs, "
            f"{m.steps} steps (profile {m.profile}, {m.duration:.1f} s)"
        )
    else:
        parts.append("machines: not run")
    env = ", ".join(f"{k} {v}" for k, v in report.environment.items())
    return " · ".join(parts) + (f"  \nEnvironment: {env}" if env else "")


# -- JUnit XML -----------------------------------------------------------------------------------


def _x(text: str) -> str:
    return _XML_INVALID.sub("\ufffd", text)


def _failure_text(clause: ClauseResult) -> str:
    parts = [f"Requirement: {clause.requirement}"]
    for ev in clause.failures:
        parts.append(f"\nCheck: {ev.id}")
        if ev.expected:
            parts.append(f"Expected: {ev.expected}")
        parts.append(f"Happened: {ev.actual or ev.message}")
        if ev.replay:
            parts.append(f"Replay: {ev.replay}")
        if ev.details:
            parts.append(ev.details)
    return "\n".join(parts)


def render_junit(report: Report) -> str:
    """JUnit XML: one ``testsuite`` per area, one ``testcase`` per clause.

    Failed clauses carry a ``failure`` (its ``type`` is the strength), skipped, not-applicable
    and untested clauses a ``skipped`` whose message starts with the status; errors of the run
    itself are ``error`` test cases of a ``pyimago.errors`` suite.
    """
    totals = report.totals()
    root = ET.Element(
        "testsuites",
        name=_x(f"pyimago conformance ({report.impl})"),
        tests=str(len(report.clauses) + len(report.errors)),
        failures=str(totals["fail"]),
        errors=str(len(report.errors)),
        skipped=str(totals["skip"] + totals["not-applicable"] + totals["untested"]),
        time=f"{report.duration:.3f}",
        timestamp=report.generated,
    )
    for area in report.areas:
        counts = area.counts()
        suite = ET.SubElement(
            root,
            "testsuite",
            name=area.name,
            tests=str(len(area.clauses)),
            failures=str(counts["fail"]),
            errors="0",
            skipped=str(counts["skip"] + counts["not-applicable"] + counts["untested"]),
            time=f"{sum(e.duration for c in area.clauses for e in c.evidence):.3f}",
            timestamp=report.generated,
        )
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="title", value=_x(area.title))
        ET.SubElement(props, "property", name="impl", value=_x(report.impl))
        for c in area.clauses:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"pyimago.conformance.{area.name}",
                name=c.id,
                time=f"{sum(e.duration for e in c.evidence):.3f}",
            )
            cprops = ET.SubElement(case, "properties")
            ET.SubElement(cprops, "property", name="strength", value=c.strength)
            ET.SubElement(cprops, "property", name="status", value=c.status)
            ET.SubElement(cprops, "property", name="title", value=_x(c.title))
            for ev in c.evidence:
                ET.SubElement(cprops, "property", name="check", value=_x(f"{ev.id}: {ev.outcome}"))
            if c.status == "fail":
                first = c.failures[0]
                failure = ET.SubElement(
                    case,
                    "failure",
                    message=_x(f"[{c.strength}] {c.title}: {first.actual or first.message}"[:1000]),
                    type=c.strength,
                )
                failure.text = _x(_failure_text(c))
            elif c.status in ("skip", "not-applicable", "untested"):
                reason = c.reason
                if c.status == "untested":
                    reason = "no check cites this clause"
                ET.SubElement(case, "skipped", message=_x(f"{c.status}: {reason}".rstrip(": ")))
    if report.errors:
        suite = ET.SubElement(root, "testsuite", name="pyimago.errors",
                              tests=str(len(report.errors)), failures="0",
                              errors=str(len(report.errors)), skipped="0", time="0")
        for i, error in enumerate(report.errors, 1):
            case = ET.SubElement(suite, "testcase", classname="pyimago.conformance",
                                 name=f"run-error-{i}", time="0")
            err = ET.SubElement(case, "error", message=_x(error.splitlines()[0][:500]),
                                type="RunError")
            err.text = _x(error)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

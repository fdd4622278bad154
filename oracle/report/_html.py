"""The HTML rendering: one self-contained file (inline CSS, no scripts, no external assets).

Layout: a verdict and the summary table (strength x status) at the top, a table of contents
with each area's counts, then one section per area listing its clauses.  Every clause row
expands (``<details>``, no JavaScript) to its requirement, quote and checks; failed clauses
come expanded, with what was expected, what happened and the replay command.
"""

from __future__ import annotations

from html import escape
from typing import Final

from ._model import STATUSES, AreaResult, ClauseResult, Evidence, Report, Status
from ._render import STATUS_LABEL, STATUS_MARK, verdict

__all__ = ["render_html"]

_CSS: Final = """
:root { --pass: #1a7f37; --fail: #cf222e; --skip: #9a6700; --na: #6e7781; --untested: #8250df;
        --bg: #ffffff; --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --soft: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 72rem; padding: 1.5rem; }
h1 { font-size: 1.6rem; margin: 0 0 .5rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .25rem; padding-bottom: .25rem;
     border-bottom: 1px solid var(--line); }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
      padding: .6rem .8rem; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid var(--line); padding: .3rem .6rem; text-align: left;
         vertical-align: top; }
th { background: var(--soft); }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { font-size: 1.1rem; font-weight: 600; padding: .6rem .9rem; border-radius: 6px;
           border: 1px solid var(--line); }
.verdict.ok { color: var(--pass); background: #dafbe1; border-color: #aceebb; }
.verdict.bad { color: var(--fail); background: #ffebe9; border-color: #ffcecb; }
.muted { color: var(--muted); }
.badge { display: inline-block; min-width: 5.5rem; text-align: center; font-weight: 600;
         font-size: 12px; border-radius: 1rem; padding: 0 .5rem; color: #fff; }
.s-pass .badge, .badge.s-pass { background: var(--pass); }
.s-fail .badge, .badge.s-fail { background: var(--fail); }
.s-skip .badge, .badge.s-skip { background: var(--skip); }
.s-not-applicable .badge, .badge.s-not-applicable { background: var(--na); }
.s-untested .badge, .badge.s-untested { background: var(--untested); }
nav ul { columns: 2; padding-left: 1.2rem; }
details.clause { border: 1px solid var(--line); border-radius: 6px; margin: .3rem 0;
                 background: var(--bg); }
details.clause > summary { cursor: pointer; padding: .35rem .6rem; list-style-position: inside; }
details.clause[open] > summary { border-bottom: 1px solid var(--line); background: var(--soft); }
details.clause.s-fail { border-color: var(--fail); }
details.clause .body { padding: .4rem .9rem .6rem; }
.strength { font-size: 12px; font-weight: 600; text-transform: uppercase; color: var(--muted);
            margin: 0 .4rem; }
dl { display: grid; grid-template-columns: 8rem 1fr; gap: .2rem .8rem; margin: .4rem 0; }
dt { font-weight: 600; color: var(--muted); }
dd { margin: 0; min-width: 0; }
dd pre { margin: 0; }
.check { border-left: 3px solid var(--line); padding-left: .7rem; margin: .6rem 0; }
.check.o-failed { border-color: var(--fail); }
blockquote { margin: .3rem 0; padding-left: .8rem; border-left: 3px solid var(--line);
             color: var(--muted); }
footer { margin-top: 2rem; font-size: 13px; color: var(--muted); }
@media print { details.clause { break-inside: avoid; } }
"""


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _badge(status: Status) -> str:
    return (
        f'<span class="badge s-{_e(status)}">{_e(STATUS_MARK[status])} '
        f"{_e(STATUS_LABEL[status])}</span>"
    )


def _check(ev: Evidence) -> str:
    rows = [f"<dt>Check</dt><dd><code>{_e(ev.id)}</code> ({_e(ev.outcome)})</dd>"]
    if ev.outcome == "failed":
        if ev.expected:
            rows.append(f"<dt>Expected</dt><dd><pre>{_e(ev.expected)}</pre></dd>")
        rows.append(f"<dt>Happened</dt><dd><pre>{_e(ev.actual or ev.message)}</pre></dd>")
    elif ev.message:
        rows.append(f"<dt>Note</dt><dd>{_e(ev.message)}</dd>")
    if ev.replay and ev.outcome in ("failed", "skipped", "not-run"):
        rows.append(f"<dt>Replay</dt><dd><pre class=\"replay\">{_e(ev.replay)}</pre></dd>")
    out = f'<div class="check o-{_e(ev.outcome)}"><dl>{"".join(rows)}</dl>'
    if ev.details and ev.outcome == "failed":
        out += f"<details><summary>Details</summary><pre>{_e(ev.details)}</pre></details>"
    return out + "</div>"


def _clause(c: ClauseResult) -> str:
    open_attr = " open" if c.status == "fail" else ""
    note = ""
    if c.status in ("skip", "not-applicable") and c.reason:
        note = f' <span class="muted">({_e(c.reason)})</span>'
    rows = [f"<dt>Requirement</dt><dd>{_e(c.requirement)}</dd>",
            f"<dt>Source</dt><dd><blockquote>{_e(c.quote)}</blockquote>{_e(c.source)}"
            + (f' (<a href="{_e(c.url)}">{_e(c.url)}</a>)' if c.url.startswith("https://")
               else f" (pyimago issue #{_e(c.url.removeprefix('issue:'))})"
               if c.url.startswith("issue:") else f" ({_e(c.url)})")
            + "</dd>"]
    if c.divergence:
        rows.append(f"<dt>Divergence</dt><dd>{_e(c.divergence)}</dd>")
    if c.errata:
        rows.append(f"<dt>Errata</dt><dd>{_e(c.errata)}</dd>")
    checks = "".join(_check(ev) for ev in c.evidence) or (
        '<p class="muted">No check cites this clause.</p>'
    )
    return (
        f'<details class="clause s-{_e(c.status)}" id="clause-{_e(c.id)}"{open_attr}>'
        f"<summary>{_badge(c.status)}<span class=\"strength\">{_e(c.strength)}</span>"
        f"<code>{_e(c.id)}</code> {_e(c.title)}{note}</summary>"
        f'<div class="body"><dl>{"".join(rows)}</dl>{checks}</div></details>'
    )


def _counts(area: AreaResult) -> str:
    return ", ".join(f"{n} {STATUS_LABEL[s]}" for s, n in area.counts().items() if n)


def _area(area: AreaResult) -> str:
    counts = _counts(area)
    return (
        f'<section id="area-{_e(area.name)}"><h2>{_e(area.name)}: {_e(area.title)}</h2>'
        f'<p class="muted">{_e(area.description)} {len(area.clauses)} clauses: {_e(counts)}.</p>'
        + "".join(_clause(c) for c in area.clauses)
        + "</section>"
    )


def _summary_table(report: Report) -> str:
    head = "".join(f'<th class="s-{s}">{_badge(s)}</th>' for s in STATUSES)
    rows = []
    for strength, counts in report.summary().items():
        cells = "".join(f'<td class="n">{counts[s]}</td>' for s in STATUSES)
        rows.append(f"<tr><th>{_e(strength)}</th>{cells}</tr>")
    totals = report.totals()
    cells = "".join(f'<td class="n"><strong>{totals[s]}</strong></td>' for s in STATUSES)
    rows.append(f"<tr><th>total</th>{cells}</tr>")
    return (
        f'<table id="summary" class="summary"><thead><tr><th>strength</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page."""
    ok = report.exit_code == 0
    nav = "".join(
        f'<li><a href="#area-{_e(a.name)}">{_e(a.name)}</a> '
        f'<span class="muted">({_e(_counts(a))})</span></li>'
        for a in report.areas
    )
    errors = ""
    if report.errors:
        errors = '<section id="errors"><h2>Errors of the run</h2>' + "".join(
            f"<pre>{_e(err)}</pre>" for err in report.errors
        ) + "</section>"
    failed = [c for c in report.clauses if c.status == "fail"]
    failed_list = ""
    if failed:
        failed_list = (
            '<p><strong>Failed clauses:</strong> '
            + ", ".join(f'<a href="#clause-{_e(c.id)}"><code>{_e(c.id)}</code></a> '
                        f'<span class="muted">({_e(c.strength)})</span>' for c in failed)
            + "</p>"
        )
    m = report.machines
    machines = "not run"
    if m is not None:
        machines = (f"{m.outcome}, {m.max_examples} examples budget, {m.runs} runs, "
                    f"{m.steps} steps, profile {m.profile}, {m.duration:.1f} s")
    env = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in report.environment.items())
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>pyimago conformance: {_e(report.impl_name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>pyimago conformance report: <code>{_e(report.impl_name)}</code></h1>"
        f'<p class="verdict {"ok" if ok else "bad"}" id="verdict">{_e(verdict(report))}</p>'
        f'<p id="summary-line"><strong>Summary:</strong> {_e(report.summary_line())}</p>'
        f"{_summary_table(report)}{failed_list}"
        f'<p class="muted">Implementation <code>{_e(report.impl)}</code> · generated '
        f"{_e(report.generated)} · suite {report.suite_duration:.1f} s · machines: "
        f"{_e(machines)}</p></header>"
        f"<nav><h2>Areas</h2><ul>{nav}</ul></nav>{errors}"
        + "".join(_area(a) for a in report.areas)
        + f"<footer><dl>{env}</dl></footer></body></html>\n"
    )

"""The HTML report in a real headless browser (Debian's chromium).

Skipped, loudly, where no chromium is installed, except under ``CI=true``, where its absence
fails the test (the bootstrap installs it).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from pyimago.oracle.report import Report, render_html

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-extensions")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    reason = ("HTML REPORT NOT CHECKED IN A BROWSER: no chromium on PATH "
              "(install Debian's chromium package)")
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


def _run(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )


def test_html_report_renders_in_chromium(report: Report, tmp_path: Path) -> None:
    browser = _browser()
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    dumped = _run(browser, tmp_path, "--dump-dom", page.as_uri())
    dom = dumped.stdout
    assert dumped.returncode == 0 and "<html" in dom, dumped.stderr[-2000:]
    # The summary: the table and the line, as the browser parsed them.
    assert 'id="summary"' in dom and 'id="summary-line"' in dom
    assert report.summary_line() in dom
    assert "FAIL: 2 must clauses failed" in dom
    # A failed clause's details, expanded.
    start = dom.index('id="clause-access.fails"')
    tag_start = dom.rindex("<details", 0, start)
    tag = dom[tag_start : dom.index(">", start)]
    assert " open" in tag, f"the failed clause is not expanded: {tag}"
    details = dom[start : dom.index("</details>", dom.index("Happened", start))]
    for text in ("The requirement of access.fails.", "Expected", "512 bytes back", "Happened",
                 "Replay", "/suite/test_synthetic.py::test_fail"):
        assert text in details, text
    # The markup in a message stays text: the browser built no script element from it.
    assert "<script>" not in dom.split("<body", 1)[1]
    shot = tmp_path / "report.png"
    shown = _run(browser, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600",
                 page.as_uri())
    assert shot.is_file(), shown.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 1600) and len(png) > 2000, (width, height, len(png))

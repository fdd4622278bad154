"""Run the conformance suite (``pyimago.oracle.conformance``) with pytest in a subprocess.

A subprocess keeps the run independent of the caller's process (imports, Hypothesis
settings, the implementation's global state) and of the pytest configuration of the folder
it is started from: pytest gets an empty ini file of its own and the suite's folder as its
root.  The spec plugin writes the per-clause JSON (``--clause-report``) and this package's
plugin each test's outcome, message and traceback (``--conformance-results``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from pyimago.oracle.conformance import IMPL_ENV, LOAD_ERROR_ENV, PROGRESS_ENV

__all__ = ["SUITE_PACKAGE", "SuiteResult", "TestRecord", "replay_command", "run_suite"]

SUITE_PACKAGE: Final = "pyimago.oracle.conformance"

#: Output of pytest kept for the report when the run itself broke.
_TAIL: Final = 4000

#: Seconds between progress lines while the suite runs (while one test runs long: _QUIET_EVERY).
_PROGRESS_EVERY: Final = 5.0
_QUIET_EVERY: Final = 30.0


@dataclass(frozen=True, slots=True)
class TestRecord:
    """One conformance test's result, as the plugin recorded it."""

    nodeid: str
    path: str
    name: str
    clauses: tuple[str, ...]
    outcome: str
    message: str
    details: str
    duration: float


@dataclass(frozen=True, slots=True)
class SuiteResult:
    """Everything one run of the suite produced."""

    tests: dict[str, TestRecord]
    clause_tests: dict[str, tuple[str, ...]]
    """Clause ID -> the node IDs of the tests citing it (from the spec plugin)."""
    errors: tuple[str, ...]
    """Collection errors, bad citations, or why the run produced no results."""
    exitstatus: int
    duration: float
    load_error: str | None = None
    """Why the suite's process could not load the implementation (nothing ran then)."""


def suite_folder() -> Path:
    """The folder of the installed conformance suite."""
    return Path(str(resources.files(SUITE_PACKAGE)))


def replay_command(impl: str, record: TestRecord) -> str:
    """A shell command that runs one conformance test again against ``impl``."""
    target = f"{record.path}::{record.name}" if record.path else record.nodeid
    return f"{IMPL_ENV}={shlex.quote(impl)} python -m pytest -p no:cacheprovider " + shlex.quote(
        target
    )


def _run_with_progress(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float | None,
    progress: Callable[[str], None] | None,
    progress_file: Path,
) -> tuple[int | None, str]:
    """Run pytest; return its exit status (None: killed at ``timeout``) and its output.

    Every :data:`_PROGRESS_EVERY` seconds ``progress`` hears how many tests are done (the
    results plugin keeps the count in ``progress_file``): a long suite is not a silent one.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = last = time.monotonic()
    said = ""
    status: int | None = None
    try:
        while True:
            try:
                status = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if timeout is not None and now - started > timeout:
                proc.kill()
                proc.wait()
                break
            if progress is None or now - last < _PROGRESS_EVERY:
                continue
            try:
                text = progress_file.read_text(encoding="utf-8").strip()
                done, total, *running = text.split(maxsplit=2)
                so_far = f"{done} of {total} tests done"
                if running:
                    so_far += f", running {running[0].rsplit('/', 1)[-1]}"
            except (OSError, ValueError):
                so_far = "collecting the tests"
            # A line when something moved; while one test runs long, one every _QUIET_EVERY s.
            if so_far != said or now - last >= _QUIET_EVERY:
                said, last = so_far, now
                progress(f"conformance suite: {so_far} ({now - started:.0f} s)")
    finally:
        if proc.poll() is None:  # interrupted: leave no pytest behind
            proc.kill()
            proc.wait()

    reader.join(timeout=10)
    return status, "".join(lines)


def _python_path(first: tuple[str, ...], current: str) -> str:
    entries = [os.path.abspath(p) for p in first]
    entries += [os.path.abspath(p) for p in current.split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(entries))


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_suite(
    impl: str,
    workdir: Path,
    *,
    timeout: float | None = None,
    extra_args: tuple[str, ...] = (),
    import_paths: tuple[str, ...] = (),
    progress: Callable[[str], None] | None = None,
) -> SuiteResult:
    """Run the suite against ``impl`` (the ``$PYIMAGO_CONFORMANCE_IMPL`` value) in ``workdir``.

    ``import_paths``: folders the caller imported ``impl`` from (``--path``, its current
    folder); the subprocess gets them, and ``$PYTHONPATH`` made absolute, first on its path,
    so it resolves the module the caller resolved although it runs in ``workdir``.
    ``progress`` gets a line every few seconds while the suite runs (how far pytest is).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ini = workdir / "pytest.ini"
    ini.write_text("[pytest]\n", encoding="utf-8")
    clause_json = workdir / "clauses.json"
    results_json = workdir / "results.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        SUITE_PACKAGE,
        "-c",
        str(ini),
        "--rootdir",
        str(suite_folder()),
        "--import-mode=importlib",
        "-p",
        "pyimago.specs._pytest",
        "-p",
        "pyimago.oracle.report._plugin",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        "-p",
        "no:randomly",
        f"--clause-report={clause_json}",
        f"--conformance-results={results_json}",
        f"--basetemp={workdir / 'tmp'}",
        "-q",
        "--no-header",
        "-rN",
        *extra_args,
    ]
    env = dict(os.environ)
    env[IMPL_ENV] = impl
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONPATH"] = _python_path(import_paths, env.get("PYTHONPATH", ""))
    load_error_file = workdir / "load-error.txt"
    env[LOAD_ERROR_ENV] = str(load_error_file)
    started = time.monotonic()
    errors: list[str] = []
    progress_file = workdir / "progress.txt"
    env[PROGRESS_ENV] = str(progress_file)
    exitstatus, output = _run_with_progress(cmd, workdir, env, timeout, progress, progress_file)
    if exitstatus is None:
        exitstatus = -1
        errors.append(f"the conformance suite did not finish within {timeout} s")
    duration = time.monotonic() - started
    try:
        load_error: str | None = load_error_file.read_text(encoding="utf-8").strip()
    except OSError:
        load_error = None
    if load_error:
        return SuiteResult({}, {}, (), exitstatus, duration, load_error=load_error)

    clause_doc = _load(clause_json)
    results_doc = _load(results_json)
    if clause_doc is None or results_doc is None:
        errors.append(
            f"the conformance suite produced no results (pytest exit status {exitstatus}):\n"
            + output[-_TAIL:]
        )
    tests: dict[str, TestRecord] = {}
    for nodeid, raw in sorted(((results_doc or {}).get("tests") or {}).items()):
        tests[nodeid] = TestRecord(
            nodeid=nodeid,
            path=str(raw.get("path", "")),
            name=str(raw.get("name", nodeid)),
            clauses=tuple(str(c) for c in raw.get("clauses", ())),
            outcome=str(raw.get("outcome", "not-run")),
            message=str(raw.get("message", "")),
            details=str(raw.get("details", "")),
            duration=float(raw.get("duration", 0.0)),
        )
    for err in (results_doc or {}).get("collect_errors") or ():
        errors.append(f"cannot collect {err.get('nodeid') or 'the suite'}:\n{err.get('message')}")
    clause_tests: dict[str, tuple[str, ...]] = {}
    for cid, raw in ((clause_doc or {}).get("clauses") or {}).items():
        clause_tests[cid] = tuple(str(t) for t in raw.get("tests", ()))
    errors.extend(str(e) for e in (clause_doc or {}).get("citation_errors") or ())
    if exitstatus not in (0, 1) and not errors:
        errors.append(f"pytest exited with status {exitstatus}:\n{output[-_TAIL:]}")
    return SuiteResult(tests, clause_tests, tuple(errors), exitstatus, duration)

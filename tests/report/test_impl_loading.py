"""The suite's subprocess loads the implementation the command loaded (``--path``, a relative
``PYTHONPATH``), and one that does not load there is one error: clauses untested, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyimago.oracle.report import conformance_main

#: A raw-only implementation (the reference's raw), so the suite run is short: every
#: qcow2 test is not applicable to it.
RAW_ONLY = '''
from pyimago import reference
from pyimago.reference import UnsupportedError


def create_image(target, size, *, format="raw", **options):
    if format != "raw":
        raise UnsupportedError(f"format {format} not supported")
    reference.create_image(target, size, format="raw", **options)


def open_image(target, *, format=None, **options):
    if format not in (None, "raw"):
        raise UnsupportedError(f"format {format} not supported")
    return reference.open_image(target, format="raw", **options)
'''

#: Loads in the command's process, not in the suite's (which the runner marks by setting
#: the load-error variable): what a path the subprocess did not get looks like.
ONLY_IN_THE_PARENT = '''
import os
if os.environ.get("PYIMAGO_CONFORMANCE_LOAD_ERROR"):
    raise ImportError("pyimago_loading_flaky: only the parent can import me")
''' + RAW_ONLY


def _statuses(data: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["status"] for a in data["areas"] for c in a["clauses"]}


def test_relative_pythonpath_reaches_the_suite(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "pyimago_loading_rawonly.py").write_text(RAW_ONLY)
    env = {**os.environ, "PYTHONPATH": "lib"}
    proc = subprocess.run(
        [sys.executable, "-m", "pyimago", "conformance", "--impl", "pyimago_loading_rawonly",
         "--no-machines", "-q", "-o", "report.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["load_error"] is None and not data["errors"], data["errors"]
    statuses = _statuses(data)
    # Raw clauses ran and passed; qcow2 clauses are not applicable, never failed.
    assert statuses["raw.passthrough"] == "pass"
    qcow2 = [s for cid, s in statuses.items() if cid.startswith("qcow2.header")]
    assert qcow2 and set(qcow2) <= {"not-applicable", "untested"}, qcow2


def test_a_suite_that_cannot_load_the_impl_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers" / "pyimago_loading_flaky.py").write_text(ONLY_IN_THE_PARENT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "pyimago_loading_flaky", raising=False)
    rc = conformance_main(["--impl", "pyimago_loading_flaky", "--path", "drivers", "-q",
                           "--format", "json", "-o", "report.json"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only the parent can import me" in err, err
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["exit_code"] == 2 and "only the parent" in data["load_error"]
    assert len(data["errors"]) == 1
    assert set(_statuses(data).values()) == {"untested"}
    assert data["machines"] is None


def test_a_driver_target_runs_the_driver_machines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    rc = conformance_main(["--impl", "chunkmap:target", "--path", str(examples), "-q",
                           "--examples", "3", "--format", "json", "-o", "report.json",
                           "--failures-dir", str(tmp_path / "failures")])
    data = json.loads((tmp_path / "report.json").read_text())
    assert rc in (0, 1) and data["load_error"] is None
    machines = data["machines"]
    # Not "not-applicable" (chunkmap is neither qcow2 nor raw): the driver's own machines.
    assert machines["outcome"] == "passed", machines
    assert machines["runs"] >= 3 and machines["steps"] > 0
    assert machines["ops"].get("write", 0) > 0

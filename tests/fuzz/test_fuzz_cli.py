"""``pyimago fuzz module:target``: exit status, shrunk log, replay file, JUnit; and
``pyimago replay`` of what it wrote."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pyimago.oracle import cli

BROKEN_MODULE = '''
"""A chunkmap whose flush forgets the map: found by the first reopen."""
import dataclasses

import chunkmap


class Forgetful(chunkmap.ChunkMapDriver):
    def flush(self):
        self._storage.flush()


def open_forgetful(location, **kwargs):
    access = chunkmap.open_image(location, **kwargs)
    access.driver.__class__ = Forgetful
    return access


def target():
    return dataclasses.replace(chunkmap.target(), name="forgetful", open_image=open_forgetful)
'''


def _junit(path: Path) -> ET.Element:
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None
    return suite


def test_a_conforming_driver_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junit = tmp_path / "fuzz.xml"
    rc = cli.main(["fuzz", "chunkmap:target", "--profile", "ci", "--examples", "6",
                   "--steps", "8", "--no-progress", "--no-qemu", "--junit", str(junit),
                   "--failures-dir", str(tmp_path / "failures")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "chunkmap conforms (examples: 6;" in out
    assert "bytes compared" in out and "chain depths" in out
    suite = _junit(junit)
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
    case = suite.find("testcase")
    assert case is not None and case.get("name") == "chunkmap"
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["examples"] == "6" and "operations" in props
    assert not (tmp_path / "failures").exists()


@pytest.mark.clause("access.flush.no-sync", "access.close.flushes")
def test_a_broken_driver_exits_1_with_a_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "forgetful_chunkmap.py").write_text(BROKEN_MODULE)
    monkeypatch.chdir(tmp_path)
    junit = tmp_path / "fuzz.xml"
    rc = cli.main(["fuzz", "forgetful_chunkmap:target", "--profile", "ci", "--steps", "10",
                   "--no-progress", "--junit", str(junit)])
    captured = capsys.readouterr()
    assert rc == 1
    # The shrunk program (Hypothesis's) and the oracle's log, the replay file named.
    assert "state.build_chain(" in captured.err and "pyimago oracle log" in captured.err
    assert "forgetful FAILED" in captured.err and "pyimago replay" in captured.err
    # Once each, and none of the oracle's own frames above them.
    assert captured.err.count("pyimago oracle log") == 1
    assert captured.err.count("(run it again: pyimago replay") == 1
    assert "Traceback" not in captured.err and 'File "' not in captured.err
    assert "yes" in captured.out  # the failures row of the table
    suite = _junit(junit)
    assert suite.get("failures") == "1"
    failure = suite.find("testcase/failure")
    assert failure is not None and "OracleFailure" in (failure.get("type") or "")

    (replay,) = (tmp_path / ".pyimago-failures").iterdir()
    recorded = json.loads(replay.read_text())
    assert recorded["target"] == "forgetful_chunkmap:target"
    assert recorded["chain"]["layers"][-1]["format"] == "chunkmap"
    # pyimago replay finds the target by the name the file records...
    assert cli.main(["replay", str(replay), "--no-qemu"]) == 1
    assert "replay FAILED against forgetful" in capsys.readouterr().err
    # ...and the fixed driver passes the same sequence.
    assert cli.main(["replay", str(replay), "--target", "chunkmap:target", "--quiet"]) == 0
    assert "replay passed against chunkmap" in capsys.readouterr().out


def test_a_target_that_does_not_load_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fuzz", "no_such_module_here:target"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert cli.main(["fuzz", "chunkmap:MAGIC"]) == 2


def test_fuzz_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "fuzz" in capsys.readouterr().out
    assert cli.main(["fuzz", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--examples", "--seed", "--profile", "--junit"):
        assert option in text

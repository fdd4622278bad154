"""The pytest plugin (``pytest11`` entry point): fixture, marker, options, summary; and that it
leaves suites that do not use it alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

INI = """
[pytest]
addopts = --strict-markers -p no:cacheprovider
"""

USES_IT = """
import chunkmap
import pytest

def test_fixture(pyimago_conformance):
    stats = pyimago_conformance(chunkmap.target(), max_examples=4, steps=6, qemu_img=None)
    assert stats.examples >= 1 and stats.steps > 0
    print("EXAMPLES", stats.examples)

@pytest.mark.pyimago_target("chunkmap:target", max_examples=3, steps=5, qemu_img=None)
def test_marker():
    pass
"""

BROKEN = """
import dataclasses
import chunkmap
import pytest
from pyimago.reference import FormatAccess

class Forgetful(chunkmap.ChunkMapDriver):
    def flush(self):
        self._storage.flush()

def open_forgetful(location, **kwargs):
    access = chunkmap.open_image(location, **kwargs)
    access.driver.__class__ = Forgetful
    return access

@pytest.mark.pyimago_target(
    dataclasses.replace(chunkmap.target(), name="forgetful", open_image=open_forgetful),
    steps=10, qemu_img=None,
)
def test_broken():
    pass
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeini(INI)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    return pytester


def test_fixture_and_marker_run_the_conformance(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_driver=USES_IT)
    result = inner.runpytest("-s", "--pyimago-profile", "ci", "--pyimago-examples", "2")
    result.assert_outcomes(passed=2)
    # The command line wins over what the test asked for.
    result.stdout.fnmatch_lines(["EXAMPLES 2"])
    result.stdout.fnmatch_lines([
        "*pyimago conformance*",
        "test_driver.py::test_fixture",
        "*examples*2",
        "*operations*",
        "test_driver.py::test_marker",
    ])


def test_a_failing_driver_fails_its_test_with_the_log(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_broken=BROKEN)
    result = inner.runpytest("--pyimago-profile", "ci", "--pyimago-examples", "30")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "pyimago oracle log (target forgetful)" in out
    assert "replay file:" in out and "pyimago conformance of forgetful" in out
    assert list((inner.path / ".pyimago-failures").iterdir())
    # Once each in the failure's report (pytest's short summary, untruncated on CI, may
    # repeat it), and no frames of the oracle's, nor a chained exception, above them.
    report = out.split("short test summary info")[0]
    assert report.count("pyimago oracle log (target forgetful)") == 1
    assert report.count("(run it again: pyimago replay") == 1
    assert "During handling" not in report
    assert "pyimago/oracle/" not in out and "oracle/machines.py" not in out


def test_marker_needs_one_target(inner: pytest.Pytester) -> None:
    inner.makepyfile("""
        import pytest

        @pytest.mark.pyimago_target()
        def test_nothing():
            pass
    """)
    result = inner.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*takes one target*"])


def test_suites_that_do_not_use_it_are_left_alone(inner: pytest.Pytester) -> None:
    inner.makepyfile("""
        def test_plain():
            assert 1 + 1 == 2
    """)
    result = inner.runpytest()
    result.assert_outcomes(passed=1)
    assert "pyimago conformance" not in result.stdout.str()
    help_text = inner.runpytest("--help").stdout.str()
    assert "--pyimago-profile" in help_text and "--pyimago-examples" in help_text


def test_loading_the_plugin_imports_nothing_heavy() -> None:
    code = (
        "import sys, pyimago.oracle.pytest_plugin\n"
        "heavy = [m for m in ('hypothesis', 'pyimago.oracle.machines', 'pyimago.reference',"
        " 'rich') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_entry_point_is_declared() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("pyimago") == "pyimago.oracle.pytest_plugin"
    assert Path(sys.executable).exists()

"""Set-up of the report tests: the synthetic result set (``_synthetic.py``) and fixtures.

``tests/`` is not a package, so ``_synthetic.py`` is loaded by path and registered as
``pyimago_tests_report_synthetic`` before the test modules import it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_NAME = "pyimago_tests_report_synthetic"

if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("_synthetic.py"))
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)

from pyimago.oracle.report import Report  # noqa: E402
from pyimago_tests_report_synthetic import make_report  # noqa: E402


@pytest.fixture
def report() -> Report:
    """The synthetic report: one clause of every status, a failing machine run."""
    return make_report()

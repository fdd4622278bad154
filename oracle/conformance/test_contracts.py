"""CrossHair contracts on pyimago's own pure helpers (reference and fast).

These check pyimago's implementations themselves, so they apply only when the
implementation under test is ``reference`` or ``fast``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from pyimago.oracle.conformance._crosshair import CLAUSES
from pyimago.oracle.conformance._crosshair_run import (
    CONTRACT_MODULES,
    CROSSHAIR_MISSING,
    HARNESS_MODULE,
    run_crosshair,
)
from pyimago.oracle.conformance._impl import Impl
from pyimago.oracle.conformance._support import not_applicable

#: Seconds CrossHair may spend on each condition (override: PYIMAGO_CROSSHAIR_BUDGET).
PER_CONDITION = float(os.environ.get("PYIMAGO_CROSSHAIR_BUDGET", "4"))


def _require_applicable(impl: Impl) -> None:
    if impl.spec not in ("reference", "fast"):
        not_applicable("CrossHair contracts cover pyimago's own helpers only")
    if importlib.util.find_spec("crosshair") is None:
        # Not "not applicable": the check applies and did not run, so its clauses must not
        # read as met (the report's header counts these skips).
        pytest.skip(CROSSHAIR_MISSING)


@pytest.mark.clause(*sorted({c for cs in CONTRACT_MODULES.values() for c in cs}))
def test_pep316_contracts_hold(impl: Impl) -> None:
    """The PEP 316 contracts of the reference's address math and refcount packing."""
    _require_applicable(impl)
    result = run_crosshair("PEP316", list(CONTRACT_MODULES), per_condition=PER_CONDITION,
                           timeout=300)
    assert result.returncode == 0, f"CrossHair found:\n{result.output}"


@pytest.mark.clause(*sorted({c for cs in CLAUSES.values() for c in cs}))
def test_reference_and_fast_helpers_agree(impl: Impl) -> None:
    """Bounded assert harnesses: reference and fast pure helpers compute the same."""
    _require_applicable(impl)
    result = run_crosshair("asserts", [HARNESS_MODULE], per_condition=PER_CONDITION,
                           timeout=300)
    assert result.returncode == 0, f"CrossHair found:\n{result.output}"

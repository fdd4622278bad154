"""Project-wide pytest set-up: the spec-clause plugin, the Hypothesis profiles and the order
the long tests start in."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# Clause citations (@pytest.mark.clause) are checked against specs/ by this plugin, which
# also writes the per-clause report (--clause-report=FILE).
pytest_plugins = ["pyimago.specs._pytest"]

# Shared helper modules, registered under private names once, here (``tests/`` is not a
# package: pytest runs with ``--import-mode=importlib``), and imported by those names:
# QEMU's damaged-image cases (for the reference, fast and interop tests), the qemu-img /
# qemu-io helpers (for every folder that talks to QEMU), the QEMU-made image corpus, the
# fast-against-reference differential, the reference driver's mutants (oracle and fuzz
# tests), the reference tests' helpers and the interop tests' mapping comparison.
_SHARED = (
    ("pyimago_tests_damaged", "fixtures/damaged.py"),
    ("pyimago_tests_qemu", "fixtures/qemu.py"),
    ("pyimago_tests_make_qemu_images", "fixtures/make_qemu_images.py"),
    ("pyimago_tests_differential", "fixtures/differential.py"),
    ("pyimago_tests_reference_mutants", "fuzz/mutants/_reference.py"),
    ("pyimago_tests_reference_helpers", "reference/_helpers.py"),
    ("pyimago_tests_interop_mapcheck", "interop/_mapcheck.py"),
)
for _name, _file in _SHARED:
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(_name, Path(__file__).parent / _file)
        assert _spec is not None and _spec.loader is not None
        _module = importlib.util.module_from_spec(_spec)
        # (dataclasses look their module up in sys.modules while a class body runs)
        sys.modules[_name] = _module
        _spec.loader.exec_module(_module)

if importlib.util.find_spec("pyimago.oracle.profiles"):
    from pyimago.oracle.profiles import load_profile_from_env, register_profiles

    register_profiles()
    load_profile_from_env()


#: The cost of a test marked plain ``@pytest.mark.slow`` (see ``schedule_cost``).
DEFAULT_SLOW_COST = 10.0


def schedule_cost(item: pytest.Item) -> float:
    """How long ``item`` runs, roughly, in seconds on an idle machine: the largest ``cost``
    of its ``slow`` markers (a parametrized test's function and parameter may both have one;
    ``DEFAULT_SLOW_COST`` without a cost), 0 for a test not marked slow."""
    costs = [float(m.kwargs.get("cost", DEFAULT_SLOW_COST)) for m in item.iter_markers("slow")]
    return max(costs, default=0.0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first, longest first; the rest after them in collection order.

    Under pytest-xdist (``scripts/test`` hands tests out one at a time) a long test started
    last keeps one core busy for minutes while the other has nothing left to run; started
    first, the short tests fill the gaps.  (The sort is stable, and every worker sorts the
    same collection the same way, as xdist requires.)"""
    items.sort(key=schedule_cost, reverse=True)

"""The derandomised ``ci`` stream depends on neither test order nor target (issue 9, item 6).

Hypothesis mixes the literals of every local module imported so far into its integer draws;
``pin_local_constants`` fixes that pool, so the chains drawn after a new module was imported
are the ones drawn before (the machines draw through the same provider).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from pyimago.oracle._constants import pinned_constants
from pyimago.oracle.profiles import register_profiles
from pyimago.oracle.strategies import chain_specs


def _ci_run() -> list[object]:
    """The chains (and their build ops) the ci profile draws, derandomised."""
    register_profiles()
    drawn: list[object] = []

    @settings(settings.get_profile("ci"), max_examples=150, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(chain_specs())
    def probe(chain: object) -> None:
        drawn.append(chain)

    probe()
    return drawn


def _import_new_local_module(folder: Path, name: str) -> None:
    # Literals Hypothesis would add to its pool: values at every scale the chain strategies
    # draw from (sizes, offsets, lengths, counts), each permitted by some of their ranges.
    literals = ", ".join(str(int(100 * 1.09**k)) for k in range(90))
    (folder / f"{name}.py").write_text(f"VALUES = ({literals})\n")
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def test_ci_stream_ignores_modules_imported_in_between(tmp_path: Path) -> None:
    first = _ci_run()
    name = "pyimago_order_probe_" + tmp_path.name.replace("-", "_")
    folder = tmp_path / "src"
    folder.mkdir()
    _import_new_local_module(folder, name)
    try:
        assert _ci_run() == first
    finally:
        sys.modules.pop(name, None)


def test_pinned_pool_holds_pyimago_literals() -> None:
    pool = pinned_constants()
    # qcow2's L2 entry offset mask and the 64 KiB default cluster size, from pyimago's source.
    assert 65536 in pool.integers
    assert 0x00FFFFFFFFFFFE00 in pool.integers


@pytest.mark.parametrize("profile", ["ci"])
def test_register_profiles_pins_the_pool(profile: str) -> None:
    from hypothesis.internal.conjecture import providers

    register_profiles()
    assert providers._get_local_constants() is pinned_constants()
    assert settings.get_profile(profile).derandomize

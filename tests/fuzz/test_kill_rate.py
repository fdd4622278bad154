"""The oracle's kill rate: every deliberately broken driver must fail the conformance run.

Each mutant (``mutants/``) runs through ``run_driver_conformance`` with the ``ci`` budget
(100 examples of up to 30 steps, derandomised), without shrinking: only "is it caught" and
"how fast" matter here.  Issue 9's unseen batch (``mutants/_paths.py``, ``mutants/_fast.py``)
runs as the machines run the reference and pyimago.fast: their default chains, power cuts
checked.  The conftest prints the fraction caught and the median time to
catch at the end of the run.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import chunkmap
import pytest
from hypothesis import Phase, settings
from pyimago.oracle import DriverTarget, run_driver_conformance
from pyimago.oracle.profiles import CI_MAX_EXAMPLES, CI_STEP_COUNT, register_profiles
from pyimago.reference import create_image, open_image
from pyimago_tests_fuzz_mutants import EQUIVALENT, GAPS, MUTANTS
from pyimago_tests_fuzz_mutants._fast import SMALL_PARALLEL_PIECES

#: The user property each mutant test records: ``(name, caught, seconds, examples)``.
KILL_PROPERTY = "pyimago_kill"


def _ci_settings() -> settings:
    register_profiles()
    ci = settings.get_profile("ci")
    assert (ci.max_examples, ci.stateful_step_count) == (CI_MAX_EXAMPLES, CI_STEP_COUNT)
    return settings(ci, phases=(Phase.explicit, Phase.generate))


@pytest.fixture
def pinned_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypothesis mixes literals found in every local module imported so far into a few of
    its draws, so a derandomised run also depends on which tests ran earlier in the same
    process (xdist hands them out as it likes).  Pin that pool, to nothing, for the
    verdicts here: they must depend on the code under test alone."""
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
    except ImportError:  # pragma: no cover - another Hypothesis: nothing to pin
        return
    if hasattr(providers, "_get_local_constants") and hasattr(providers, "CONSTANTS_CACHE"):
        monkeypatch.setattr(providers, "_get_local_constants", Constants)
        monkeypatch.setattr(providers, "CONSTANTS_CACHE", type(providers.CONSTANTS_CACHE)(1024))


#: Rough seconds (idle) of the mutants that take longest to catch; the rest cost the
#: default of test_oracle_catches_mutant's ``slow`` mark.  Only the start order depends on it.
LONG_TO_CATCH = {"ref-prealloc-reused-not-zeroed": 35, "ref-grown-l1-drops-last-entry": 30,
                 "ref-l1-grown-pointer-first": 30}


def _param(name: str) -> Any:
    marks = [pytest.mark.clause(*MUTANTS[name].clauses)]
    if name in LONG_TO_CATCH:
        marks.append(pytest.mark.slow(cost=LONG_TO_CATCH[name]))
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_overrides_exist(name: str) -> None:
    # A renamed method of the original would leave the mutant harmless: say so directly.
    mutant = MUTANTS[name]
    assert mutant.base is not None and mutant.mutant is not None
    for attr, value in vars(mutant.mutant).items():
        if callable(value) and not attr.startswith("__") and attr not in ("_shift", "_mutate"):
            assert hasattr(mutant.base, attr), f"{name}: {mutant.base.__name__} has no {attr}"


@pytest.mark.parametrize("name", [*EQUIVALENT, *GAPS])
def test_recorded_mutants_override_real_methods(name: str) -> None:
    # The unseen batch's equivalent mutants and open gaps are kept for the record (not run):
    # each still overrides what its base has, and says why it is where it is.
    mutant, why = {**EQUIVALENT, **GAPS}[name]
    base = mutant.__mro__[1]
    for attr, value in vars(mutant).items():
        if callable(value) and not attr.startswith("__") and attr != "_mutate":
            assert hasattr(base, attr), f"{name}: {base.__name__} has no {attr}"
    assert why and name not in MUTANTS


def test_there_are_enough_mutants() -> None:
    assert len(MUTANTS) >= 15
    kinds = {f"{m.base.__module__}.{m.base.__name__}" for m in MUTANTS.values()
             if m.base is not None}
    # Both implementations (issue 9): the reference's driver and FormatAccess, fast's qcow2
    # layer and FormatAccess, and a third party's driver.
    assert {k.rsplit(".", 1)[-1] for k in kinds} == {
        "Qcow2Driver", "FormatAccess", "ChunkMapDriver", "Qcow2Layer"}
    assert any(k.startswith("pyimago.fast.") and k.endswith(".FormatAccess") for k in kinds)


def _originals() -> dict[str, DriverTarget]:
    return {
        "reference-qcow2": DriverTarget("reference-qcow2", "qcow2", create_image, open_image),
        "chunkmap": chunkmap.target(),
    }


@pytest.mark.slow(cost=20)
@pytest.mark.parametrize("name", list(_originals()))
@pytest.mark.usefixtures("pinned_constants")
def test_the_originals_pass(name: str) -> None:
    # The control: what the mutants were made from passes the same run, so a mutant's
    # failure is its bug, not the oracle's.
    stats = run_driver_conformance(_originals()[name], settings=_ci_settings(), failures_dir=None)
    assert stats.failures == 0 and stats.examples >= CI_MAX_EXAMPLES
    print(stats)


@pytest.mark.slow(cost=5)
@pytest.mark.parametrize("name", [_param(n) for n in MUTANTS])
@pytest.mark.usefixtures("pinned_constants")
def test_oracle_catches_mutant(
    name: str, record_property: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    mutant = MUTANTS[name]
    if mutant.qemu and shutil.which("qemu-img") is None:
        pytest.skip("only qemu-img check sees this bug, and qemu-img is not installed")
    if mutant.base is not None and mutant.base.__module__.startswith("pyimago.fast"):
        import pyimago.fast._access as fast_access

        for knob, value in SMALL_PARALLEL_PIECES.items():
            monkeypatch.setattr(fast_access, knob, value)
    progress: list[Any] = []
    start = time.monotonic()
    error: BaseException | None = None
    try:
        run_driver_conformance(
            mutant.target(),
            settings=_ci_settings(),
            failures_dir=None,
            progress=lambda stats: progress.__setitem__(slice(None), [stats]),
        )
    except Exception as exc:
        error = exc
    elapsed = time.monotonic() - start
    stats = progress[-1] if progress else None
    examples = stats.examples if stats is not None else 0
    record_property(KILL_PROPERTY, (name, error is not None, elapsed, examples))
    assert error is not None, f"mutant {name} survived: {stats}"
    # Caught by the oracle, not by a mutant broken by a renamed attribute.
    assert not isinstance(error, (AttributeError, NameError, TypeError)), repr(error)
    first = str(error).splitlines()[0] if str(error) else ""
    print(f"{name}: caught after {examples} examples, {elapsed:.1f} s: "
          f"{type(error).__name__}: {first[:160]}")

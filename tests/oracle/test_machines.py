"""The state machines run green against the reference, on every kind of chain.

One test per family of chains, so each family gets its share of the budget (and xdist can
spread them); the budget comes from the loaded Hypothesis profile (``ci`` in CI).
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from pyimago.oracle.machines import make_machine
from pyimago.oracle.ops import ChainSpec
from pyimago.oracle.profiles import oracle_settings
from pyimago.oracle.session import RunStats
from pyimago.oracle.strategies import chain_specs
from pyimago.oracle.targets import reference_target

SMALL = (512, 1024, 2048, 4096)

FAMILIES: dict[str, tuple[st.SearchStrategy[ChainSpec], tuple[str, ...]]] = {
    "qcow2-v3-memory": (
        chain_specs(storages=("memory",), base_formats=("qcow2",), compats=("1.1",),
                    cluster_sizes=SMALL),
        ("access.cow.partial-cluster", "access.write-zeroes.no-free", "qcow2.zero.flag",
         "access.mapping.explicit-top-only", "access.mapping.tiling",
         "storage.memory.survives-reopen"),
    ),
    "qcow2-v2-memory": (
        chain_specs(storages=("memory",), base_formats=("qcow2",), compats=("0.10",),
                    cluster_sizes=SMALL),
        ("qcow2.zero.v2-none", "access.discard-to-zero.reads-zero",
         "access.discard-to-backing.visible"),
    ),
    "raw-base-memory": (
        chain_specs(storages=("memory",), base_formats=("raw",)),
        ("raw.passthrough", "raw.no-backing", "raw.resize", "backing.shorter", "backing.longer"),
    ),
    "large-clusters-memory": (
        chain_specs(storages=("memory",), depths=(1, 2), cluster_sizes=(65536, 2 << 20)),
        ("access.read.past-end-zero", "access.write.past-end", "access.resize.grow-zero"),
    ),
    "files-qemu-checked": (
        chain_specs(storages=("file",)),
        ("interop.qemu-check", "interop.qemu-read", "access.close.flushes"),
    ),
    "everything": (
        chain_specs(),
        ("access.resize.shrink-discards", "access.resize.grow-none",
         "access.discard-to-any.unspecified", "access.parallel.same-result",
         "access.mapping.eof-top-only"),
    ),
}


#: Rough seconds each family takes in ci on an idle machine: the longest start first
#: (tests/conftest.py), so none is left running alone at the end of a parallel run.
COSTS = {"large-clusters-memory": 60, "files-qemu-checked": 40, "everything": 30,
         "qcow2-v3-memory": 25, "raw-base-memory": 20, "qcow2-v2-memory": 15}


def _param(name: str) -> Any:
    return pytest.param(name, id=name, marks=(pytest.mark.clause(*FAMILIES[name][1]),
                                              pytest.mark.slow(cost=COSTS[name])))


@pytest.mark.parametrize("family", [_param(name) for name in FAMILIES])
def test_reference_passes_the_machine(family: str, tmp_path: Any) -> None:
    if family == "files-qemu-checked" and shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed: file chains run without the QEMU checks")
    chains, _ = FAMILIES[family]
    stats = RunStats()
    machine = make_machine(
        reference_target(), chains=chains, stats=stats, failures_dir=str(tmp_path)
    )
    run_state_machine_as_test(machine, settings=oracle_settings())
    assert stats.examples > 0 and stats.steps > 0
    if family == "everything":
        # Diversity (issue 9): at least 80 % of the examples build a chain of their own.
        assert len(stats.chains) >= 0.8 * stats.examples, (
            f"{len(stats.chains)} distinct chains in {stats.examples} examples"
        )
    print(f"{family}: {stats.examples} examples, {stats.steps} steps, "
          f"{len(stats.chains)} distinct chains, {stats.crash_states} cut states checked")


def test_machine_is_a_test_case_factory() -> None:
    machine = make_machine(reference_target())
    assert machine.__qualname__ == "OracleMachine[reference]"
    assert hasattr(machine, "TestCase")


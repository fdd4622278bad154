"""Burst rules: many basic operations per step, drawn as one integer each, checked as they run."""

from __future__ import annotations

import glob
from typing import Any

import pytest
from hypothesis import Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from pyimago.fast import FormatAccess, create_image, open_image
from pyimago.oracle._burst import BURST_KINDS, BURST_MIXES, burst_choices, decode_burst
from pyimago.oracle.machines import make_machine
from pyimago.oracle.ops import OpKind
from pyimago.oracle.profiles import oracle_settings
from pyimago.oracle.replay import load_replay, run_replay
from pyimago.oracle.session import RunStats
from pyimago.oracle.strategies import Geometry, chain_specs
from pyimago.oracle.targets import ImplementationTarget, module_target

pytestmark = pytest.mark.clause("access.read.no-short", "access.write.no-short")

_READS = {OpKind.READ, OpKind.READINTO, OpKind.READV, OpKind.GET_MAPPING}


@st.composite
def _geometries(draw: st.DrawFn) -> Geometry:
    g = draw(st.sampled_from((512, 1024, 4096, 65536)))
    size = draw(st.integers(1, 64)) * 512
    hot = tuple(draw(st.lists(st.integers(0, size - 1), max_size=4)))
    return Geometry(size, g, 4 * size, hot)


@given(geo=_geometries(), raw=burst_choices(len(BURST_KINDS)), near=st.booleans())
def test_decoded_operations_are_valid_requests(geo: Geometry, raw: Any, near: bool) -> None:
    ops = decode_burst(raw, geo, BURST_KINDS, near=near)
    assert len(ops) == sum(map(len, raw))
    for op in ops:
        assert op.kind in BURST_KINDS
        if op.kind is OpKind.GET_MAPPING:
            assert 0 <= op.offset <= geo.size + geo.granularity and op.length > 0
            continue
        assert op.length > 0 and op.offset >= 0
        if op.kind not in _READS:
            # Modifying requests stay inside the disk (past-end requests have their own rule).
            assert op.offset + op.length <= geo.size
        if op.kind in (OpKind.READV, OpKind.WRITEV):
            assert sum(op.buffers) == op.length and min(op.buffers) > 0


def test_the_simplest_choice_is_a_one_byte_read_at_zero() -> None:
    # What the shrinker drives every choice to.
    (op,) = decode_burst([[0]], Geometry(4096, 512, 4096))
    assert (op.kind, op.offset, op.length) == (OpKind.READ, 0, 1)


def test_bursts_are_opt_in() -> None:
    plain = make_machine(module_target("pyimago.fast"), qemu_img=None)
    bursty = make_machine(module_target("pyimago.fast"), qemu_img=None, bursts=True)
    assert not any(hasattr(plain, name) for name in BURST_MIXES)
    assert all(hasattr(bursty, name) for name in BURST_MIXES)


def test_fast_passes_the_machine_with_bursts() -> None:
    stats = RunStats()
    machine = make_machine(module_target("pyimago.fast"), stats=stats, failures_dir=None,
                           qemu_img=None, bursts=True,
                           chains=chain_specs(storages=("memory",)))
    run_state_machine_as_test(seed(3)(machine), settings=oracle_settings(
        max_examples=12, stateful_step_count=12, database=None))
    assert stats.examples >= 12
    # Far more operations than steps: the bursts ran (and every one was checked).
    assert stats.steps > 4 * stats.examples * 12 // 3
    assert stats.ops["readv"] and stats.ops["writev"] and stats.ops["discard_to_any"]


class _ReadvOddOffset(FormatAccess):
    """readv advances by each buffer's size rounded down to even (pyimago.fast's access:
    shrinking replays the failing example hundreds of times)."""

    def readv(self, buffers: Any, offset: int) -> None:
        for buf in buffers:
            view = memoryview(buf).cast("B")
            self.readinto(view, offset)
            offset += len(view) & ~1


def _open_mutant(location: Any, **kwargs: Any) -> FormatAccess:
    access = open_image(location, **kwargs)
    if type(access) is FormatAccess:
        access.__class__ = _ReadvOddOffset
    return access


@pytest.mark.slow(cost=40)
def test_a_failing_burst_shrinks_and_replays(tmp_path: Any) -> None:
    target = ImplementationTarget(name="mutant:readv-odd-offset", open_image=_open_mutant,
                                  create_image=create_image, l2_cache_option=True)
    machine = make_machine(target, failures_dir=str(tmp_path), qemu_img=None, bursts=True,
                           chains=chain_specs(storages=("memory",), depths=(1, 1),
                                              cluster_sizes=(512, 1024), compress=False))
    run_settings = oracle_settings(max_examples=100, stateful_step_count=4, database=None,
                                   phases=(Phase.generate, Phase.shrink))
    with pytest.raises(AssertionError):
        run_state_machine_as_test(seed(5)(settings(run_settings)(machine)),
                                  settings=run_settings)
    (path,) = glob.glob(str(tmp_path / "*.json"))
    replay = load_replay(path)
    # Shrunk to a short plain sequence of operations, which fails again as a regression.
    assert 0 < len(replay.ops) <= 4
    assert any(op.kind is OpKind.READV for op in replay.ops)
    assert run_replay(replay, target, qemu_img=None).failed

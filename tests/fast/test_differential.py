"""pyimago.fast under the oracle's state machine (the same one that checks the reference).

The machine builds backing chains, runs every oracle operation (reopen and sweeps included)
against the implementation and a flat model, and compares bytes, sizes, mapping kinds and
error classes after each step.  A second, small Hypothesis test runs the same random
requests against fast and reference side by side on in-memory images.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from pyimago import fast, reference
from pyimago.oracle.machines import make_machine
from pyimago.oracle.profiles import CI_MAX_EXAMPLES, CI_STEP_COUNT
from pyimago.oracle.session import RunStats
from pyimago.oracle.targets import module_target
from pyimago_tests_differential import assert_same_results, requests


@pytest.mark.clause(
    "access.read.no-short",
    "access.write.past-end",
    "access.mapping.tiling",
    "access.cow.partial-cluster",
    "access.write-zeroes.soft",
    "access.discard-to-backing.visible",
)
def test_oracle_machine_accepts_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # fast splits only reads of 128 KiB and writes of 16 MiB into parallel jobs, of 64 KiB
    # at least: the machine's disks (a few MiB at most) would never run a write as two jobs.
    # Smaller pieces here, so that the thread pool and the job splitting are exercised
    # (issue 9: "exercised with at least two jobs"); the globals are read at each call.
    monkeypatch.setattr(fast._access, "_PARALLEL_MIN", 8 << 10)
    monkeypatch.setattr(fast._access, "_PARALLEL_WRITE_MIN", 8 << 10)
    monkeypatch.setattr(fast._access, "_CHUNK_MIN", 4 << 10)
    stats = RunStats()
    machine = make_machine(
        module_target(fast, name="fast"), stats=stats, failures_dir=None, qemu_img="auto"
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            settings.get_profile("ci"),
            max_examples=CI_MAX_EXAMPLES,
            stateful_step_count=CI_STEP_COUNT,
            phases=(Phase.explicit, Phase.generate, Phase.shrink),
            report_multiple_bugs=False,
        ),
    )
    assert stats.examples > 0 and stats.steps > 0
    print(f"fast: {stats.examples} examples, {stats.steps} steps, ops {dict(stats.ops)}")


_CS = 4096
_SIZE = 16 * _CS + 1024

_op = requests(_SIZE, 3 * _CS)


@pytest.mark.clause(
    "access.mapping.tiling", "access.write-zeroes.no-free", "access.resize.grow-zero"
)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(_op, max_size=14),
    compat=st.sampled_from(["1.1", "0.10"]),
    backing=st.sampled_from(["none", "full", "half"]),
)
def test_fast_matches_reference(
    ops: list[tuple[str, int, int, int]], compat: str, backing: str
) -> None:
    """Same requests, same bytes, same mapping kind at every sector.  The "half" backing is
    shorter than the overlay and holds data only in its first half, so that zeroing the
    overlay's partial clusters meets backing zeroes (unallocated and past its end) too."""
    images = []
    for mod in (reference, fast):
        below = None
        if backing != "none":
            bstore = reference.MemoryStorage()
            bsize = _SIZE - 1024 if backing == "full" else _SIZE // 2
            mod.create_image(bstore, bsize, cluster_size=_CS, compat=compat)
            with mod.open_image(bstore, writable=True, backing=None) as b:
                b.write(b"\xbb" * (bsize if backing == "full" else 5 * _CS + 512), 0)
            below = mod.open_image(bstore, backing=None)
        store = reference.MemoryStorage()
        mod.create_image(store, _SIZE, cluster_size=_CS, compat=compat)
        images.append(mod.open_image(store, writable=True, backing=below))
    assert_same_results(*images, ops, read_past_end=100)


@pytest.mark.clause("access.parallel.same-result", "qcow2.data-file.write")
@pytest.mark.parametrize("preallocation", ["off", "metadata"])
def test_parallel_write_reaches_the_external_data_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, preallocation: str
) -> None:
    # Found by test_oracle_machine_accepts_fast once its pieces were made small (two jobs and
    # more): a write split into parallel jobs wrote its data into the qcow2 file at the data
    # file's offsets, so an image with an external data file read zeroes back.  Fixed: the
    # jobs write to the layer's data storage.
    monkeypatch.setattr(fast._access, "_PARALLEL_WRITE_MIN", 8 << 10)
    monkeypatch.setattr(fast._access, "_CHUNK_MIN", 4 << 10)
    monkeypatch.chdir(tmp_path)
    fast.create_image("a.qcow2", 8192, cluster_size=2048, preallocation=preallocation,
                      data_file="a.data")
    data = bytes(range(256)) * 32
    with fast.open_image("a.qcow2", writable=True) as img:
        img.set_write_parallelization(2)
        img.write(data, 0)
        assert img.read(0, 8192) == data
    assert (tmp_path / "a.data").read_bytes()[:8192] == data

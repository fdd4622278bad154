"""The oracle catches bugs: deliberately broken variants of the reference must fail the machine.

Each mutant subclasses the reference's qcow2 driver and overrides one small piece; a target
opens images with the reference and swaps the class of every qcow2 driver in the chain.  The
machine runs with the ``ci`` budget (no shrinking: only "is it caught" matters here) and
must fail.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from pyimago.oracle.crash import crash_clauses
from pyimago.oracle.machines import make_machine
from pyimago.oracle.profiles import (
    CI_MAX_EXAMPLES,
    CI_STEP_COUNT,
    oracle_settings,
    register_profiles,
)
from pyimago.oracle.session import RunStats
from pyimago.oracle.targets import ImplementationTarget
from pyimago.reference import (
    FormatAccess,
    InvalidRequestError,
    Qcow2Driver,
    create_image,
    open_image,
)
from pyimago.reference.qcow2.refcounts import RefcountTable, set_block_entry
from pyimago_tests_reference_mutants import (
    EntryBeforeData,
    L2BoundaryOffByOne,
    LoseDirtyL2OnEviction,
    LowerExplicitZero,
    NoCopyOnWrite,
    RegrowKeepsOldTail,
    StaleDiscardToBacking,
)

# -- the mutants ----------------------------------------------------------------------------
# (those the driver fuzzer's kill rate uses too live in tests/fuzz/mutants/_reference.py)


class _MsbFirstRefcounts(RefcountTable):
    """Sub-byte refcounts packed from the most significant bit (QEMU packs from the least);
    reads still unpack them QEMU's way."""

    def set(self, cluster_index: int, value: int) -> None:
        bits = 1 << self._order
        if bits >= 8:
            super().set(cluster_index, value)
            return
        per_byte = 8 // bits
        index = cluster_index % self._entries
        mirrored = index - index % per_byte + (per_byte - 1 - index % per_byte)
        table_index = cluster_index // self._entries
        offset = self._block_offset(table_index) or self._create_block(table_index)
        block = self._load_block(offset)
        set_block_entry(block, mirrored, self._order, value)
        start = index // per_byte
        self._storage.write(block[start : start + 1], offset + start)


class SubByteRefcountPacking(Qcow2Driver):
    """Refcounts narrower than a byte (1, 2 and 4 bits) are packed in the wrong order."""

    @staticmethod
    def _after_swap(driver: Qcow2Driver) -> None:
        driver._refcounts.__class__ = _MsbFirstRefcounts


class ReadvOddOffset(FormatAccess):
    """readv advances by each buffer's size rounded down to even: odd-size buffers after the
    first read from one byte too early."""

    def readv(self, buffers: Any, offset: int) -> None:
        for buf in buffers:
            view = memoryview(buf).cast("B")
            self.readinto(view, offset)
            offset += len(view) & ~1


class ParallelDropsLastJob(FormatAccess):
    """With parallelization > 1, the last job of a request split into several is never
    submitted (its part of the buffer is left as it was, its data never written)."""

    @staticmethod
    def _run(jobs: Any, parallelization: int) -> None:
        if parallelization > 1 and len(jobs) > 1:
            jobs = jobs[:-1]
        FormatAccess._run(jobs, parallelization)


class CompressedOverAllocated(Qcow2Driver):
    """A compressed write into an allocated cluster is not refused but written plainly (a
    fallback QEMU does not make: the content is right, the refusal is missing)."""

    def write_compressed(self, data: bytes, offset: int) -> None:
        try:
            super().write_compressed(data, offset)
        except InvalidRequestError as exc:
            if "is allocated" not in str(exc):
                raise
            self._write_plain(data, offset)


class SnapshotLookupNameFirst(Qcow2Driver):
    """apply_snapshot and delete_snapshot look a snapshot up by name before ID (QEMU: ID
    first), which shows when a snapshot is named like another's ID."""

    def _name_first(self, key: str) -> str:
        for entry in self._snapshots():
            if entry.name == key:
                return entry.id_str
        return key

    def apply_snapshot(self, key: str) -> None:
        super().apply_snapshot(self._name_first(key))

    def delete_snapshot(self, key: str) -> None:
        super().delete_snapshot(self._name_first(key))


MUTANTS: dict[str, type[Any]] = {
    "no-copy-on-write": NoCopyOnWrite,
    "stale-discard-to-backing": StaleDiscardToBacking,
    "lower-explicit-zero": LowerExplicitZero,
    "regrow-keeps-old-tail": RegrowKeepsOldTail,
    "lose-dirty-l2-on-eviction": LoseDirtyL2OnEviction,
    "l2-boundary-off-by-one": L2BoundaryOffByOne,
    "entry-before-data": EntryBeforeData,
    "sub-byte-refcount-packing": SubByteRefcountPacking,
    "readv-odd-offset": ReadvOddOffset,
    "parallel-drops-last-job": ParallelDropsLastJob,
    "compressed-over-allocated": CompressedOverAllocated,
    "snapshot-lookup-name-first": SnapshotLookupNameFirst,
}

#: Mutants whose bug is a broken power-cut promise (killed by the crash rule).
CRASH_MUTANTS = frozenset({"entry-before-data"})

CLAUSES = {
    "no-copy-on-write": ("access.cow.partial-cluster",),
    "stale-discard-to-backing": ("access.discard-to-backing.visible",),
    "lower-explicit-zero": ("access.mapping.explicit-top-only",),
    "regrow-keeps-old-tail": ("access.resize.grow-zero", "access.resize.shrink-discards"),
    "lose-dirty-l2-on-eviction": ("access.close.flushes", "access.invalidate-cache"),
    "l2-boundary-off-by-one": ("qcow2.l2.entry-layout",),
    "entry-before-data": ("crash.power-cut", "crash.order.data-before-entry"),
    "sub-byte-refcount-packing": ("qcow2.refcount.no-leaks",),
    "readv-odd-offset": ("access.read.no-short",),
    "parallel-drops-last-job": ("access.parallel.same-result",),
    "compressed-over-allocated": ("qcow2.compressed.write-unallocated-only",),
    "snapshot-lookup-name-first": ("qcow2.snapshots.lookup-id-then-name",),
}


def _swap_chain(access: Any, mutant: type[Any]) -> None:
    """Turn every reference qcow2 driver (or, for a FormatAccess mutant, every FormatAccess)
    in the chain into the mutant (same state)."""
    layer = access
    while isinstance(layer, FormatAccess):
        driver = layer.driver
        if issubclass(mutant, FormatAccess):
            if type(layer) is FormatAccess:
                layer.__class__ = mutant
        elif type(driver) is Qcow2Driver:
            driver.__class__ = mutant
            hook = getattr(mutant, "_after_swap", None)
            if hook is not None:
                hook(driver)
        layer = getattr(driver, "backing", None)


def mutant_target(name: str) -> ImplementationTarget:
    mutant = MUTANTS[name]

    def open_mutant(location: Any, **kwargs: Any) -> FormatAccess:
        access = open_image(location, **kwargs)
        _swap_chain(access, mutant)
        backing = kwargs.get("backing")
        if isinstance(backing, FormatAccess):
            _swap_chain(backing, mutant)
        return access

    return ImplementationTarget(
        name=f"mutant:{name}",
        open_image=open_mutant,
        create_image=create_image,
        l2_cache_option=True,
    )


def _ci_settings() -> settings:
    # The ci budget whatever profile is loaded; no shrinking: only "is it caught" matters.
    register_profiles()
    ci = settings.get_profile("ci")
    assert (ci.max_examples, ci.stateful_step_count) == (CI_MAX_EXAMPLES, CI_STEP_COUNT)
    return oracle_settings(ci, phases=(Phase.explicit, Phase.generate), report_multiple_bugs=False)


def _caught(target: ImplementationTarget) -> tuple[BaseException | None, RunStats, float]:
    stats = RunStats()
    machine = make_machine(target, stats=stats, failures_dir=None, qemu_img=None)
    start = time.monotonic()
    try:
        run_state_machine_as_test(machine, settings=_ci_settings())
    except Exception as exc:
        return exc, stats, time.monotonic() - start
    return None, stats, time.monotonic() - start


def _param(name: str) -> Any:
    return pytest.param(name, id=name, marks=[pytest.mark.clause(*CLAUSES[name])])


_HELPERS = {"_shift", "_after_swap", "_name_first"}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_overrides_exist_in_the_reference(name: str) -> None:
    # A renamed driver method would leave the mutant harmless (and the test below failing);
    # say so directly.
    mutant = MUTANTS[name]
    base = FormatAccess if issubclass(mutant, FormatAccess) else Qcow2Driver
    for attr, value in vars(mutant).items():
        if isinstance(value, staticmethod):
            value = value.__func__
        if callable(value) and not attr.startswith("__") and attr not in _HELPERS:
            assert hasattr(base, attr), f"{name}: {base.__name__} has no {attr} any more"


@pytest.mark.parametrize("name", [_param(n) for n in MUTANTS])
def test_machine_catches_mutant(name: str) -> None:
    error, stats, elapsed = _caught(mutant_target(name))
    assert error is not None, (
        f"mutant {name} survived {stats.examples} examples / {stats.steps} steps"
    )
    # Caught by the oracle, not by a mutant that broke on a renamed attribute.
    assert not isinstance(error, (AttributeError, NameError, TypeError)), repr(error)
    if name in CRASH_MUTANTS:
        # A broken write order is only visible to the power-cut rule.
        assert crash_clauses(error), f"{name} was not killed by the power-cut rule: {error!r}"
    print(f"{name}: caught after {stats.examples} examples, {stats.steps} steps, {elapsed:.1f}s")




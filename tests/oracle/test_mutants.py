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
    IndirectMapping,
    InvalidRequestError,
    Qcow2Driver,
    ShallowMapping,
    ZeroMapping,
    create_image,
    open_image,
)
from pyimago.reference.qcow2.l2cache import L2Cache
from pyimago.reference.qcow2.refcounts import RefcountTable, set_block_entry
from pyimago.reference.qcow2.tables import ClusterType, L2Entry, l2_index

# -- the mutants ----------------------------------------------------------------------------


class NoCopyOnWrite(Qcow2Driver):
    """A partial-cluster write over an unallocated cluster does not copy the backing's data."""

    def _cluster_content(self, guest_cluster: int, entry: L2Entry) -> bytes:
        if entry.type is ClusterType.UNALLOCATED:
            return bytes(self.cluster_size)
        return super()._cluster_content(guest_cluster, entry)


class StaleDiscardToBacking(Qcow2Driver):
    """discard_to_backing forgets the last whole cluster of the range: its data stays."""

    def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        clusters = self._whole_clusters(offset, length)
        if len(clusters) <= 1:
            return super().discard_to_backing(offset, length)
        last = clusters[-1]
        done = super().discard_to_backing(offset, last - offset)
        return done[0], min(offset + length, self.size) - done[0]


class LowerExplicitZero(Qcow2Driver):
    """An unallocated cluster over a lower layer's zero cluster is reported as explicit zero."""

    def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        mapping, length = super().get_mapping(offset, max_length)
        if isinstance(mapping, IndirectMapping) and isinstance(mapping.layer, FormatAccess):
            below, below_length = mapping.layer.get_mapping(mapping.offset, length)
            if isinstance(below, ZeroMapping) and below.explicit:
                return ZeroMapping(True), min(length, below_length)
        return mapping, length


class RegrowKeepsOldTail(Qcow2Driver):
    """A grow believes the cluster at the old end reads zero past it, so after a shrink to
    mid-cluster the old tail comes back."""

    def _reads_zero(self, guest_cluster: int) -> bool:
        return True


class _LossyL2Cache(L2Cache):
    def _evict(self) -> None:
        for offset in [o for o in list(self._tables)[:-1] if o not in self._pinned]:
            if len(self._tables) <= self._capacity:
                return
            self._dirty.discard(offset)
            del self._tables[offset]


class LoseDirtyL2OnEviction(Qcow2Driver):
    """A dirty L2 table evicted from the cache is dropped instead of written back."""

    def _load_l2(self, l2_offset: int) -> list[int]:
        self._l2.__class__ = _LossyL2Cache
        return super()._load_l2(l2_offset)


class L2BoundaryOffByOne(Qcow2Driver):
    """The last cluster an L2 table maps is looked up one entry too far (the next table's
    first entry), on the read and the write path alike."""

    def _shift(self, guest_offset: int) -> int:
        bits = self.cluster_size.bit_length() - 1
        if l2_index(guest_offset, bits) == self.cluster_size // 8 - 1:
            return guest_offset + self.cluster_size
        return guest_offset

    def _get_l2_entry(self, guest_offset: int) -> L2Entry:
        return super()._get_l2_entry(self._shift(guest_offset))

    def _set_l2_entry(
        self, guest_offset: int, entry: L2Entry, *, write_through: bool, pinned: bool = False
    ) -> None:
        super()._set_l2_entry(self._shift(guest_offset), entry, write_through=write_through,
                              pinned=pinned)


class EntryBeforeData(Qcow2Driver):
    """Crash ordering: every L2 entry is written through at once, so a new cluster's entry
    reaches storage before the guest data FormatAccess writes into it (crash.order.
    data-before-entry): a cut in between shows a cluster of zeroes."""

    def _set_l2_entry(
        self, guest_offset: int, entry: L2Entry, *, write_through: bool, pinned: bool = False
    ) -> None:
        super()._set_l2_entry(guest_offset, entry, write_through=True, pinned=pinned)


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


_HELPERS = {"_shift", "_after_swap"}


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




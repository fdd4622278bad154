"""Deliberately broken drivers: the oracle must catch every one within the ``ci`` budget.

Loaded by ``tests/fuzz/conftest.py`` as the package ``pyimago_tests_fuzz_mutants``
(``tests/`` is not a package).  Each :class:`Mutant` names the bug, the clauses it breaks,
and how to build its target; ``qemu`` marks the bugs only ``qemu-img check`` can see
(reads are right; the image's metadata is not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyimago.oracle import DriverTarget

from . import _chunkmap as cm
from . import _qcow2 as q
from . import _reference as rm

__all__ = ["MUTANTS", "Mutant"]


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    clauses: tuple[str, ...]
    target: Callable[[], DriverTarget]
    qemu: bool = False
    """Only visible to ``qemu-img check`` at teardown of file chains."""
    base: type | None = None
    """The class the mutant overrides methods of (checked to still have them)."""
    mutant: type | None = None


def _driver_mutant(
    name: str, driver: type[q.Qcow2Driver], *clauses: str, qemu: bool = False
) -> Mutant:
    return Mutant(name, clauses, lambda: q.qcow2_mutant_target(name, driver=driver), qemu,
                  q.Qcow2Driver, driver)


def _access_mutant(name: str, access: type[q.FormatAccess], *clauses: str) -> Mutant:
    return Mutant(name, clauses, lambda: q.qcow2_mutant_target(name, access=access), False,
                  q.FormatAccess, access)


def _chunkmap_mutant(name: str, driver: type[cm.ChunkMapDriver], *clauses: str) -> Mutant:
    return Mutant(name, clauses, lambda: cm.chunkmap_mutant_target(name, driver), False,
                  cm.ChunkMapDriver, driver)


_Q = "qcow2-"

MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in (
        _driver_mutant(f"{_Q}no-copy-on-write", rm.NoCopyOnWrite,
                       "access.cow.partial-cluster"),
        _driver_mutant(f"{_Q}stale-discard-to-backing", rm.StaleDiscardToBacking,
                       "access.discard-to-backing.visible"),
        _driver_mutant(f"{_Q}zero-flag-ignored-on-read", q.ZeroFlagIgnoredOnRead,
                       "qcow2.zero.flag", "access.write-zeroes.no-free"),
        _driver_mutant(f"{_Q}lower-explicit-zero", rm.LowerExplicitZero,
                       "access.mapping.explicit-top-only"),
        _driver_mutant(f"{_Q}regrow-keeps-old-tail", rm.RegrowKeepsOldTail,
                       "access.resize.shrink-discards", "access.resize.grow-zero"),
        _driver_mutant(f"{_Q}cluster-end-off-by-one", q.ClusterEndOffByOne,
                       "access.discard-to-backing.partial-kept", "access.write-zeroes.soft"),
        _driver_mutant(f"{_Q}l2-boundary-off-by-one", rm.L2BoundaryOffByOne, "qcow2.l2.index"),
        _driver_mutant(f"{_Q}lose-dirty-l2-on-eviction", rm.LoseDirtyL2OnEviction,
                       "access.close.flushes", "access.invalidate-cache"),
        _driver_mutant(f"{_Q}refcount-not-raised", q.RefcountNotRaised,
                       "qcow2.refcount.no-leaks", "interop.qemu-check", qemu=True),
        _driver_mutant(f"{_Q}copied-flag-wrong", q.CopiedFlagWrong, "qcow2.l2.copied-flag",
                       "interop.qemu-check", qemu=True),
        _driver_mutant(f"{_Q}compressed-read-wrong-offset", q.CompressedReadWrongOffset,
                       "access.mapping.special-compressed", "qcow2.compressed.layout"),
        _driver_mutant(f"{_Q}resize-ignores-prealloc", q.ResizeIgnoresPrealloc,
                       "access.resize.grow-zero", "access.resize.grow-full-allocate"),
        _driver_mutant(f"{_Q}flush-drops-l2", q.FlushDropsL2, "access.flush.no-sync",
                       "access.close.flushes"),
        _driver_mutant(f"{_Q}zero-flag-in-reserved-bit", q.ZeroFlagInReservedBit,
                       "qcow2.l2.reserved-bits", "qcow2.zero.flag"),
        _access_mutant("access-write-past-end-partly-applied", q.PartialPastEndAccess,
                       "access.write.past-end"),
        _access_mutant("access-eof-on-lower-layer", q.EofOnLowerLayerAccess,
                       "access.mapping.eof-top-only", "backing.shorter"),
        _access_mutant("access-parallel-chunks-out-of-place", q.OutOfPlaceParallelAccess,
                       "access.parallel.same-result"),
        _chunkmap_mutant("chunkmap-flush-does-not-persist", cm.FlushDoesNotPersist,
                         "access.flush.no-sync", "access.close.flushes"),
        _chunkmap_mutant("chunkmap-no-copy-on-write", cm.NoCopyOnWrite,
                         "access.cow.partial-cluster"),
        _chunkmap_mutant("chunkmap-resize-ignores-prealloc", cm.ResizeIgnoresPrealloc,
                         "access.resize.grow-zero"),
        _chunkmap_mutant("chunkmap-discard-to-backing-zeroes", cm.DiscardToBackingZeroes,
                         "access.discard-to-backing.visible"),
    )
}

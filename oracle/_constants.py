"""A derandomised example stream that depends on neither test order nor target.

Hypothesis (>= 6.131) mixes "local constants" into about one integer draw in twenty: the
literals of every non-library module found in ``sys.modules`` at the time of the draw.  That
pool grows as modules are imported, so the ``ci`` profile's derandomised stream depended on
what ran earlier in the process (a test that imported ``pyimago.cli`` changed every later
machine's examples: a mutant killed in 26 examples alone survived the whole budget after it)
and on the target (a third-party driver's module adds its literals); its strings were kept
in a set, whose order changes with each process's hash seed.

:func:`pin_local_constants` replaces the pool, once per process, by a fixed one: the sizes
and boundaries a disk image is made of (powers of two from a sector to 64 MiB, one either
side of each; the qcow2 entry masks), ordered.  Being data, not whatever the source of the
day holds, it also keeps the stream from moving when an unrelated literal is edited.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PINNED_INTEGERS", "pin_local_constants", "pinned_constants"]

#: Sector to 64 MiB powers of two and their neighbours; qcow2's L1/L2 offset mask and flag
#: bits, the refcount-table limits; the largest 63- and 64-bit values.
PINNED_INTEGERS: tuple[int, ...] = tuple(sorted({
    *(n for k in range(9, 27) for n in (2**k - 1, 2**k, 2**k + 1)),
    0x00FFFFFFFFFFFE00, 0x00FFFFFFFFFFFF00, 1 << 62, 1 << 63, (1 << 63) - 1, (1 << 64) - 1,
}))

_pinned: Any = None


def pinned_constants() -> Any:
    """The fixed pool (a Hypothesis ``Constants``): :data:`PINNED_INTEGERS`, nothing else."""
    global _pinned
    if _pinned is None:
        from hypothesis.internal.constants_ast import Constants
        from sortedcontainers import SortedSet  # type: ignore[import-untyped]

        _pinned = Constants(integers=SortedSet(PINNED_INTEGERS), floats=SortedSet(),
                            bytes=SortedSet(), strings=SortedSet())
    return _pinned


def pin_local_constants() -> bool:
    """Make Hypothesis draw its local constants from :func:`pinned_constants` in this
    process (idempotent).  False when this Hypothesis has no such pool (nothing to pin)."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - an older Hypothesis
        return False
    if not hasattr(providers, "_get_local_constants"):  # pragma: no cover
        return False
    if getattr(providers._get_local_constants, "_pyimago_pinned", False):
        return True
    pool = pinned_constants()

    def pinned() -> Any:
        return pool

    pinned._pyimago_pinned = True  # type: ignore[attr-defined]
    providers._get_local_constants = pinned
    # The permitted-values cache was filled from the old pool.
    providers.CONSTANTS_CACHE.cache.clear()
    return True

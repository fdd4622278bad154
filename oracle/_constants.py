"""A derandomised example stream that depends on neither test order nor target.

Hypothesis (>= 6.131) mixes "local constants" into about one integer draw in twenty: the
literals of every non-library module found in ``sys.modules`` at the time of the draw.  That
pool grows as modules are imported, so the ``ci`` profile's derandomised stream depended on
what ran earlier in the process (a test that imported ``pyimago.cli`` changed every later
machine's examples: a mutant killed in 26 examples alone survived the whole budget after it)
and on the target (a third-party driver's module adds its literals).

:func:`pin_local_constants` replaces the pool, once per process, by a fixed one: the literals
of pyimago's own source files, read in sorted order, whatever is imported.  The boundary
values the pool exists for (cluster sizes, table entry masks) stay in it.
"""

from __future__ import annotations

import os
import types
from typing import Any

__all__ = ["pin_local_constants", "pinned_constants"]

_pinned: Any = None


def _pyimago_sources() -> list[str]:
    import pyimago

    root = os.path.dirname(os.path.abspath(pyimago.__file__))
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def pinned_constants() -> Any:
    """The fixed pool (a Hypothesis ``Constants``): the literals of pyimago's sources."""
    global _pinned
    if _pinned is None:
        from hypothesis.internal.constants_ast import Constants, constants_from_module

        pool = Constants()
        for path in _pyimago_sources():
            # A stand-in module: Hypothesis reads (and caches, by content hash) its file.
            stand_in = types.ModuleType("pyimago_source")
            stand_in.__file__ = path
            pool |= constants_from_module(stand_in)
        _pinned = pool
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

"""The implementation-generic conformance suite: one clause-tagged test per contract rule.

The test modules here (``test_*.py``) check an implementation of the pyimago API through its
public entry points only (``open_image``, ``create_image``, the ``FormatAccess`` objects they
return, ``MemoryStorage`` and files), crafting hostile qcow2 images byte by byte with the
suite's own qcow2 reader (:mod:`._qcow2`) and asking qemu-img where it is installed.

Which implementation: ``$PYIMAGO_CONFORMANCE_IMPL`` = ``reference`` (default), ``fast``, a
module name, or ``module:attribute`` (see :func:`load_impl`).  Run it with::

    PYIMAGO_CONFORMANCE_IMPL=fast python -m pytest --pyargs pyimago.oracle.conformance \\
        -p pyimago.specs._pytest

or, for the per-clause report, ``pyimago conformance --impl fast``.

A test that does not apply to the implementation (a capability it lacks, qemu-img missing)
skips with a reason starting with :data:`NOT_APPLICABLE`; the report lists it as
not-applicable rather than skipped.
"""

from __future__ import annotations

from ._impl import (
    CAPABILITIES,
    IMPL_ENV,
    LOAD_ERROR_ENV,
    PROGRESS_ENV,
    Capabilities,
    Impl,
    ImplError,
    impl_from_env,
    load_impl,
)
from ._support import NOT_APPLICABLE

__all__ = [
    "CAPABILITIES",
    "IMPL_ENV",
    "LOAD_ERROR_ENV",
    "NOT_APPLICABLE",
    "PROGRESS_ENV",
    "Capabilities",
    "Impl",
    "ImplError",
    "impl_from_env",
    "load_impl",
]

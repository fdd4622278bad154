"""pyimago: qcow2 and raw disk images, a model-checked reference and a test oracle.

The packages: :mod:`pyimago.reference` (the plain, obviously correct implementation),
:mod:`pyimago.fast` (the same API, written for speed), :mod:`pyimago.oracle` (the flat model,
state machines, driver fuzzing, conformance reports; the ``oracle`` extra) and
:mod:`pyimago.specs` (the clause registry).  The ``pyimago`` command is
:func:`pyimago.cli.main`.

This module imports nothing but the standard library: ``import pyimago`` and
``pyimago --version`` work with only the runtime dependencies installed.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["__version__"]

#: What a source tree that was never installed reports (no distribution metadata to read).
_SOURCE_VERSION = "0+unknown"


def _installed_version() -> str:
    try:
        return metadata.version("pyimago")
    except metadata.PackageNotFoundError:
        return _SOURCE_VERSION


__version__: str = _installed_version()

"""Fuzz any third-party format driver against the oracle.

A driver's author describes the driver once, as a :class:`DriverTarget` (how to create and
open its images, what it supports), and runs the whole oracle against it:

* from a test: ``run_driver_conformance(target)`` (or the pytest plugin's
  ``pyimago_conformance`` fixture / ``@pytest.mark.pyimago_target`` marker);
* from the command line: ``pyimago fuzz module:target``.

Each run returns (or prints) :class:`ConformanceStats`: what it exercised.
"""

from __future__ import annotations

from ._run import TargetLike, conformance_settings, resolve_driver_target, run_driver_conformance
from ._stats import ConformanceStats
from ._strategies import driver_chain_specs
from ._target import (
    DISCARD_KINDS,
    STORAGES,
    DriverCapabilities,
    DriverTarget,
    Layout,
    load_target,
    qcow2_layouts,
)

__all__ = [
    "DISCARD_KINDS",
    "STORAGES",
    "ConformanceStats",
    "DriverCapabilities",
    "DriverTarget",
    "Layout",
    "TargetLike",
    "conformance_settings",
    "driver_chain_specs",
    "load_target",
    "qcow2_layouts",
    "resolve_driver_target",
    "run_driver_conformance",
]

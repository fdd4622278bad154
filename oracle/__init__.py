"""pyimago.oracle: the flat model, the Hypothesis state machines, replay files, the CLI.

Run the machines against any implementation::

    from pyimago.oracle import make_machine, module_target
    TestFast = make_machine(module_target("pyimago.fast")).TestCase

fuzz a third party's format driver (see :mod:`pyimago.oracle.fuzz`)::

    from pyimago.oracle import run_driver_conformance
    run_driver_conformance(my_driver.target())

The machines generate the qcow2 features an implementation supports (extended L2 at
subcluster granularity, external data files, lazy refcounts, zstd, compressed writes,
internal snapshots: :func:`probe_features` finds out which), and put QEMU-made layers with
the ones it only reads below the top of file chains.

Or from the command line: ``pyimago run`` (the reference, default budget), ``pyimago fuzz
module:target`` (a driver) and ``pyimago replay FILE`` (a recorded failure).

The names below are imported on first use: the package is imported by its pytest plugin in
every pytest run, which must stay cheap for projects that never use the oracle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .features import FeatureSupport, probe_features
    from .fuzz import (
        ConformanceStats,
        DriverCapabilities,
        DriverTarget,
        Layout,
        qcow2_layouts,
        run_driver_conformance,
    )
    from .machines import make_machine
    from .model import ANY_ALLOC, Alloc, BackingView, FlatModel, LayerTraits, first_mismatch
    from .ops import ChainSpec, LayerSpec, Op, OpKind, decode_word, pattern
    from .profiles import load_profile_from_env, register_profiles
    from .replay import (
        DEFAULT_FAILURES_DIR,
        Replay,
        ReplayResult,
        load_replay,
        replay_record,
        run_replay,
        write_replay,
    )
    from .session import OracleFailure, RunStats, Session, check_image
    from .strategies import chain_specs
    from .targets import ImplementationTarget, module_target, reference_target, resolve_target

_LAZY: dict[str, str] = {
    "ConformanceStats": "fuzz",
    "DriverCapabilities": "fuzz",
    "DriverTarget": "fuzz",
    "Layout": "fuzz",
    "qcow2_layouts": "fuzz",
    "run_driver_conformance": "fuzz",
    "FeatureSupport": "features",
    "probe_features": "features",
    "make_machine": "machines",
    "ANY_ALLOC": "model",
    "Alloc": "model",
    "BackingView": "model",
    "FlatModel": "model",
    "LayerTraits": "model",
    "first_mismatch": "model",
    "ChainSpec": "ops",
    "LayerSpec": "ops",
    "Op": "ops",
    "OpKind": "ops",
    "decode_word": "ops",
    "pattern": "ops",
    "load_profile_from_env": "profiles",
    "register_profiles": "profiles",
    "DEFAULT_FAILURES_DIR": "replay",
    "Replay": "replay",
    "ReplayResult": "replay",
    "load_replay": "replay",
    "replay_record": "replay",
    "run_replay": "replay",
    "write_replay": "replay",
    "OracleFailure": "session",
    "RunStats": "session",
    "Session": "session",
    "check_image": "session",
    "chain_specs": "strategies",
    "ImplementationTarget": "targets",
    "module_target": "targets",
    "reference_target": "targets",
    "resolve_target": "targets",
}

__all__ = [
    "ANY_ALLOC",
    "DEFAULT_FAILURES_DIR",
    "Alloc",
    "BackingView",
    "ChainSpec",
    "ConformanceStats",
    "DriverCapabilities",
    "DriverTarget",
    "FeatureSupport",
    "FlatModel",
    "ImplementationTarget",
    "LayerSpec",
    "LayerTraits",
    "Layout",
    "Op",
    "OpKind",
    "OracleFailure",
    "Replay",
    "ReplayResult",
    "RunStats",
    "Session",
    "chain_specs",
    "check_image",
    "decode_word",
    "first_mismatch",
    "load_profile_from_env",
    "load_replay",
    "make_machine",
    "module_target",
    "pattern",
    "probe_features",
    "qcow2_layouts",
    "reference_target",
    "register_profiles",
    "replay_record",
    "resolve_target",
    "run_driver_conformance",
    "run_replay",
    "write_replay",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

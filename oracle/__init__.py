"""pyimago.oracle: the flat model, the Hypothesis state machines, replay files, the CLI.

Run the machines against any implementation::

    from pyimago.oracle import make_machine, module_target
    TestFast = make_machine(module_target("pyimago.fast")).TestCase

or from the command line: ``pyimago run`` (the reference, default budget) and
``pyimago replay FILE`` (a recorded failure).
"""

from __future__ import annotations

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

__all__ = [
    "ANY_ALLOC",
    "DEFAULT_FAILURES_DIR",
    "Alloc",
    "BackingView",
    "ChainSpec",
    "FlatModel",
    "ImplementationTarget",
    "LayerSpec",
    "LayerTraits",
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
    "reference_target",
    "register_profiles",
    "replay_record",
    "resolve_target",
    "run_replay",
    "write_replay",
]

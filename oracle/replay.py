"""Replay files: a failing sequence as JSON, and running it again without Hypothesis.

A replay file holds the chain description (layers, their build operations, storage kind,
L2 cache size) and the operations applied to the top layer, in order.  Step numbers (which
decide the data each write puts down) are not stored: they follow from the order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from ._sched import serial_jobs
from .ops import ChainSpec, Op, OpKind
from .session import OracleFailure, RunStats, Session
from .targets import ImplementationTarget

__all__ = [
    "DEFAULT_FAILURES_DIR",
    "REPLAY_FORMAT",
    "REPLAY_MAX_BYTES",
    "REPLAY_MAX_OPS",
    "Replay",
    "ReplayFileError",
    "ReplayResult",
    "load_replay",
    "replay_record",
    "run_replay",
    "write_replay",
]

DEFAULT_FAILURES_DIR = ".pyimago-failures"

#: Largest disk, offset or length a replay file may name.  The machines make disks of a few
#: MiB; a file asking for more is damaged or hostile, and the flat model holds the whole
#: disk in memory.
REPLAY_MAX_BYTES = 1 << 30
#: Most operations (per layer build, and on the top layer) a replay file may list.
REPLAY_MAX_OPS = 100_000
REPLAY_FORMAT = "pyimago-replay"
_VERSION = 1


class ReplayFileError(ValueError):
    """A file that is not a readable pyimago replay file; the message names the file."""


@dataclass(frozen=True, slots=True)
class Replay:
    """A recorded sequence: the chain, the top-layer operations, and what failed."""

    chain: ChainSpec
    ops: tuple[Op, ...]
    target: str | None = None
    failure: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPLAY_FORMAT,
            "version": _VERSION,
            "target": self.target,
            "chain": self.chain.to_json(),
            "ops": [op.to_json() for op in self.ops],
            "failure": self.failure,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Replay:
        if obj.get("format") != REPLAY_FORMAT:
            raise ValueError("not a pyimago replay file")
        if int(obj.get("version", 0)) > _VERSION:
            raise ValueError(f"replay file version {obj.get('version')} is newer than this oracle")
        return cls(
            ChainSpec.from_json(obj["chain"]),
            tuple(Op.from_json(o) for o in obj["ops"]),
            obj.get("target"),
            obj.get("failure"),
        )


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """The outcome of running a replay: the log, and the error if it failed."""

    log: str
    error: BaseException | None

    @property
    def failed(self) -> bool:
        return self.error is not None


def replay_record(session: Session, error: BaseException | None) -> Replay:
    """The replay of what ``session`` ran so far."""
    failure = None if error is None else f"{type(error).__name__}: {error}"
    return Replay(
        session.chain,
        tuple(session.applied),
        session.target.module or session.target.name,
        failure,
    )


def write_replay(replay: Replay, directory: str = DEFAULT_FAILURES_DIR) -> str:
    """Write ``replay`` into ``directory`` (created if needed); return the file's path."""
    text = json.dumps(replay.to_json(), indent=1)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"replay-{time.strftime('%Y%m%d-%H%M%S')}-{digest}.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


def load_replay(path: str) -> Replay:
    """Read a replay file; :class:`ReplayFileError` (naming ``path``) if it cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except IsADirectoryError:
        raise ReplayFileError(f"{path}: is a folder, not a replay file") from None
    except FileNotFoundError:
        raise ReplayFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayFileError(f"{path}: cannot read: {exc}") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ReplayFileError(f"{path}: not a pyimago replay file (not JSON: {exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != REPLAY_FORMAT:
        raise ReplayFileError(
            f"{path}: not a pyimago replay file (no \"format\": \"{REPLAY_FORMAT}\")"
        )
    try:
        replay = Replay.from_json(obj)
        problem = _out_of_bounds(replay)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
    if problem:
        raise ReplayFileError(f"{path}: broken pyimago replay file ({problem})")
    return replay


def _out_of_bounds(replay: Replay) -> str | None:
    """What makes a parsed replay unusable (sizes no machine makes), or None."""
    if replay.chain.storage not in ("memory", "file"):
        return f"storage {replay.chain.storage!r} is neither 'memory' nor 'file'"
    if not replay.chain.layers:
        return "the chain has no layers"
    batches = [*(layer.build for layer in replay.chain.layers), replay.ops]
    if any(len(ops) > REPLAY_MAX_OPS for ops in batches):
        return f"more than {REPLAY_MAX_OPS:,} operations"
    for layer in replay.chain.layers:
        if not 0 < layer.size <= REPLAY_MAX_BYTES:
            return f"layer size {layer.size} outside 1..{REPLAY_MAX_BYTES}"
        if not 0 < layer.cluster_size <= 2 << 20:
            return f"cluster size {layer.cluster_size} outside 1..{2 << 20}"
    for ops in batches:
        for op in ops:
            for name in ("offset", "length", "value"):
                value = getattr(op, name)
                if not 0 <= value <= REPLAY_MAX_BYTES:
                    return f"{op.kind.value} {name} {value} outside 0..{REPLAY_MAX_BYTES}"
    return None


def run_replay(
    replay: Replay,
    target: ImplementationTarget,
    *,
    stats: RunStats | None = None,
    qemu_img: str | None = "auto",
    serial: bool | None = None,
) -> ReplayResult:
    """Run a replay against ``target``; failures come back in the result, not raised.

    A sequence that sets parallelization above 1 runs under :func:`serial_jobs` unless
    ``serial`` says otherwise: its jobs run in submission order, so it fails (or passes)
    the same way every time.
    """
    if serial is None:
        serial = any(op.kind in (OpKind.READ_PARALLEL, OpKind.WRITE_PARALLEL) and op.value > 1
                     for op in replay.ops)
    session = Session(target, replay.chain, stats=stats, qemu_img=qemu_img, build=False)
    session.full_checks = True  # the exact check after every step: the earliest report
    error: BaseException | None = None
    with serial_jobs() if serial else contextlib.nullcontext():
        try:
            session.build()
            for op in replay.ops:
                session.apply(op)
        except Exception as exc:
            error = exc
        try:
            session.close(verify=error is None)
        except Exception as exc:
            if error is None:
                error = exc
    log = session.format_log(failed=error)
    if serial:
        log += "\n(jobs run serially, in submission order: a deterministic schedule)"
    return ReplayResult(log, error)


def is_oracle_failure(error: BaseException | None) -> bool:
    """Whether an error is the model disagreeing (rather than the implementation raising)."""
    return isinstance(error, OracleFailure)

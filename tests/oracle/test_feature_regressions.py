"""Sequences the machines found with issue 13's features, kept as plain regression tests.

As in ``test_regressions``: each test replays a recorded sequence (chain and top-layer
operations, inline) against the implementation named; a sequence that exposes a bug not
fixed yet is marked ``xfail(strict=True)`` with the reason, so the fix turns it into a
failure and the marker is removed.
"""

from __future__ import annotations

from typing import Any

import pytest
from pyimago.oracle.replay import Replay, run_replay
from pyimago.oracle.targets import module_target


def _replay(target: str, chain: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    replay = Replay.from_json(
        {"format": "pyimago-replay", "version": 1, "chain": chain, "ops": ops}
    )
    result = run_replay(replay, module_target(target))
    assert not result.failed, result.log


@pytest.mark.xfail(strict=True, reason="pyimago.fast: create_snapshot on a MemoryStorage "
                   "image leaves the snapshot table past the end fast believes the file has "
                   "(CorruptImageError: snapshot table entry 0 runs past the file end)")
@pytest.mark.clause("qcow2.snapshots.list")
def test_fast_snapshot_of_an_image_in_memory() -> None:
    _replay(
        "pyimago.fast",
        {"storage": "memory", "layers": [{"format": "qcow2", "size": 65536,
                                          "cluster_size": 512}]},
        [{"op": "create_snapshot", "mode": "a"}],
    )

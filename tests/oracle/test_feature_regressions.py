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


@pytest.mark.clause("qcow2.snapshots.list")
def test_fast_snapshot_of_an_image_in_memory() -> None:
    # Was: create_snapshot on a MemoryStorage image left the snapshot table past the end
    # fast believed the file had (CorruptImageError: snapshot table entry 0 runs past the
    # file end); fixed on fast-write-b (snapshot operations refresh the file end).
    _replay(
        "pyimago.fast",
        {"storage": "memory", "layers": [{"format": "qcow2", "size": 65536,
                                          "cluster_size": 512}]},
        [{"op": "create_snapshot", "mode": "a"}],
    )


@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
@pytest.mark.clause("qcow2.snapshots.v2-no-resize")
def test_a_v2_image_with_snapshots_is_not_resized(target: str) -> None:
    # Found by the machine: pyimago.fast shrank a v2 image with snapshots, where QEMU
    # refuses ("Can't resize a v2 image which has snapshots"); both refuse now.
    _replay(
        target,
        {"storage": "file", "layers": [{"format": "qcow2", "size": 1024, "cluster_size": 512,
                                        "compat": "0.10"}]},
        [{"op": "create_snapshot", "mode": "a"}, {"op": "resize", "value": 512, "mode": "none"}],
    )


@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
@pytest.mark.clause("qcow2.extended-l2.clear", "access.discard-to-backing.partial-kept")
def test_extended_l2_discard_of_subclusters_in_a_shared_cluster(target: str) -> None:
    # Found by the machine (a false failure, fixed in the model): discard_to_backing of whole
    # subclusters inside a partial cluster is kept by the reference (as QEMU 7.2) and freed
    # by fast; the model takes both.
    _replay(
        target,
        {"storage": "memory", "layers": [
            {"format": "raw", "size": 98304},
            {"format": "qcow2", "size": 98304, "cluster_size": 16384, "extended_l2": True},
        ]},
        [
            {"op": "write", "offset": 0, "length": 98304},
            {"op": "create_snapshot", "mode": "a"},
            {"op": "discard_to_backing", "offset": 81920, "length": 4096},
            {"op": "power_cut"},
        ],
    )

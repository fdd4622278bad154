"""Sequences the machines found, kept as plain regression tests.

Each test replays a recorded sequence (the chain and the top-layer operations of a replay
file, inline) against the reference.  A sequence that exposes a bug not fixed yet is marked
``xfail(strict=True)`` with the reason: once the fix lands the test passes, strict xfail turns
that into a failure, and the marker is removed.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from pyimago.oracle.replay import Replay, run_replay
from pyimago.oracle.targets import resolve_target


def _replay(chain: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    _replay_against("reference", chain, ops)


def _replay_against(target: str, chain: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Replay ``ops`` on ``chain`` against ``target`` ('reference' or a module name)."""
    replay = Replay.from_json(
        {"format": "pyimago-replay", "version": 1, "chain": chain, "ops": ops}
    )
    result = run_replay(replay, resolve_target(target))
    assert not result.failed, result.log


@pytest.mark.clause("access.write-zeroes.soft", "storage.write.extends")
def test_v2_zeroing_over_backing_then_write_memory() -> None:
    # Found by the machine: zeroing a fresh whole cluster of a v2 overlay (no zero flag, so
    # zeroes are written) allocated a host cluster past the end of a MemoryStorage whose
    # write_zeroes did not extend it; the next write to that cluster then failed with
    # CorruptImageError "lies wholly outside the image file".  Fixed in MemoryStorage.
    _replay(
        {
            "storage": "memory",
            "l2_cache_tables": 1,
            "layers": [
                {"format": "raw", "size": 32768,
                 "build": [{"op": "write", "offset": 0, "length": 512}]},
                {"format": "qcow2", "size": 32768, "cluster_size": 512, "compat": "0.10"},
            ],
        },
        [
            {"op": "discard_to_zero", "offset": 0, "length": 1024},
            {"op": "sweep", "offset": 0, "length": 1, "value": 512},
        ],
    )


@pytest.mark.clause("access.resize.grow-zero", "access.resize.shrink-discards")
def test_shrink_into_a_cluster_then_grow_zero_hides_old_tail() -> None:
    _replay(
        {
            "storage": "memory",
            "layers": [{"format": "qcow2", "size": 16384, "cluster_size": 4096}],
        },
        [
            {"op": "write", "offset": 0, "length": 16384},
            {"op": "resize", "value": 5120, "mode": "none"},
            {"op": "resize", "value": 16384, "mode": "zero"},
        ],
    )


@pytest.mark.clause("crash.power-cut")
def test_cut_after_discard_on_a_file_keeps_what_the_file_kept() -> None:
    # Found by the one-hour deep campaign (issue 15), against both implementations alike: the
    # power-cut recorder rebuilt every discarded range as zeroes, but FileStorage's discard
    # is advisory and keeps the data, which a "keep" ensure_data_mapping then made the
    # model's known content; a cut after a later write into that range then "read" zeroes
    # no operation had put there.  Fixed in RecordingStorage: a discard is recorded as the
    # bytes the storage holds right after it.
    _replay(
        {"storage": "file", "layers": [{"format": "raw", "size": 4096}]},
        [
            {"op": "write", "offset": 0, "length": 4096},
            {"op": "discard_to_any", "offset": 511, "length": 3584},
            {"op": "ensure_data_mapping", "offset": 0, "length": 4096, "mode": "keep"},
            {"op": "sync"},
            {"op": "write", "offset": 511, "length": 166},
        ],
    )


@pytest.mark.clause("access.write-zeroes.soft", "qcow2.extended-l2.clear")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
@pytest.mark.parametrize("op", ["write_zeroes", "discard_to_zero"])
@pytest.mark.parametrize(("offset", "length"), [(1, 1024), (512, 513)])
def test_zeroing_edges_before_a_shared_extended_cluster_is_copied(
    target: str, op: str, offset: int, length: int
) -> None:
    # Found by the machine against both implementations alike: once a snapshot is applied,
    # the top's extended-L2 cluster is shared (refcount 2, no COPIED).  write_zeroes marked
    # the aligned middle subcluster zero first, then wrote zeroes into the partial head (or
    # tail); that write copied the cluster on write from its first allocated subcluster to
    # its last (QEMU's calculate_l2_meta), so the middle subcluster mapped as data again.
    # discard_to_zero alike.  Fixed by zeroing the partial edges before the aligned middle
    # (access.write-zeroes.soft).
    chain = {
        "storage": "memory",
        "l2_cache_tables": 1,
        "layers": [
            {"format": "qcow2", "size": 32768, "cluster_size": 16384, "extended_l2": True,
             "build": [{"op": "write", "offset": 0, "length": 512}]},
            {"format": "qcow2", "size": 1536, "cluster_size": 16384, "extended_l2": True},
        ],
    }
    ops = [
        {"op": "write", "offset": 0, "length": 1536},
        {"op": "create_snapshot", "mode": "1"},
        {"op": "write", "offset": 0, "length": 512},
        {"op": "apply_snapshot", "mode": "1"},
        {"op": op, "offset": offset, "length": length},
    ]
    _replay_against(target, chain, ops)


@pytest.mark.clause("access.resize.grow-format-allocate")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
def test_format_allocate_on_extended_l2_hides_a_longer_backing(target: str) -> None:
    # Found by the machine against both implementations alike: growing an extended-L2
    # overlay with FORMAT_ALLOCATE mapped the new cluster to a host cluster but left its
    # subclusters unallocated (as QEMU's preallocate_co links it), so the longer backing's
    # data showed at 0x8000.  Fixed as QEMU does it (the grown range of an overlay is zeroed
    # when the backing reaches past the old end): the subclusters are made zero.
    _replay_against(
        target,
        {
            "storage": "memory",
            "l2_cache_tables": 1,
            "layers": [
                {"format": "qcow2", "size": 655360, "cluster_size": 65536,
                 "build": [{"op": "write", "offset": 0, "length": 65536}]},
                {"format": "qcow2", "size": 32768, "cluster_size": 16384,
                 "extended_l2": True},
            ],
        },
        [{"op": "resize", "value": 33280, "mode": "format-allocate"}],
    )



@pytest.mark.clause("access.resize.grow-zero")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
@pytest.mark.parametrize(("cluster_size", "size"), [(16384, 1024), (32768, 2560)])
def test_grow_zero_keeps_the_old_subclusters_of_a_shared_cluster(
    target: str, cluster_size: int, size: int
) -> None:
    # Found by the machine against both implementations alike: growing with ZERO zeroed the
    # rest of the cluster the old end cuts by a write, whose COW of the cluster (shared with
    # a snapshot) turned the zero subcluster before the old end's into data.  Fixed: the
    # whole subclusters past the old end get their zero bits, as QEMU's truncate does, and
    # where the old end cuts a subcluster (32 KiB clusters: 1 KiB subclusters, end 2560) the
    # old range's zero and unallocated subclusters get that state back after its write.
    sub = cluster_size // 32
    _replay_against(
        target,
        {
            "storage": "memory",
            "l2_cache_tables": 1,
            "layers": [
                {"format": "raw", "size": 512,
                 "build": [{"op": "write", "offset": 0, "length": 512}]},
                {"format": "qcow2", "size": size, "cluster_size": cluster_size,
                 "extended_l2": True},
            ],
        },
        [
            {"op": "write", "offset": 0, "length": size},
            {"op": "create_snapshot", "mode": "a"},
            {"op": "discard_to_zero", "offset": sub, "length": sub},
            {"op": "resize", "value": -(-size // sub) * sub + sub, "mode": "zero"},
        ],
    )


@pytest.mark.clause("qcow2.extended-l2.write", "access.write-zeroes.soft")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
def test_zeroing_an_edge_of_a_shared_extended_cluster_may_remap_its_zero_subclusters(
    target: str,
) -> None:
    # Found by the machine (an oracle bug, not an implementation bug): subcluster 1 was
    # zeroed, a snapshot then shared the cluster, and write_zeroes of one byte at 0 wrote zero
    # data into subcluster 0.  That write copies the shared cluster from its first allocated
    # subcluster to its last (QEMU's calculate_l2_meta marks the whole copied range
    # allocated), so subcluster 1 maps as data holding zeroes.  The model allowed that for
    # write() but not for the zero data write_zeroes writes at its partial edges.
    _replay_against(
        target,
        {
            "storage": "memory",
            "l2_cache_tables": 2,
            "layers": [{"format": "qcow2", "size": 12288, "cluster_size": 16384,
                        "extended_l2": True}],
        },
        [
            {"op": "write", "offset": 0, "length": 12288},
            {"op": "write_zeroes", "offset": 1, "length": 1023},
            {"op": "create_snapshot", "mode": "a"},
            {"op": "write_zeroes", "offset": 0, "length": 1},
        ],
    )


@pytest.mark.clause("access.discard-to-zero.reads-zero", "qcow2.extended-l2.clear")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
def test_discard_to_zero_of_a_subcluster_of_a_compressed_extended_cluster(target: str) -> None:
    # Found by the machine against pyimago.fast only: a compressed cluster on an extended-L2
    # image (the disk's partial last cluster), then discard_to_zero of its first whole
    # subcluster.  The reference makes the cluster normal and gives the subcluster its zero
    # bit (qcow2.extended-l2.clear); fast wrote zeroes (copying the cluster whole) and left
    # the subcluster as data.  Fixed: after the write, the zero bits as for any cluster.
    _replay_against(
        target,
        {
            "storage": "memory",
            "l2_cache_tables": 1,
            "layers": [
                {"format": "raw", "size": 32768,
                 "build": [{"op": "write", "offset": 0, "length": 512}]},
                {"format": "qcow2", "size": 1024, "cluster_size": 16384,
                 "extended_l2": True},
            ],
        },
        [
            {"op": "write_compressed", "offset": 0, "length": 1024},
            {"op": "discard_to_zero", "offset": 0, "length": 512},
        ],
    )


@pytest.mark.clause("crash.power-cut", "qcow2.snapshots.apply-revert")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_cut_while_applying_a_snapshot_that_grows_the_disk(target: str, cluster_size: int) -> None:
    # Found by the machine (tests/oracle/test_machines.py[files-qemu-checked], seed 1) against
    # the reference only: a snapshot of the whole disk, a shrink to one sector, then
    # apply_snapshot.  The reference grew the disk first, as QEMU's qcow2_snapshot_goto
    # truncates before the L1 switch, so a cut between the header's new size and the switch
    # read zeroes in the grown range that neither the shrunk disk nor the snapshot held.
    # Fixed: the size is switched with the L1 table in one header write (both targets).
    # tests/tools/test_power_cut.py[apply-larger] holds the old-or-new rule as a whole.
    size = 0x10000 if cluster_size == 512 else 0x20000
    _replay_against(
        target,
        {
            "storage": "memory",
            "layers": [{"format": "qcow2", "size": size, "cluster_size": cluster_size}],
        },
        [
            {"op": "write", "offset": size - 512, "length": 512},
            {"op": "create_snapshot", "mode": "a"},
            {"op": "resize", "value": 512, "mode": "none"},
            {"op": "sync"},
            {"op": "apply_snapshot", "mode": "1"},
        ],
    )


@pytest.mark.clause("interop.qemu-read", "qcow2.extended-l2.clear")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
@pytest.mark.parametrize("op", ["write_zeroes", "discard_to_zero"])
def test_qemu_made_layer_zeroing_part_of_a_compressed_extended_cluster(
    target: str, op: str
) -> None:
    # Found by a random `pyimago run` (reference, file storage), an oracle bug: a layer made
    # by QEMU (qemu-io write -c, then write -z of its first subcluster) on an extended-L2
    # image.  QEMU's zero_l2_subclusters refuses to zero part of a compressed cluster
    # (-ENOTSUP) and the block layer writes zeroes instead, so the subcluster maps as data;
    # the model asked for the zero bit that pyimago's own zeroing gives it.  Fixed in the
    # oracle: for QEMU-made layers such a zeroing may leave data.
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img and qemu-io are needed to make the layer")
    zeroing = {"op": op, "offset": 0, "length": 512}
    _replay_against(
        target,
        {
            "storage": "file",
            "layers": [
                {"format": "qcow2", "size": 1024, "cluster_size": 16384, "extended_l2": True,
                 "maker": "qemu",
                 "build": [{"op": "write", "offset": 0, "length": 1024, "mode": "compressed"},
                           zeroing]},
                {"format": "qcow2", "size": 1024, "cluster_size": 512},
            ],
        },
        [],
    )


@pytest.mark.clause("crash.power-cut", "qcow2.snapshots.apply-revert",
                    "crash.snapshot.copied-conservative")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
def test_cut_while_applying_a_snapshot_that_shrinks_the_disk(target: str) -> None:
    # Found by the machine (tests/oracle/test_machines.py[files-qemu-checked], seed 8)
    # against the reference, an oracle bug: apply_snapshot of a smaller snapshot shrinks the
    # disk before the L1 switch (QEMU's qcow2_snapshot_goto truncates first), and a cut
    # inside that shrink -- the tail's clusters freed, the new size not yet on storage --
    # read zeroes in the tail.  The oracle then left that tail unspecified, as a plain
    # shrink's; now the reference, as fast, writes a fresh L1 table and switches it with the
    # size in one header write (crash.snapshot.copied-conservative), so the tail is held to
    # its old contents again, and this replay fails on the old shrink-first order.
    _replay_against(
        target,
        {"storage": "memory",
         "layers": [{"format": "qcow2", "size": 0x8000, "cluster_size": 2048}]},
        [
            {"op": "write", "offset": 0x3c00, "length": 512},
            {"op": "create_snapshot", "mode": "a"},
            {"op": "resize", "value": 512, "mode": "none"},
            {"op": "create_snapshot", "mode": "b"},
            {"op": "apply_snapshot", "mode": "a"},
            {"op": "sync"},
            {"op": "apply_snapshot", "mode": "b"},
        ],
    )


@pytest.mark.clause("qcow2.snapshots.apply-revert", "qcow2.refcount.entry-width")
@pytest.mark.parametrize("target", ["pyimago.reference", "pyimago.fast"])
def test_apply_snapshot_refused_for_refcount_room_leaves_the_disk_size(target: str) -> None:
    # Found by the machine (tests/oracle/test_machines.py[files-qemu-checked], seed 9)
    # against the reference only: with 2-bit refcounts every cluster the active disk and two
    # snapshots share sits at the maximum, so applying a snapshot is refused -- but the
    # reference shrank the disk to the snapshot's size first (QEMU's order: truncate, then
    # fail raising the refcounts).  Fixed: the refcount room is checked before anything is
    # written.
    _replay_against(
        target,
        {"storage": "memory",
         "layers": [{"format": "qcow2", "size": 0x600, "cluster_size": 512,
                     "refcount_bits": 2}]},
        [
            {"op": "write", "offset": 0, "length": 0x600},
            {"op": "create_snapshot", "mode": "x"},
            {"op": "create_snapshot", "mode": "1"},
            {"op": "resize", "value": 0x1e00, "mode": "none"},
            {"op": "apply_snapshot", "mode": "1"},
        ],
    )

"""Issue 13's features in the machines: probing, the flat model's snapshots, QEMU-made
layers, and a run that meets every feature the reference supports."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from hypothesis.stateful import run_state_machine_as_test
from pyimago.oracle.features import FEATURES, FeatureSupport, probe_features
from pyimago.oracle.machines import make_machine
from pyimago.oracle.model import Alloc, FlatModel, LayerTraits
from pyimago.oracle.ops import ChainSpec, LayerSpec, Op, OpKind
from pyimago.oracle.profiles import oracle_settings
from pyimago.oracle.session import RunStats, Session
from pyimago.oracle.strategies import chain_specs
from pyimago.oracle.targets import reference_target

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io make the QEMU layers",
)


def test_probe_names_only_known_features() -> None:
    support = probe_features(reference_target(), qemu=False)
    assert support.writable <= set(FEATURES)
    assert support.writable <= support.readable
    for name in set(FEATURES) - support.writable:
        assert name in support.reasons


@needs_qemu
def test_probe_reads_qemu_made_layers() -> None:
    support = probe_features(reference_target())
    # Both implementations read every layer option QEMU writes (issue 13, read side).
    assert {"extended_l2", "data_file", "data_file_raw", "lazy_refcounts", "zstd"} \
        <= support.readable


def test_a_target_with_its_own_capabilities_gets_no_features() -> None:
    from pyimago.oracle.fuzz import DriverTarget

    assert DriverTarget is not None
    support = FeatureSupport()
    assert support.summary().count(" -") == len(FEATURES)


def test_model_snapshots_restore_content_size_and_mapping() -> None:
    model = FlatModel(4096, LayerTraits.qcow2(512))
    model.write(0, b"\x01" * 512)
    first = model.create_snapshot("a")
    assert (first.id, first.name, first.size) == ("1", "a", 4096)
    model.write_zeroes(0, 512)
    model.resize(8192)
    second = model.create_snapshot("1")  # a name that is another snapshot's ID
    assert second.id == "2"
    model.apply_snapshot("1")  # by ID first: snapshot "a"
    assert model.size == 4096 and model.read(0, 512)[0] == b"\x01" * 512
    assert model.allowed(0) == {Alloc.DATA}
    model.delete_snapshot("a")
    assert [s.name for s in model.snapshots] == ["1"]
    assert model.next_snapshot_id() == "3"
    model.delete_snapshot("2")
    assert model.next_snapshot_id() == "1"


def test_extended_l2_units_are_subclusters() -> None:
    traits = LayerTraits.qcow2(65536, extended_l2=True)
    assert traits.granularity == 2048 and traits.zero_flag and traits.subclusters
    spec = LayerSpec("qcow2", 1 << 20, 65536, extended_l2=True)
    assert spec.granularity == 2048
    assert spec.l2_span == 65536 * 4096
    model = FlatModel(1 << 20, traits)
    model.write(100, b"x")
    # One subcluster is data; the rest of its cluster may be copied along (QEMU's
    # calculate_l2_meta); the next cluster is untouched.
    assert model.allowed(0) == {Alloc.DATA} and model.allowed(1) == {Alloc.BACKING, Alloc.DATA}
    assert model.allowed(32) == {Alloc.BACKING}


def test_feature_layers_round_trip_through_json() -> None:
    layer = LayerSpec("qcow2", 65536, 16384, extended_l2=True, data_file="raw",
                      lazy_refcounts=True, compression_type="zstd", maker="qemu")
    chain = ChainSpec((layer,), "file")
    assert ChainSpec.from_json(chain.to_json()) == chain
    plain = LayerSpec("qcow2", 65536)
    assert "extended_l2" not in plain.to_json()
    op = Op(OpKind.APPLY_SNAPSHOT, mode="1")
    assert Op.from_json(op.to_json()) == op
    assert "'1'" in op.describe()


@needs_qemu
@pytest.mark.parametrize("options", [
    {"extended_l2": True, "cluster_size": 16384},
    {"data_file": "file"},
    {"data_file": "raw"},
    {"lazy_refcounts": True},
    {"compression_type": "zstd"},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_qemu_made_lower_layers_read_back(options: dict[str, Any]) -> None:
    build = (
        Op(OpKind.WRITE, 0, 70000),
        Op(OpKind.WRITE_ZEROES, 4096, 20000),
        Op(OpKind.DISCARD_TO_ZERO, 32768, 32768),
    )
    if "data_file" not in options:
        build += (Op(OpKind.WRITE, 131072, 65536, mode="compressed"),)
    cluster = options.pop("cluster_size", 65536)
    lower = LayerSpec("qcow2", 1 << 20, cluster, build=build, maker="qemu", **options)
    top = LayerSpec("qcow2", 1 << 20, 65536)
    session = Session(reference_target(), ChainSpec((lower, top), "file"))
    try:
        session.apply(Op(OpKind.READ, 0, 1 << 20))
        session.apply(Op(OpKind.WRITE, 60000, 10000))
    finally:
        session.close()


@pytest.mark.slow(cost=40)
@pytest.mark.clause("qcow2.snapshots.apply-revert", "qcow2.snapshots.open",
                    "qcow2.compressed.write-fallback", "qcow2.extended-l2.write",
                    "qcow2.data-file.raw", "crash.oracle-rule")
def test_the_ci_run_meets_every_feature_the_reference_supports(tmp_path: Any) -> None:
    # Issue 13: "the oracle's ci run exercises each feature (shown in its summary)": every
    # feature the reference supports is hit (and the reference passes); ~4 min in ci.
    target = reference_target()
    qemu = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
    support = probe_features(target, qemu=qemu)
    stats = RunStats()
    # v3 qcow2 chains with lower layers (where QEMU-made ones go) and files (data files).
    chains = chain_specs(storages=("file", "memory"), depths=(2, 3), base_formats=("qcow2",),
                         compats=("1.1",), features=support, qemu_layers=qemu)
    machine = make_machine(target, chains=chains, stats=stats, failures_dir=str(tmp_path),
                           qemu_img="auto" if qemu else None, features=support)
    stats.features_expected |= support.readable if qemu else support.writable
    run_state_machine_as_test(machine, settings=oracle_settings())
    summary = dict(stats.path_rows())
    print(f"features: {support.summary()}\nhits: {summary['qcow2 features']}")
    missing = [w for w in stats.coverage_warnings() if w.endswith(" hit")]
    assert not missing, f"{missing}; hits: {summary['qcow2 features']}"


@pytest.mark.clause("crash.power-cut")
def test_a_missing_copied_flag_on_a_refcount_1_cluster_is_benign() -> None:
    from pyimago.oracle.crash import benign_copied

    lines = [
        "ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=20000 refcount=1",  # missing
        "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000030000 refcount=2",  # wrongly set
        "Repairing OFLAG_COPIED data cluster: l2_entry=3c000 refcount=1",  # repaired already
        "corruption at 0x4000: OFLAG_COPIED data cluster: l2_entry=3c000 refcount=1",
        "corruption at 0x4000: OFLAG_COPIED data cluster: l2_entry=3c000 refcount=12",
    ]
    assert benign_copied(lines) == 2


@pytest.mark.clause("qcow2.snapshots.create-refcounts")
def test_a_feature_whose_probe_breaks_is_reported_not_left_out() -> None:
    # A target that has snapshots, broken (its own error, not a refusal): the run fails at
    # once, naming the probe, instead of quietly running without snapshots.
    from dataclasses import replace

    from hypothesis import settings
    from pyimago.oracle._check import OracleFailure
    from pyimago.reference import CorruptImageError, open_image

    def open_broken(location: Any, **kwargs: Any) -> Any:
        access = open_image(location, **kwargs)

        def create_snapshot(name: str) -> Any:
            raise CorruptImageError("refcount of host cluster 5 would drop below zero")

        access.create_snapshot = create_snapshot
        return access

    target = replace(reference_target(), name="broken-snapshots", open_image=open_broken)
    support = probe_features(target, qemu=False)
    assert "snapshots" in support.broken and "snapshots" not in support.writable
    machine = make_machine(target, features=support, qemu_img=None, failures_dir=None)
    with pytest.raises(OracleFailure, match="the snapshots probe failed"):
        run_state_machine_as_test(machine, settings=oracle_settings(
            settings(max_examples=1, stateful_step_count=1, database=None)))
    # A refusal is a missing feature, not a broken one.
    assert not probe_features(reference_target(), qemu=False).broken

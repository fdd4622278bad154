"""The driver-fuzzing API: DriverTarget, capabilities, unsupported requests, stats, differential."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import chunkmap
import pytest
from hypothesis import Phase, given, settings
from pyimago.oracle import (
    ConformanceStats,
    DriverTarget,
    Layout,
    OracleFailure,
    qcow2_layouts,
    run_driver_conformance,
)
from pyimago.oracle.conformance import load_impl
from pyimago.oracle.fuzz import driver_chain_specs, load_target
from pyimago.oracle.ops import ChainSpec, LayerSpec, Op, OpKind
from pyimago.oracle.session import Session
from pyimago.oracle.targets import resolve_target
from pyimago.reference import (
    FormatAccess,
    MemoryStorage,
    PreallocateMode,
    UnsupportedError,
    create_image,
    open_image,
)
from pyimago_tests_fuzz_mutants import MUTANTS

# A small budget: these tests are about the API, the kill-rate tests about the budget.
QUICK = settings(max_examples=12, stateful_step_count=12, derandomize=True, database=None,
                 phases=(Phase.explicit, Phase.generate))


def reference_driver(**changes: Any) -> DriverTarget:
    """The reference, seen as a third-party qcow2 driver."""
    target = DriverTarget("reference-as-driver", "qcow2", create_image, open_image)
    return dataclasses.replace(target, **changes)


class _Refusing(FormatAccess):
    """The reference's FormatAccess, refusing what a limited driver would not do."""

    def discard_to_any(self, offset: int, length: int) -> None:
        raise UnsupportedError("no discard_to_any here")

    def resize_grow(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        if prealloc not in (PreallocateMode.NONE, PreallocateMode.ZERO):
            raise UnsupportedError(f"no {prealloc.value} grow here")
        super().resize_grow(new_size, prealloc)

    def resize_shrink(self, new_size: int) -> None:
        raise UnsupportedError("no shrinking here")


def _open_refusing(location: Any, **kwargs: Any) -> FormatAccess:
    access = open_image(location, **kwargs)
    access.__class__ = _Refusing
    return access


def _create_limited(location: Any, size: int, **options: Any) -> None:
    if "backing_file" in options:
        raise UnsupportedError("no backing files here")
    if options.get("preallocation", "off") != "off":
        raise UnsupportedError("no preallocated images here")
    create_image(location, size, **options)


LIMITED = dict(
    discards=frozenset({"zero", "backing"}),
    preallocation=frozenset({PreallocateMode.NONE, PreallocateMode.ZERO}),
    resize_shrink=False,
    backing=False,
    create_preallocation=frozenset(),
)


# -- descriptions -----------------------------------------------------------------------------


def test_layout_keeps_its_options() -> None:
    layout = Layout(4096, chunk_size=4096)
    assert layout.granularity == 4096 and layout.zero_clusters
    assert dict(layout.options) == {"chunk_size": 4096} and layout.compat == "1.1"
    assert Layout(512, zero_clusters=False).compat == "0.10"
    for bad in (0, 100, 768, 256):
        with pytest.raises(ValueError, match="power of two"):
            Layout(bad)


def test_driver_target_defaults_and_validation() -> None:
    target = reference_driver()
    assert target.layouts == qcow2_layouts()
    assert target.backing_formats == ("raw", "qcow2")
    assert target.is_differential and target.capabilities.compressed
    caps = target.capabilities
    assert caps.formats == ("qcow2",) and caps.resize and caps.discard and caps.zero_clusters
    assert caps.unsupported() == []
    with pytest.raises(ValueError, match="layouts"):
        DriverTarget("x", "mine", create_image, open_image)
    with pytest.raises(ValueError, match="discard kinds"):
        reference_driver(discards=frozenset({"sideways"}))
    with pytest.raises(ValueError, match="storages"):
        reference_driver(storages=("cloud",))
    limited = reference_driver(**LIMITED).capabilities
    assert limited.unsupported() == [
        "discard_to_any", "grow format-allocate", "grow full-allocate", "grow write-data",
        "resize shrink", "backing files", "create preallocation=falloc",
        "create preallocation=full", "create preallocation=metadata",
    ]


def test_capabilities_are_what_the_conformance_report_reads() -> None:
    impl = load_impl("chunkmap:target")
    assert impl.name == "chunkmap"
    caps = impl.capabilities
    assert not caps.qcow2 and not caps.raw
    assert caps.backing and caps.resize and caps.discard


def test_load_target_records_its_name() -> None:
    target = load_target("chunkmap:target")
    assert isinstance(target, DriverTarget) and target.module == "chunkmap:target"
    impl = resolve_target("chunkmap:target")
    assert impl.module == "chunkmap:target" and impl.capabilities is not None
    with pytest.raises(TypeError, match="not a DriverTarget"):
        load_target("chunkmap:MAGIC")
    with pytest.raises(ValueError, match="module:attribute"):
        load_target("chunkmap")


def test_implementation_sends_other_formats_to_the_reference() -> None:
    impl = chunkmap.target().implementation()
    base, top = MemoryStorage(), MemoryStorage()
    impl.create_image(base, 8192, format="qcow2", cluster_size=512, compat="1.1")
    impl.create_image(top, 8192, format="chunkmap", cluster_size=1024, compat="1.1",
                      backing_file="base", backing_fmt="qcow2")
    lower = impl.open(base, writable=False, format="qcow2", l2_cache_tables=1)
    upper = impl.open(top, writable=True, format="chunkmap", backing=lower,
                      explicit_backing=True, l2_cache_tables=1)
    assert type(lower.driver).__name__ == "Qcow2Driver"
    assert isinstance(upper.driver, chunkmap.ChunkMapDriver)
    assert upper.driver.zero_granularity == 1024
    upper.close()
    lower.close()
    with pytest.raises(ValueError, match="no layout"):
        impl.create_image(MemoryStorage(), 8192, format="chunkmap", cluster_size=2048)


LIMITED_CAPS = reference_driver(**LIMITED, storages=("memory",)).capabilities
CHUNKMAP_CAPS = chunkmap.target().capabilities


@settings(max_examples=60, database=None, derandomize=True)
@given(limited=driver_chain_specs(LIMITED_CAPS), chunk=driver_chain_specs(CHUNKMAP_CAPS))
def test_chains_follow_the_capabilities(limited: ChainSpec, chunk: ChainSpec) -> None:
    assert len(limited.layers) == 1 and limited.storage == "memory"
    assert limited.top.preallocation == "off"
    assert all(op.kind is not OpKind.DISCARD_TO_ANY for op in limited.top.build)
    assert chunk.top.format == "chunkmap"
    assert chunk.top.cluster_size in (512, 1024, 4096, 65536)
    for layer in chunk.layers[1:]:
        assert layer.format == "chunkmap"
    for layer in chunk.layers:
        assert all(op.mode is None for op in layer.build)  # no compression for chunkmap


# -- unsupported requests -----------------------------------------------------------------


@pytest.mark.clause("access.unsupported")
def test_a_driver_refusing_what_it_does_not_claim_passes() -> None:
    target = reference_driver(**LIMITED, open_image=_open_refusing,
                              create_image=_create_limited)
    stats = run_driver_conformance(target, settings=QUICK, failures_dir=None, qemu_img=None)
    assert stats.preflight_checks == 4  # backing files, three create preallocations
    assert stats.unsupported_checked > 0
    assert any(kind.endswith("(unsupported)") for kind, _ in stats.ops)
    assert dict(stats.chain_depths) == {1: stats.examples}
    assert stats.op_count("discard_to_any") == 0 and stats.op_count("discard_to_zero") > 0


@pytest.mark.clause("access.unsupported")
def test_doing_what_is_not_claimed_fails() -> None:
    # The reference does discard_to_any; a target that says it does not must refuse it.
    target = reference_driver(discards=frozenset({"zero", "backing"}), differential=False)
    with pytest.raises(OracleFailure, match="does not claim 'discard_to_any'") as info:
        run_driver_conformance(target, settings=QUICK, failures_dir=None, qemu_img=None)
    assert "access.unsupported" in info.value.clauses


@pytest.mark.clause("access.unsupported")
def test_preflight_checks_creation_options() -> None:
    target = reference_driver(backing=False)
    with pytest.raises(OracleFailure, match="create_image with a backing file"):
        run_driver_conformance(target, settings=QUICK, failures_dir=None, qemu_img=None)


def test_session_expects_unsupported_errors_and_an_unchanged_image() -> None:
    impl = reference_driver(**LIMITED, open_image=_open_refusing).implementation()
    chain = ChainSpec((LayerSpec("qcow2", 8192, cluster_size=1024),), "memory")
    session = Session(impl, chain, qemu_img=None)
    session.apply(Op(OpKind.WRITE, 0, 4096))
    for op in (Op(OpKind.DISCARD_TO_ANY, 0, 4096),
               Op(OpKind.RESIZE, value=16384, mode=PreallocateMode.WRITE_DATA.value),
               Op(OpKind.RESIZE, value=4096, mode="none")):
        session.apply(op)
    session.apply(Op(OpKind.RESIZE, value=16384, mode="zero"))
    session.close()
    assert session.stats.unsupported_checked == 3
    assert session.stats.ops["discard_to_any (unsupported)"] == 1
    assert issubclass(UnsupportedError, io.UnsupportedOperation)


# -- stats and differential -----------------------------------------------------------------


def test_stats_say_what_was_exercised() -> None:
    stats = run_driver_conformance(reference_driver(), settings=QUICK, failures_dir=None)
    assert isinstance(stats, ConformanceStats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.steps = 0  # type: ignore[misc]
    assert stats.examples >= 12 and stats.steps > 0 and stats.failures == 0
    assert sum(n for _, n in stats.ops) == stats.steps
    assert sum(n for _, n in stats.chain_depths) == stats.examples
    assert stats.granules_touched > 0 and stats.l2_tables_touched > 0
    assert stats.bytes_compared > 0 and stats.differential_steps > 0
    assert stats.reference_reads > 0
    text = stats.summary()
    for label in ("operations", "chain depths", "L2 tables touched", "bytes compared"):
        assert label in text


def test_compressed_clusters_are_built_and_read() -> None:
    chain = ChainSpec(
        (
            LayerSpec("qcow2", 16384, cluster_size=1024,
                      build=(Op(OpKind.WRITE, 0, 8192, mode="compressed"),)),
            LayerSpec("qcow2", 16384, cluster_size=1024,
                      build=(Op(OpKind.WRITE, 8192, 4096, mode="compressed"),)),
        ),
        "memory",
    )
    session = Session(reference_driver().implementation(), chain, qemu_img=None)
    assert session.stats.compressed_clusters == 12
    session.apply(Op(OpKind.READ, 100, 3000))
    session.apply(Op(OpKind.WRITE, 9000, 10))  # copy-on-write from a compressed cluster
    session.close()
    broken = MUTANTS["qcow2-compressed-read-wrong-offset"].target().implementation()
    session = Session(broken, chain, qemu_img=None, build=False)
    with pytest.raises(OracleFailure, match="read: byte 0x67"):
        session.build()
        session.apply(Op(OpKind.READ, 100, 3000))
    session.close(verify=False)


@pytest.mark.clause("qcow2.l2.reserved-bits")
def test_a_symmetric_bug_is_seen_by_the_differential_and_at_close() -> None:
    # The driver writes zero clusters in a way only it can read: its own reads are right.
    # Every step passes without the differential; the reference's check() of the closed
    # memory chain (as qemu-img check of a file chain) sees the reserved bit.
    broken = MUTANTS["qcow2-zero-flag-in-reserved-bit"].target()
    chain = ChainSpec((LayerSpec("qcow2", 8192, cluster_size=1024),), "memory")
    ops = [Op(OpKind.WRITE_ZEROES, 0, 4096), Op(OpKind.REOPEN)]
    session = Session(dataclasses.replace(broken, differential=False).implementation(), chain,
                      qemu_img=None)
    for op in ops:
        session.apply(op)
    with pytest.raises(OracleFailure, match=r"check\(\) of layer 0 after close .*reserved"):
        session.close()
    session = Session(broken.implementation(), chain, qemu_img=None)
    session.apply(ops[0])
    with pytest.raises(OracleFailure, match="reference cannot read"):
        session.apply(ops[1])
    session.close(verify=False)

"""Power cuts of a top layer with an external data file: the qcow2 file and the data file
are recorded in one order and cut together (crash.oracle-rule), so an ordering bug whose
victim is the data file is caught, as it is in a single-file image."""

from __future__ import annotations

import shutil

import pytest
from pyimago.oracle._journal import DataFileMutation, PairedRecording
from pyimago.oracle.ops import ChainSpec, LayerSpec, Op, OpKind
from pyimago.oracle.session import OracleFailure, Session
from pyimago.oracle.targets import ImplementationTarget, module_target, reference_target
from pyimago.reference import MemoryStorage
from pyimago_tests_reference_mutants import EntryBeforeData

from .test_power import _run as _run_chain
from .test_power import _swapping

pytestmark = pytest.mark.clause("crash.power-cut", "crash.oracle-rule")

#: A raw base full of data under a qcow2 top whose data lives in an external data file.
CHAIN = ChainSpec(
    (
        LayerSpec("raw", 16384, build=(Op(OpKind.WRITE, 0, 16384),)),
        LayerSpec("qcow2", 16384, cluster_size=512, data_file="file"),
    ),
    "file",
)
OPS = [Op(OpKind.WRITE, 100, 1500), Op(OpKind.SYNC), Op(OpKind.WRITE, 5000, 3000),
       Op(OpKind.POWER_CUT), Op(OpKind.WRITE_ZEROES, 700, 2000), Op(OpKind.POWER_CUT)]


def _run(target: ImplementationTarget, ops: list[Op], *, qemu: bool = False) -> Session:
    qemu_img = shutil.which("qemu-img") if qemu else None
    if qemu and qemu_img is None:
        pytest.skip("qemu-img is not installed")
    return _run_chain(target, ops, CHAIN, qemu_img=qemu_img)


@pytest.mark.parametrize("module", ["pyimago.reference", "pyimago.fast"])
@pytest.mark.parametrize("qemu", [False, True])
def test_a_data_file_top_is_recorded_with_its_data_file_and_cut(module: str,
                                                                 qemu: bool) -> None:
    session = _run(module_target(module) if module != "pyimago.reference"
                   else reference_target(), OPS, qemu=qemu)
    power = session.power
    assert power is not None and isinstance(power.rec, PairedRecording)
    assert session.stats.crash_checks >= 2 and session.stats.crash_states >= 4
    if qemu:
        assert session.stats.crash_judged >= 1


def test_paired_cut_states_interleave_both_files_in_one_order() -> None:
    image, data = MemoryStorage(b"q" * 8), MemoryStorage(b"d" * 8)
    rec = PairedRecording(image)
    companion = rec.attach_data_file(data)
    companion.write(b"D", 0)  # 1: the data file
    rec.write(b"Q", 0)  # 2: the qcow2 file
    companion.resize(4)  # 3
    assert rec.mutations == 3 and isinstance(rec.log[0], DataFileMutation)
    assert rec.describe_mutation(3) == "data file: resize to 4"
    seen = [(k, bytes(state), bytes(rec.data_state or b"")) for k, state in rec.cut_states()]
    assert seen == [(0, b"q" * 8, b"d" * 8), (1, b"q" * 8, b"D" + b"d" * 7),
                    (2, b"Q" + b"q" * 7, b"D" + b"d" * 7), (3, b"Q" + b"q" * 7, b"Dddd")]
    rec.checkpoint()
    assert [(k, bytes(rec.data_state or b"")) for k, _ in rec.cut_states()] == [(3, b"Dddd")]


def test_an_entry_written_before_its_data_in_the_data_file_is_caught() -> None:
    # The new cluster's L2 entry (qcow2 file) reaches storage before its data (data file):
    # a cut in between reads the data file's zeroes where the backing's data or the write's
    # must show.  Without the data file in the recording every cut saw the final data.
    with pytest.raises(OracleFailure) as info:
        _run(_swapping(EntryBeforeData), [Op(OpKind.WRITE, 100, 1500), Op(OpKind.POWER_CUT)])
    assert "crash.power-cut" in info.value.clauses
    # The content rule caught it (the cut state opens, with its own data file).
    assert "which no operation" in str(info.value) and "does not open" not in str(info.value)


def test_a_lower_layers_data_file_is_held_to_the_read_only_rule() -> None:
    chain = ChainSpec(
        (
            LayerSpec("qcow2", 16384, cluster_size=512, data_file="file",
                      build=(Op(OpKind.WRITE, 0, 8192),)),
            LayerSpec("qcow2", 16384, cluster_size=512),
        ),
        "file",
    )
    session = Session(reference_target(), chain, qemu_img=None)
    try:
        for op in OPS:
            session.apply(op)
        assert session.power is not None
        watched = [name for name, _, _ in session.power._lower]
        assert watched == ["layer 0", "layer 0's data file"]
    finally:
        session.close(verify=False)

"""Power cuts inside the machines: sessions record the top layer, judge cut states, and a
broken write order or a writing read-only open is caught (crash.power-cut,
crash.readonly-open)."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test
from pyimago.oracle import DriverTarget
from pyimago.oracle._sched import serial_jobs
from pyimago.oracle.crash import crash_clauses, unknown_ranges
from pyimago.oracle.machines import make_machine
from pyimago.oracle.ops import ChainSpec, LayerSpec, Op, OpKind
from pyimago.oracle.profiles import oracle_settings, register_profiles
from pyimago.oracle.session import OracleFailure, RunStats, Session
from pyimago.oracle.strategies import chain_specs
from pyimago.oracle.targets import ImplementationTarget, reference_target
from pyimago.reference import FormatAccess, Qcow2Driver, open_image
from pyimago_tests_reference_mutants import EntryBeforeData

pytestmark = pytest.mark.clause("crash.power-cut", "crash.oracle-rule")

CHAIN = ChainSpec(
    (
        LayerSpec("raw", 8192, build=(Op(OpKind.WRITE, 0, 8192),)),
        LayerSpec("qcow2", 8192, cluster_size=512),
    ),
    "memory",
)


def _swapping(mutant: type[Qcow2Driver]) -> ImplementationTarget:
    def open_swapped(location: Any, **kwargs: Any) -> FormatAccess:
        access = open_image(location, **kwargs)
        if type(access.driver) is Qcow2Driver:
            access.driver.__class__ = mutant
        return access

    return dataclasses.replace(reference_target(), name="entry-first", open_image=open_swapped,
                               module=None)


def _run(target: ImplementationTarget, ops: list[Op], chain: ChainSpec = CHAIN, *,
         qemu_img: str | None = None) -> Session:
    session = Session(target, chain, qemu_img=qemu_img)
    try:
        for op in ops:
            session.apply(op)
    finally:
        session.close(verify=False)
    return session


def test_unknown_ranges_are_widened_to_sectors() -> None:
    known = bytearray(b"\x01" * 4096)
    known[700:710] = bytes(10)
    known[1030:1040] = bytes(10)
    known[3000:3001] = bytes(1)
    assert unknown_ranges(bytes(known)) == ((512, 1024), (2560, 512))
    assert unknown_ranges(b"\x01" * 100) == ()


def test_sessions_check_cut_states_of_a_sound_write_order() -> None:
    ops = [Op(OpKind.WRITE, 100, 1500), Op(OpKind.SYNC), Op(OpKind.WRITE, 3000, 700),
           Op(OpKind.POWER_CUT)]
    session = _run(reference_target(), ops)
    assert session.power is not None
    assert session.stats.crash_states >= 4 and session.stats.crash_checks == 1


def test_an_entry_written_before_its_data_is_caught() -> None:
    # Over a backing full of data, a new cluster's L2 entry on storage before its data
    # shows a cluster of zeroes: neither the backing's bytes nor the write's.
    with pytest.raises(OracleFailure) as info:
        _run(_swapping(EntryBeforeData), [Op(OpKind.WRITE, 100, 1500), Op(OpKind.POWER_CUT)])
    assert crash_clauses(info.value) == ("crash.power-cut",)
    assert "power cut after storage mutation" in str(info.value)


@pytest.mark.clause("crash.readonly-open")
def test_a_read_only_open_that_writes_is_caught() -> None:
    def open_and_scribble(location: Any, **kwargs: Any) -> FormatAccess:
        access = open_image(location, **kwargs)
        if not kwargs.get("writable") and hasattr(location, "write"):
            location.write(b"\0", location.size())  # past the end: no guest byte changes
        return access

    target = dataclasses.replace(reference_target(), name="scribbler",
                                 open_image=open_and_scribble, module=None)
    chain = ChainSpec((LayerSpec("qcow2", 8192, cluster_size=512, build=CHAIN.layers[0].build),
                       CHAIN.layers[1]), "memory")
    session = Session(target, chain, qemu_img=None)
    session.apply(Op(OpKind.WRITE, 0, 512))
    with pytest.raises(OracleFailure) as info:
        session.close()
    assert crash_clauses(info.value) == ("crash.readonly-open",)


def test_driver_targets_opt_in() -> None:
    quiet = DriverTarget(name="q", format="qcow2", open_image=open_image,
                         create_image=lambda *a, **k: None)
    assert not quiet.implementation().crash_safe
    assert dataclasses.replace(quiet, crash_safe=True).implementation().crash_safe
    assert reference_target().crash_safe


def test_serial_jobs_run_in_the_submitting_thread_in_order() -> None:
    order: list[int] = []
    with serial_jobs(), ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(lambda i=i: (order.append(i), threading.get_ident())[1])
                   for i in range(5)]
        assert {f.result() for f in futures} == {threading.get_ident()}
    assert order == [0, 1, 2, 3, 4]
    with ThreadPoolExecutor(max_workers=2) as pool:  # restored afterwards
        assert pool.submit(threading.get_ident).result() != threading.get_ident()


def test_ci_stream_does_not_depend_on_the_target_name() -> None:
    register_profiles()
    ci = settings.get_profile("ci")
    seen: list[set[str]] = []
    for name in ("first", "second"):
        stats = RunStats()
        target = dataclasses.replace(reference_target(), name=name)
        machine = make_machine(target, chains=chain_specs(storages=("memory",)), stats=stats,
                               failures_dir=None, qemu_img=None)
        run_state_machine_as_test(
            machine, settings=oracle_settings(ci, max_examples=6, stateful_step_count=2,
                                              report_multiple_bugs=False))
        seen.append(stats.chains)
    assert seen[0] == seen[1] and len(seen[0]) >= 4

"""Failures people can act on: the log, replay files, ``pyimago replay`` and ``pyimago run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from pyimago.oracle import cli
from pyimago.oracle.machines import make_machine
from pyimago.oracle.ops import ChainSpec, LayerSpec, Op, OpKind
from pyimago.oracle.replay import Replay, load_replay, run_replay, write_replay
from pyimago.oracle.session import OracleFailure, Session
from pyimago.oracle.strategies import chain_specs
from pyimago.oracle.targets import ImplementationTarget, reference_target, resolve_target
from pyimago.reference import FormatAccess, Qcow2Driver, create_image, open_image
from pyimago.reference.qcow2.tables import ClusterType, L2Entry


class _NoCopyOnWrite(Qcow2Driver):
    def _cluster_content(self, guest_cluster: int, entry: L2Entry) -> bytes:
        if entry.type is ClusterType.UNALLOCATED:
            return bytes(self.cluster_size)
        return super()._cluster_content(guest_cluster, entry)


def _broken_target() -> ImplementationTarget:
    def open_broken(location: Any, **kwargs: Any) -> FormatAccess:
        access = open_image(location, **kwargs)
        if type(access.driver) is Qcow2Driver:
            access.driver.__class__ = _NoCopyOnWrite
        return access

    return ImplementationTarget("broken", open_broken, create_image, l2_cache_option=True)


CHAIN = ChainSpec(
    (
        LayerSpec("raw", 4096, build=(Op(OpKind.WRITE, 0, 4096),)),
        LayerSpec("qcow2", 4096, cluster_size=1024),
    ),
    "memory",
)
OPS = (Op(OpKind.WRITE, 1100, 10), Op(OpKind.READ, 1024, 100))


def _replay() -> Replay:
    return Replay(CHAIN, OPS, target="broken")


def test_log_marks_the_failing_offset() -> None:
    session = Session(_broken_target(), CHAIN)
    with pytest.raises(OracleFailure) as info:
        for op in OPS:
            session.apply(op)
    session.close(verify=False)
    log = session.format_log(failed=info.value)
    lines = log.splitlines()
    assert lines[0].startswith("pyimago oracle log")
    # 0x400 is the first byte of the cluster the write went to: the base's data was lost.
    marked = [line for line in lines if "<== covers 0x400" in line]
    assert len(marked) == 1 and "0x0 thru 0xfff" in marked[0]
    assert "FAILED at 0x400" in lines[-2]
    assert info.value.clauses[0] == "access.cow.partial-cluster"
    assert lines[-1].strip().startswith("spec clauses: access.cow.partial-cluster")
    # The message tells what the misplaced word is: data of step 1 (the base's build write).
    assert "step 1" in str(info.value)


@pytest.mark.clause("access.cow.partial-cluster")
def test_replay_file_round_trip(tmp_path: Path) -> None:
    path = write_replay(_replay(), str(tmp_path))
    assert json.loads(Path(path).read_text())["format"] == "pyimago-replay"
    replay = load_replay(path)
    assert replay == _replay()
    broken = run_replay(replay, _broken_target(), qemu_img=None)
    assert broken.failed and isinstance(broken.error, OracleFailure)
    fixed = run_replay(replay, reference_target(), qemu_img=None)
    assert not fixed.failed, fixed.log


def test_cli_replay_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = write_replay(_replay(), str(tmp_path))
    monkeypatch.setattr(
        cli, "resolve_target",
        lambda spec: _broken_target() if spec == "broken" else resolve_target(spec),
    )
    assert cli.main(["replay", path, "--no-qemu"]) == 1
    out = capsys.readouterr()
    assert "<== covers" in out.out and "replay FAILED" in out.err
    assert cli.main(["replay", path, "--target", "reference", "--quiet"]) == 0
    assert "replay passed" in capsys.readouterr().out


def test_failing_machine_writes_a_replay_and_notes_the_log(tmp_path: Path) -> None:
    machine = make_machine(
        _broken_target(),
        chains=chain_specs(storages=("memory",), depths=(2, 2), base_formats=("raw",)),
        failures_dir=str(tmp_path),
        qemu_img=None,
    )
    with pytest.raises(OracleFailure) as info:
        run_state_machine_as_test(
            machine,
            # No shrinking (slow, and Hypothesis's business): the final replay of the failing
            # example is what writes the replay file and the note either way.
            settings=settings(max_examples=200, stateful_step_count=10, database=None,
                              derandomize=True, deadline=None, report_multiple_bugs=False,
                              phases=(Phase.generate,),
                              suppress_health_check=list(HealthCheck)),
        )
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "pyimago oracle log" in notes and "replay file:" in notes
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    # The shrunk sequence still fails on replay, and the reference passes it.
    replay = load_replay(str(files[0]))
    assert run_replay(replay, _broken_target(), qemu_img=None).failed
    result = run_replay(replay, reference_target(), qemu_img=None)
    assert not result.failed, result.log


def test_cli_run_prints_a_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = cli.main(["run", "--profile", "ci", "--examples", "5", "--steps", "5", "--no-progress",
                   "--storage", "memory", "--failures-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ops/s" in out and "examples" in out and "none" in out


def test_python_dash_m_runs(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run(
        [sys.executable, "-m", "pyimago.oracle", "run", "--examples", "3", "--steps", "3",
         "--storage", "memory", "--profile", "ci", "--failures-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "throughput (memory)" in proc.stdout


def test_budget_overshoot_is_explained() -> None:
    from pyimago.oracle._cli_support import budget_note

    assert budget_note(100, 100, failed=False) == "100"
    assert budget_note(243, 100, failed=True) == "243 (100 examples + 143 shrink steps)"
    assert "did not count" in budget_note(104, 100, failed=False)

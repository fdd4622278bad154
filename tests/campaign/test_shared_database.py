"""Campaigns with the real parts: a deliberately broken driver fuzzed by two workers under
pytest-xdist against a real redis-server, and the failure one of them found replayed by a
fresh run from the database alone.  (Slow: a few pytest and pyimago processes.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyimago.oracle import cli
from pyimago.oracle.database import open_database, saved_replays

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.clause("access.flush.no-sync", "access.close.flushes")


def _pyimago(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A fresh ``pyimago`` process (nothing shared with this one but the arguments)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run(
        [sys.executable, "-m", "pyimago.oracle", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=900,
    )


def _first_passing_seed(target: str, database: str, tmp: Path) -> int:
    """A seed whose one example does not find the bug by itself (so that a run with it that
    fails can only have the failure from the database)."""
    for seed in range(1, 40):
        rc = cli.main(["fuzz", target, "--profile", "ci", "--examples", "1", "--steps", "10",
                       "--seed", str(seed), "--no-progress", "--no-qemu",
                       "--database", database, "--failures-dir", str(tmp / "probe")])
        if rc == 0:
            return seed
    pytest.fail("every seed's first example found the bug by itself")


@pytest.mark.slow
def test_two_workers_share_a_failure_through_redis(
    redis_url: str, broken_driver: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    campaign = tmp_path / "campaign"
    found = _pyimago(
        "fuzz", broken_driver, "--workers", "2", "--database", redis_url, "--profile", "ci",
        "--steps", "10", "--seed", "1000", "--no-progress", "--no-qemu",
        "--campaign-dir", str(campaign), "--failures-dir", str(tmp_path / "failures"),
        cwd=tmp_path,
    )
    assert found.returncode == 1, found.stdout + found.stderr
    summary = json.loads((campaign / "summary.json").read_text())
    workers = summary["per_worker"]
    assert summary["failed"] and summary["database"] == redis_url
    assert sorted(w["worker"] for w in workers) == [0, 1]
    assert sorted(s for w in workers for s in w["seeds"])[:2] == [1000, 1001]
    failed = [w for w in workers if w["state"] == "failed"]
    assert failed and "OracleFailure" in failed[0]["error"]
    # One table for the whole campaign: every worker's counters, added up.
    assert summary["stats"]["examples"] == sum(w["stats"]["examples"] for w in workers)
    assert summary["stats"]["steps"] == sum(w["stats"]["steps"] for w in workers) > 0
    assert summary["stats"]["failures"] == sum(w["stats"]["failures"] for w in workers) >= 1
    assert "pyimago fuzz campaign" in found.stdout and "FAILED in worker" in found.stderr

    # The failure is in redis, as a replay record naming the worker that found it...
    saved = saved_replays(open_database(redis_url))
    assert saved and saved[0].replay.target == broken_driver
    assert saved[0].worker is not None and "seed 100" in saved[0].worker

    # ...and a fresh process with nothing but the database reruns it.
    shutil.rmtree(campaign)
    shutil.rmtree(tmp_path / "failures")
    replayed = _pyimago("replay", "--database", redis_url, "--no-qemu", cwd=tmp_path)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert f"1. {broken_driver}" in replayed.stdout
    assert "replay FAILED against mutant:" in replayed.stderr

    # Hypothesis's own entry too: a one-example run with a seed that does not find the bug
    # on its own (checked against an empty database) fails first thing with this one.
    seed = _first_passing_seed(broken_driver, str(tmp_path / "empty-db"), tmp_path)
    capsys.readouterr()
    again = _pyimago(
        "fuzz", broken_driver, "--database", redis_url, "--profile", "ci", "--examples", "1",
        "--steps", "10", "--seed", str(seed), "--no-progress", "--no-qemu",
        "--failures-dir", str(tmp_path / "third"), cwd=tmp_path,
    )
    assert again.returncode == 1, again.stdout + again.stderr
    assert "OracleFailure" in again.stderr


def test_a_directory_database_keeps_a_failure_for_replay(
    broken_driver: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = str(tmp_path / "db")
    rc = cli.main(["fuzz", broken_driver, "--profile", "ci", "--steps", "10", "--no-progress",
                   "--no-qemu", "--database", database, "--failures-dir", str(tmp_path / "f")])
    assert rc == 1
    capsys.readouterr()
    assert cli.main(["replay", "--database", database, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "1 saved failure(s)" in listed and f"1. {broken_driver}" in listed
    assert cli.main(["replay", "--database", database, "--no-qemu", "--quiet"]) == 1
    assert "still fail" in capsys.readouterr().err
    # Against the driver it was broken from, the same sequence passes.
    assert cli.main(["replay", "--database", database, "--no-qemu", "--quiet",
                     "--target", "chunkmap:target"]) == 0


def test_the_pytest_plugin_saves_to_the_database(
    pytester: pytest.Pytester, broken_driver: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    pytester.makepyfile(test_broken=f"""
        import pytest

        @pytest.mark.pyimago_target({broken_driver!r}, steps=10, qemu_img=None)
        def test_broken():
            pass
    """)
    database = tmp_path / "plugin-db"
    # (Run from tmp_path, where broken_driver.py is importable.)
    result = pytester.runpytest_subprocess(str(pytester.path / "test_broken.py"),
                                           "--pyimago-profile", "ci",
                                           "--pyimago-database", str(database))
    result.assert_outcomes(failed=1)
    assert "--pyimago-database" in pytester.runpytest_subprocess("--help").stdout.str()
    # The database has the failure for pyimago replay (a fresh process reading it alone).
    listed = _pyimago("replay", "--database", str(database), "--list", cwd=tmp_path)
    assert listed.returncode == 0 and f"1. {broken_driver}" in listed.stdout, listed.stdout


@pytest.mark.slow
def test_a_campaign_on_xdist_gateways_merges_every_worker(tmp_path: Path) -> None:
    # Three workers on two gateways (the form a multi-host campaign takes with ssh=...
    # gateways): one gateway runs two workers; every worker's report reaches the summary.
    examples = Path(__file__).resolve().parents[2] / "examples"
    ran = _pyimago(
        "fuzz", "chunkmap:target", "--path", str(examples), "--workers", "3",
        "--tx", "2*popen", "--profile", "ci", "--examples", "3", "--steps", "6",
        "--seed", "7", "--no-progress", "--no-qemu", "--campaign-dir", str(tmp_path / "c"),
        "--json", str(tmp_path / "campaign.json"), "--database", str(tmp_path / "db"),
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    summary = json.loads((tmp_path / "campaign.json").read_text())
    assert summary == json.loads((tmp_path / "c" / "summary.json").read_text())
    workers = sorted(summary["per_worker"], key=lambda w: w["worker"])
    assert [w["seeds"] for w in workers] == [[7], [8], [9]]
    assert all(w["state"] == "passed" and w["stats"]["examples"] >= 3 for w in workers)
    assert summary["stats"]["examples"] == sum(w["stats"]["examples"] for w in workers)
    assert "chunkmap conforms" in ran.stdout and "3 workers" in ran.stdout

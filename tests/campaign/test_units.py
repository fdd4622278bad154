"""Campaign parts on their own: stats as JSON and merged, seeds, database URLs, replay
records, and the command line's up-front checks (one line, exit 2)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from hypothesis.database import DirectoryBasedExampleDatabase
from pyimago.oracle import cli
from pyimago.oracle.database import (
    CAMPAIGN_EXTRA,
    REPLAYS_KEY,
    DatabaseError,
    open_database,
    redact,
    save_replay,
    saved_replays,
)
from pyimago.oracle.fuzz import ConformanceStats
from pyimago.oracle.fuzz._campaign import CampaignSpec
from pyimago.oracle.fuzz._merge import merge_stats, stats_from_json, stats_to_json
from pyimago.oracle.ops import ChainSpec, LayerSpec, Op, OpKind
from pyimago.oracle.replay import Replay


def _stats(examples: int, steps: int, seconds: float, ops: dict[str, int],
           failures: int = 0, replay: tuple[str, ...] = ()) -> ConformanceStats:
    zero = {f.name: 0 for f in dataclasses.fields(ConformanceStats)}
    zero.update(
        target="t", examples=examples, steps=steps, seconds=seconds,
        ops=tuple(sorted(ops.items(), key=lambda kv: -kv[1])), chain_depths=((1, examples),),
        storages=(("memory", steps),), granularities=(), failures=failures,
        replay_files=replay,
    )
    return ConformanceStats(**zero)


def test_stats_survive_json() -> None:
    stats = _stats(3, 20, 1.5, {"write": 7, "read": 2}, failures=1, replay=("a.json",))
    again = stats_from_json(json.loads(json.dumps(stats_to_json(stats))))
    assert again == stats


def test_merged_stats_add_up_and_keep_the_campaign_throughput() -> None:
    a = _stats(3, 20, 2.0, {"write": 7, "read": 2})
    b = _stats(5, 40, 4.0, {"read": 9, "flush": 1}, failures=1, replay=("r.json",))
    side_by_side = merge_stats([a, b], parallel=True)
    assert (side_by_side.examples, side_by_side.steps, side_by_side.failures) == (8, 60, 1)
    assert side_by_side.ops == (("read", 11), ("write", 7), ("flush", 1))
    assert side_by_side.chain_depths == ((1, 8),)
    assert side_by_side.storages == (("memory", 60),)
    assert side_by_side.replay_files == ("r.json",)
    assert side_by_side.seconds == 4.0  # workers ran at the same time
    assert merge_stats([a, b], parallel=False).seconds == 6.0  # rounds ran one after another
    with pytest.raises(ValueError):
        merge_stats([], parallel=True)


def test_text_rows_and_warnings_merge_as_text_and_as_paths_never_taken() -> None:
    a = dataclasses.replace(_stats(1, 5, 1.0, {"write": 1}),
                            paths=(("refcount widths", "16: 2"), ("parallel jobs", "0"),
                                   ("calls by API", "write 1,200, read 3"),
                                   ("chain", "raw over qcow2")),
                            warnings=("no sync call", "no L2-boundary crossing"))
    b = dataclasses.replace(_stats(1, 5, 1.0, {"read": 1}),
                            paths=(("refcount widths", "1: 1, 16: 3"), ("parallel jobs", "0"),
                                   ("calls by API", "read 5, sync 1"),
                                   ("chain", "qcow2 only")),
                            warnings=("no L2-boundary crossing",))
    merged = merge_stats([a, b], parallel=True)
    # Rows that write out a table add up by name; other text is kept per run.
    assert merged.paths == (("refcount widths", "16: 5, 1: 1"), ("parallel jobs", "0"),
                            ("calls by API", "write 1,200, read 8, sync 1"),
                            ("chain", "raw over qcow2 | qcow2 only"))
    assert merged.warnings == ("no L2-boundary crossing",)
    assert stats_from_json(json.loads(json.dumps(stats_to_json(merged)))) == merged


def test_no_two_workers_or_rounds_share_a_seed() -> None:
    spec = CampaignSpec(target="t", workers=3, seed=100, folder="f")
    seeds = [spec.seed_of(w, r) for w in range(3) for r in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert spec.seed_of(0) == 100 and spec.seed_of(2) == 102
    with pytest.raises(ValueError):
        spec.seed_of(3)
    assert CampaignSpec.from_json(spec.to_json()) == spec


def test_duration_rounds_fit_the_time_left() -> None:
    once = CampaignSpec(target="t", workers=2, seed=0, folder="f", examples=25)
    assert once.next_round(1.0, 25, 1.0) is None  # no --duration: one round
    timed = dataclasses.replace(once, duration=600.0)
    assert timed.next_round(0.0, 0, 0.0) == 25
    assert timed.next_round(100.0, 50, 100.0) == 25  # 2 s an example, 500 s left
    assert timed.next_round(560.0, 280, 560.0) == 20  # 40 s left: 20 examples
    assert timed.next_round(599.5, 299, 599.0) is None  # less than half an example left
    assert timed.next_round(600.0, 300, 600.0) is None


def test_database_urls(tmp_path: Path) -> None:
    db = open_database(str(tmp_path / "new"))
    assert isinstance(db, DirectoryBasedExampleDatabase) and (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("x")
    for bad, says in [
        (str(tmp_path / "file"), "not a directory"),
        ("http://example.invalid/db", "unknown scheme 'http'"),
        ("", "name a directory or redis"),
    ]:
        with pytest.raises(DatabaseError, match=says) as info:
            open_database(bad)
        assert bad in str(info.value) and "\n" not in str(info.value)
    # Nobody listens on port 1: named, one line.
    with pytest.raises(DatabaseError, match="cannot use this redis server"):
        open_database("redis://127.0.0.1:1/0")


def test_redis_passwords_are_not_shown() -> None:
    assert redact("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("redis://fuzz:s3cret@db:6379/0") == "redis://fuzz:***@db:6379/0"
    assert redact("redis://db:6379/0") == "redis://db:6379/0"
    assert redact("/some/dir") == "/some/dir"
    with pytest.raises(DatabaseError) as info:
        open_database("redis://:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in str(info.value) and "redis://:***@127.0.0.1:1/0" in str(info.value)


def test_redis_without_the_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the client were not installed
    with pytest.raises(DatabaseError) as info:
        open_database("redis://127.0.0.1:6379/0")
    assert f"pyimago[{CAMPAIGN_EXTRA}]" in str(info.value)
    assert isinstance(info.value, ValueError)


def _replay(n: int) -> Replay:
    chain = ChainSpec((LayerSpec(format="raw", size=65536),), storage="memory")
    return Replay(chain, tuple(Op(OpKind.WRITE, 512 * i, 512) for i in range(n)),
                  "mod:target", "OracleFailure: byte 3 differs")


def test_replay_records_round_trip_once_per_failure(tmp_path: Path) -> None:
    db = open_database(str(tmp_path))
    save_replay(db, _replay(2), worker="worker 0, seed 7")
    save_replay(db, _replay(2), worker="worker 1, seed 8")  # the same failure, found twice
    save_replay(db, _replay(3))
    db.save(REPLAYS_KEY, b"not json")
    saved = saved_replays(db)
    assert [len(s.replay.ops) for s in saved] == [2, 3]
    assert saved[0].worker == "worker 0, seed 7" and saved[0].replay == _replay(2)
    assert "mod:target: 2 operations" in saved[0].describe()
    assert "OracleFailure: byte 3 differs" in saved[0].describe()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["fuzz", "chunkmap:target", "--workers", "0"], "--workers: must be at least 1"),
        (["fuzz", "chunkmap:target", "--workers", "2", "--duration", "0"], "--duration"),
        (["fuzz", "chunkmap:target", "--workers", "2", "--database", "ftp://x"], "ftp://x"),
        (["fuzz", "chunkmap:target", "--database", "ftp://x"], "ftp://x"),
        (["fuzz", "no_such_module_here:t", "--workers", "2"], "cannot load"),
        (["fuzz", "chunkmap:target", "--tx", "popen"], "need --workers N"),
        (["fuzz", "chunkmap:target", "--workers", "2", "--seed", "-1"], "--seed -1"),
        (["run", "--database", "ftp://x"], "ftp://x"),
        (["replay"], "name a replay file or --database"),
        (["replay", __file__, "--database", "db"], "name a replay file or --database"),
        (["replay", "--database", "ftp://x"], "ftp://x"),
    ],
)
def test_bad_campaign_arguments_are_one_line_exit_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err


def test_workers_without_xdist_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "xdist", None)  # as if pytest-xdist were not installed
    assert cli.main(["fuzz", "chunkmap:target", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs xdist" in err and "pyimago[campaign]" in err and "\n" not in err


def test_an_empty_database_lists_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["replay", "--database", str(tmp_path)]) == 0
    assert "0 saved failure(s)" in capsys.readouterr().out


def test_pyimago_run_hands_the_database_to_hypothesis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []

    def fake_run(machine: object, *, settings: object) -> None:
        seen.append(getattr(settings, "database", None))

    monkeypatch.setattr(cli, "run_state_machine_as_test", fake_run)
    database = tmp_path / "db"
    assert cli.main(["run", "--database", str(database), "--no-progress", "--no-qemu",
                     "--examples", "1"]) == 0
    (db,) = seen
    assert isinstance(db, DirectoryBasedExampleDatabase) and Path(db.path) == database

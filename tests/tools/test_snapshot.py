"""pyimago.tools snapshot -c/-a/-d and convert -l, differentially against qemu-img."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyimago.reference import UnsupportedError
from pyimago.tools import ToolError
from pyimago.tools._cli import convert_main, snapshot_main
from pyimago.tools._common import implementation
from pyimago.tools._snapshot import SnapshotKey, find_snapshot, parse_snapshot_key

from .conftest import IMPLS, assert_qemu_check_clean, qemu_img

pytestmark = pytest.mark.qemu


def _io(path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True, timeout=60)


def _snapshotted(path: Path) -> Path:
    """A qcow2 image with two snapshots taken at different contents and sizes: s1 (ID 1)
    over 1 MiB, "1" (ID 2, a name that is another snapshot's ID) over 2 MiB, then more writes."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "1M")
    _io(path, "write -P 0x11 0 64k", "write -P 0x12 200k 5000")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_img("resize", "-q", path, "2M")
    _io(path, "write -P 0x21 32k 64k", "write -z 200k 4k", "write -P 0x22 1536k 8k")
    qemu_img("snapshot", "-c", "1", path)
    _io(path, "write -P 0x31 0 4k", "discard 1536k 4k", "write -P 0x32 1900k 64k")
    return path


def _raw(path: Path, out: Path, *args: str) -> bytes:
    qemu_img("convert", "-O", "raw", *args, path, out)
    return out.read_bytes()


KEYS = ["s1", "1", "2", "snapshot.id=1", "snapshot.name=1", "snapshot.name=s1",
        "snapshot.id=2,snapshot.name=1"]


@pytest.mark.clause("tools.convert.snapshot")
@pytest.mark.parametrize("impl", IMPLS)
def test_convert_snapshot_matches_qemu(impl: str, tmp_path: Path) -> None:
    image = _snapshotted(tmp_path / "snap.qcow2")
    for index, key in enumerate(KEYS):
        theirs = _raw(image, tmp_path / "qemu.raw", "-l", key)
        assert convert_main(["--impl", impl, "-l", key, str(image),
                             str(tmp_path / "ours.raw")]) == 0, key
        assert (tmp_path / "ours.raw").read_bytes() == theirs, key
        if index % 3 == 0:  # to qcow2 too: clean, same guest contents
            out = tmp_path / f"ours-{index}.qcow2"
            assert convert_main(["--impl", impl, "-O", "qcow2", "-l", key, str(image),
                                 str(out)]) == 0
            assert_qemu_check_clean(out)
            assert _raw(out, tmp_path / "back.raw") == theirs
    # Not a snapshot: the current state, which no snapshot has.
    assert _raw(image, tmp_path / "now.raw") != theirs


@pytest.mark.clause("tools.cli.errors")
@pytest.mark.parametrize("key", ["nope", "snapshot.id=1,snapshot.name=1", "snapshot.id=3",
                                 "snapshot.foo=1", "snapshot.id", ""])
def test_convert_unknown_snapshot_is_refused(key: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    image = _snapshotted(tmp_path / "snap.qcow2")
    assert qemu_img("convert", "-l", key, image, tmp_path / "q.raw", ok=(1,)).returncode == 1
    assert convert_main(["-l", key, str(image), str(tmp_path / "out.raw")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.raw").exists()


def test_snapshot_keys_follow_qemus_lookup() -> None:
    from pyimago.reference import SnapshotInfo

    def sn(sid: str, name: str) -> SnapshotInfo:
        return SnapshotInfo(sid, name, 0, 0, 0, 0, 1 << 20, None)

    table = [sn("1", "2"), sn("2", "a"), sn("3", "a")]
    assert find_snapshot(table, parse_snapshot_key("2"), "x").id == "2"  # ID before name
    assert find_snapshot(table, parse_snapshot_key("a"), "x").id == "2"  # first in table
    assert find_snapshot(table, parse_snapshot_key("snapshot.name=2"), "x").id == "1"
    assert find_snapshot(table, SnapshotKey(id="3", name="a"), "x").id == "3"
    with pytest.raises(ToolError, match=r"snapshot\.id=3,snapshot\.name=2"):
        find_snapshot(table, parse_snapshot_key("snapshot.id=3,snapshot.name=2"), "x")


# -- snapshot -c / -a / -d --------------------------------------------------------------------


def _require_snapshot_writes(impl: str, folder: Path) -> None:
    """Skip (loudly) where the implementation cannot take a snapshot yet (issue 13)."""
    module = implementation(impl)
    probe = folder / "probe.qcow2"
    module.create_image(str(probe), 1 << 20)
    image = module.open_image(str(probe), writable=True)
    try:
        image.create_snapshot("probe")
    except (AttributeError, UnsupportedError) as exc:
        pytest.skip(f"pyimago.{impl} does not write internal snapshots yet: {exc}")
    finally:
        image.close()
        probe.unlink()


def _listing(path: Path) -> list[tuple[str, str, int]]:
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    return [(s["id"], s["name"], s["vm-state-size"]) for s in info.get("snapshots", [])]


@pytest.mark.clause("tools.snapshot.write")
@pytest.mark.parametrize("impl", IMPLS)
def test_snapshot_create_apply_delete_match_qemu(impl: str, tmp_path: Path) -> None:
    _require_snapshot_writes(impl, tmp_path)
    ours = _snapshotted(tmp_path / "ours.qcow2")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    steps: list[tuple[str, str]] = [("-c", "fresh"), ("-a", "s1"), ("-c", "after-s1"),
                                    ("-d", "1"), ("-a", "fresh"), ("-d", "s1"), ("-a", "3")]
    for flag, name in steps:
        qemu_img("snapshot", flag, name, theirs)
        assert snapshot_main(["--impl", impl, flag, name, str(ours)]) == 0, (flag, name)
        assert_qemu_check_clean(ours)
        assert _listing(ours) == _listing(theirs), (flag, name)
        assert qemu_img("compare", ours, theirs).returncode == 0, (flag, name)
        # Every snapshot left reads as qemu-img's copy of it.
        for sid, _, _ in _listing(theirs):
            assert _raw(ours, tmp_path / "o.raw", "-l", f"snapshot.id={sid}") == _raw(
                theirs, tmp_path / "t.raw", "-l", f"snapshot.id={sid}"), (flag, name, sid)
    # qemu-img reads what we wrote; we read what qemu-img wrote.
    assert snapshot_main(["--impl", impl, "-l", str(theirs)]) == 0


@pytest.mark.clause("tools.snapshot.write")
@pytest.mark.parametrize("impl", IMPLS)
def test_snapshot_on_a_new_image_and_an_overlay(impl: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _require_snapshot_writes(impl, tmp_path)
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    _io(base, "write -P 0x41 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top,
             cwd=tmp_path)
    before = _raw(top, tmp_path / "before.raw")
    base_bytes = base.read_bytes()
    assert snapshot_main(["--impl", impl, "-c", "empty", str(top)]) == 0
    _io(top, "write -P 0x42 4k 8k")
    assert snapshot_main(["--impl", impl, "-a", "empty", str(top)]) == 0
    assert _raw(top, tmp_path / "after.raw") == before
    assert base.read_bytes() == base_bytes  # only the top image is touched
    assert_qemu_check_clean(top)
    assert snapshot_main(["--impl", impl, "-l", str(top)]) == 0
    assert capsys.readouterr().out == qemu_img("snapshot", "-l", top).stdout


def _expect_one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.clause("tools.cli.errors")
def test_snapshot_errors_leave_the_image_alone(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    image = _snapshotted(tmp_path / "snap.qcow2")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(4096))
    before = image.read_bytes()
    calls: list[tuple[list[str], str]] = [
        (["-c", "s1", str(image)], "s1"),         # name in use (pyimago keeps names unique)
        (["-a", "nope", str(image)], "nope"),
        (["-d", "2", str(image)], "'2'"),         # -d looks names up, and "2" is an ID only
        (["-c", "x", str(raw)], "raw"),
        (["-c", "", str(image)], "-c"),
    ]
    for argv, needle in calls:
        assert snapshot_main(argv) == 2, argv
        assert needle in _expect_one_line(capsys), argv
    assert image.read_bytes() == before


@pytest.mark.clause("tools.snapshot.write")
@pytest.mark.parametrize("impl", IMPLS)
def test_snapshot_round_trip_on_the_corpus_matches_qemu(qemu_corpus: list[Any], impl: str,
                                                        tmp_path: Path) -> None:
    """On copies of every small qcow2 corpus image (v2/v3, cluster sizes, compressed, zero
    clusters, overlays, images with snapshots): take one, revert to the oldest, delete
    the new one -- as qemu-img does on its own copy."""
    _require_snapshot_writes(impl, tmp_path)
    done = 0
    for spec in qemu_corpus:
        if spec.fmt != "qcow2" or spec.path.stat().st_size > 32 << 20:
            continue
        # The recipe's whole folder (build_one makes <corpus>/<name>/): backing files too.
        home = next(p for p in spec.path.parents if p.name == spec.name)
        rel = spec.path.relative_to(home)
        folder = tmp_path / spec.name
        for side in ("ours", "theirs"):
            shutil.copytree(home, folder / side)
        ours, theirs = folder / "ours" / rel, folder / "theirs" / rel
        first = (_listing(theirs) or [("", "pyimago-new", 0)])[0][1]
        for flag, name in (("-c", "pyimago-new"), ("-a", first), ("-d", "pyimago-new")):
            refused = qemu_img("snapshot", flag, name, theirs, ok=(0, 1)).returncode == 1
            status = snapshot_main(["--impl", impl, flag, name, str(ours)])
            # Refused by both alike (1-bit refcounts cannot count a second reference).
            assert status == (2 if refused else 0), (spec.name, flag)
            assert_qemu_check_clean(ours)
            if refused:
                assert qemu_img("compare", ours, theirs).returncode == 0
                break
            assert [s[:2] for s in _listing(ours)] == [s[:2] for s in _listing(theirs)]
            assert qemu_img("compare", ours, theirs).returncode == 0, (spec.name, flag, name)
        done += 1
    assert done >= 10

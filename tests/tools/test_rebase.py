"""pyimago.tools rebase in place: images with internal snapshots and qcow2 features, against
qemu-img rebase on copies of the same images."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pyimago.tools._cli import rebase_main

from .conftest import IMPLS, assert_qemu_check_clean, held_by_qemu_io, qemu_img, qemu_json

pytestmark = [pytest.mark.qemu, pytest.mark.clause("tools.rebase.snapshots")]


def _io(path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True, timeout=60)


def _snapshotted_chain(folder: Path, top_options: str = "cluster_size=4k") -> Path:
    """old.qcow2 <- top.qcow2 with two snapshots taken at different states (the active
    layer moved on after each), and new.qcow2, which reads differently from old."""
    folder.mkdir()
    old, new, top = folder / "old.qcow2", folder / "new.qcow2", folder / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", old, "4M")
    _io(old, "write -P 0x11 0 1M", "write -P 0x22 2M 512k", "write -P 0x33 3M 4k")
    qemu_img("create", "-q", "-f", "qcow2", new, "3M")  # shorter: past it reads zero
    _io(new, "write -P 0x11 0 512k", "write -P 0x77 1M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", top_options, "-b", "old.qcow2",
             "-F", "qcow2", top, cwd=folder)
    _io(top, "write -P 0x44 4k 8k", "write -z 512k 64k")
    qemu_img("snapshot", "-c", "first", top)
    _io(top, "write -P 0x55 2052k 3000", "discard 0 4k")
    qemu_img("snapshot", "-c", "second", top)
    _io(top, "write -P 0x66 3M 4k", "write -P 0x67 64k 4k")
    return top


def _contents(path: Path, tmp: Path, snapshot: str | None = None) -> bytes:
    out = tmp / "contents.raw"
    qemu_img("convert", *(["-l", snapshot] if snapshot else []), "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["safe", "unsafe", "standalone"])
def test_rebase_with_snapshots_matches_qemu(impl: str, mode: str, tmp_path: Path) -> None:
    """Only the active layer is rebased (as qemu-img): the snapshot table is unchanged, and
    each snapshot reads as after qemu-img rebase (through the new backing file)."""
    ours = _snapshotted_chain(tmp_path / "ours")
    theirs = _snapshotted_chain(tmp_path / "qemu")
    shutil.copyfile(ours, theirs)  # the same snapshot table (dates included)
    before = _contents(ours, tmp_path)
    args = {"safe": ["-b", "new.qcow2", "-F", "qcow2"],
            "unsafe": ["-u", "-b", "new.qcow2", "-F", "qcow2"],
            "standalone": ["-b", ""]}[mode]
    listing = qemu_img("snapshot", "-l", ours).stdout
    qemu_img("rebase", "-q", *args, theirs.name, cwd=theirs.parent)
    assert rebase_main(["--impl", impl, *args, str(ours)]) == 0
    assert_qemu_check_clean(ours)
    assert qemu_img("snapshot", "-l", ours).stdout.replace(str(ours), "") == \
        listing.replace(str(ours), "")
    info = qemu_json("info", ours)
    assert info.get("backing-filename") == (None if mode == "standalone" else "new.qcow2")
    assert info.get("backing-filename-format") == (None if mode == "standalone" else "qcow2")
    assert _contents(ours, tmp_path) == _contents(theirs, tmp_path)
    if mode != "unsafe":
        assert _contents(ours, tmp_path) == before
    for snapshot in ("first", "second"):
        assert _contents(ours, tmp_path, snapshot) == _contents(theirs, tmp_path, snapshot), \
            snapshot
    # The snapshots still apply (qemu-img snapshot -a) and leave a clean image.
    qemu_img("snapshot", "-a", "first", ours)
    assert_qemu_check_clean(ours)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", ["cluster_size=16k,extended_l2=on",
                                     "cluster_size=4k,lazy_refcounts=on",
                                     "compat=0.10,cluster_size=512"])
def test_rebase_keeps_the_overlays_features(impl: str, options: str, tmp_path: Path) -> None:
    """In place: the overlay keeps its layout and features (extended L2, lazy refcounts,
    v2), which a rewritten copy would have lost."""
    ours = _snapshotted_chain(tmp_path / "ours", options)
    theirs = tmp_path / "qemu" / "top.qcow2"
    shutil.copytree(ours.parent, theirs.parent)
    qemu_img("rebase", "-q", "-b", "new.qcow2", "-F", "qcow2", theirs.name, cwd=theirs.parent)
    assert rebase_main(["--impl", impl, "-b", "new.qcow2", "-F", "qcow2", str(ours)]) == 0
    assert_qemu_check_clean(ours)
    ours_data = qemu_json("info", ours)["format-specific"]["data"]
    theirs_data = qemu_json("info", theirs)["format-specific"]["data"]
    for key in ("compat", "extended-l2", "lazy-refcounts", "refcount-bits"):
        assert ours_data.get(key) == theirs_data.get(key), key
    for snapshot in (None, "first", "second"):
        assert _contents(ours, tmp_path, snapshot) == _contents(theirs, tmp_path, snapshot)


@pytest.mark.clause("tools.cli.errors")
def test_rebase_of_a_locked_image_is_refused_and_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top = _snapshotted_chain(tmp_path / "c")
    before = top.read_bytes()
    with held_by_qemu_io(top):
        assert rebase_main(["-b", "new.qcow2", "-F", "qcow2", str(top)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "lock" in err and str(top) in err, err
    assert top.read_bytes() == before


def test_rebase_backing_format_extension_layout_matches_qemu(tmp_path: Path) -> None:
    """The header cluster we write is the one qemu-img writes (header, backing format
    extension first, feature table, end marker, name)."""
    ours = _snapshotted_chain(tmp_path / "ours")
    theirs = tmp_path / "qemu" / "top.qcow2"
    shutil.copytree(ours.parent, theirs.parent)
    for path, run in ((theirs, None), (ours, rebase_main)):
        args = ["-u", "-b", "new.qcow2", "-F", "qcow2"]
        if run is None:
            qemu_img("rebase", "-q", *args, path.name, cwd=path.parent)
        else:
            assert run([*args, str(path)]) == 0
    cluster = 4096
    assert ours.read_bytes()[:cluster] == theirs.read_bytes()[:cluster]
    assert_qemu_check_clean(ours)

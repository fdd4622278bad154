"""pyimago.tools commit, rebase and snapshot against qemu-img's."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pyimago.tools._cli import commit_main, rebase_main, snapshot_main

from .conftest import IMPLS, assert_qemu_check_clean, qemu_img

pytestmark = pytest.mark.qemu


def _io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True, timeout=60)


def _chain(folder: Path, name: str) -> Path:
    """base.qcow2 (patterns) <- NAME.qcow2 (writes, zeroes, a discard), 4 MiB, 4k clusters
    under 64k: partial clusters, zero clusters and holes over data."""
    folder.mkdir()
    base, top = folder / "base.qcow2", folder / f"{name}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    _io(base, "write -P 0x11 0 1M", "write -P 0x22 2M 512k", "write -P 0x33 3M 4k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2",
             "-F", "qcow2", top, cwd=folder)
    _io(top, "write -P 0x44 4k 8k", "write -z 512k 64k", "write -P 0x55 2052k 3000",
        "write -P 0x66 3M 4k", "discard 0 4k")
    return top


def _raw(path: Path, tmp: Path) -> bytes:
    out = tmp / f"{path.name}.{path.parent.name}.raw"
    qemu_img("convert", "-O", "raw", path, out)
    return out.read_bytes()


@pytest.mark.clause("tools.commit.backing")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("keep", [False, True])
def test_commit_matches_qemu(impl: str, keep: bool, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    ours, theirs = _chain(tmp_path / "ours", "top"), _chain(tmp_path / "qemu", "top")
    before = _raw(ours, tmp_path)
    flags = ["-d"] if keep else []
    qemu_img("commit", "-q", *flags, theirs)
    assert commit_main(["--impl", impl, *flags, str(ours)]) == 0
    assert capsys.readouterr().out == "Image committed.\n"
    for image in (ours, ours.parent / "base.qcow2"):
        assert_qemu_check_clean(image)
    # The base now holds what the overlay showed, exactly as qemu-img's commit left it.
    assert _raw(ours.parent / "base.qcow2", tmp_path) == before
    assert qemu_img("compare", ours.parent / "base.qcow2",
                    theirs.parent / "base.qcow2").returncode == 0
    assert _raw(ours, tmp_path) == before
    own = [e for e in json.loads(qemu_img("map", "--output=json", ours).stdout)
           if e["depth"] == 0 and e["present"]]
    assert bool(own) == keep


def _deep_chain(folder: Path) -> Path:
    """b0 <- b1 <- b2 <- top, all qcow2 (b0 and b1 1 MiB, b2 and top 2 MiB: the base may
    need to grow), each layer holding data, zeroes or a discard over what lies below."""
    folder.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", folder / "b0.qcow2", "1M")
    _io(folder / "b0.qcow2", "write -P 0x10 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "b0.qcow2", "-F",
             "qcow2", folder / "b1.qcow2", "1M", cwd=folder)
    _io(folder / "b1.qcow2", "write -P 0x21 64k 100k", "write -z 300k 8k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2",
             folder / "b2.qcow2", "2M", cwd=folder)
    _io(folder / "b2.qcow2", "write -P 0x32 128k 4k", "write -z 0 64k",
        "write -P 0x33 1536k 70k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "b2.qcow2", "-F",
             "qcow2", folder / "top.qcow2", cwd=folder)
    _io(folder / "top.qcow2", "write -P 0x44 1000 3000", "write -z 200k 1k",
        "discard 1536k 4k")
    return folder / "top.qcow2"


@pytest.mark.clause("tools.commit.base")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("base", "how"), [("b0.qcow2", "name"), ("b1.qcow2", "path"),
                                           ("b2.qcow2", "path")])
def test_commit_into_a_deeper_base_matches_qemu(impl: str, base: str, how: str,
                                                tmp_path: Path) -> None:
    ours, theirs = _deep_chain(tmp_path / "ours"), _deep_chain(tmp_path / "qemu")
    before = _raw(ours, tmp_path)
    middle = {p.name: p.read_bytes() for p in ours.parent.iterdir()
              if p.name not in (base, "top.qcow2")}
    top_bytes = ours.read_bytes()
    qemu_img("commit", "-q", "-b", base, theirs.name, cwd=theirs.parent)
    given = base if how == "name" else str(ours.parent / base)
    # A name as the chain records it is looked up from the overlay, not the current folder.
    assert commit_main(["--impl", impl, "-q", "-b", given, str(ours)]) == 0
    assert_qemu_check_clean(ours.parent / base)
    assert _raw(ours.parent / base, tmp_path) == _raw(theirs.parent / base, tmp_path)
    assert _raw(ours, tmp_path) == before
    # -b implies -d: the overlay keeps its data; the layers between are not touched.
    assert ours.read_bytes() == top_bytes
    assert {n: (ours.parent / n).read_bytes() for n in middle} == middle


@pytest.mark.clause("tools.rebase.backing")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["safe", "unsafe", "standalone"])
def test_rebase_matches_qemu(impl: str, mode: str, tmp_path: Path) -> None:
    ours, theirs = _chain(tmp_path / "ours", "top"), _chain(tmp_path / "qemu", "top")
    for folder in (ours.parent, theirs.parent):
        other = folder / "other.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", other, "4M")
        _io(other, "write -P 0x11 0 512k", "write -P 0x77 1M 1M")
    before = _raw(ours, tmp_path)
    args = {"safe": ["-b", "other.qcow2", "-F", "qcow2"],
            "unsafe": ["-u", "-b", "other.qcow2", "-F", "qcow2"],
            "standalone": ["-b", ""]}[mode]
    qemu_img("rebase", "-q", *args, theirs.name, cwd=theirs.parent)
    assert rebase_main(["--impl", impl, *args, str(ours)]) == 0
    assert_qemu_check_clean(ours)
    info = json.loads(qemu_img("info", "--output=json", ours).stdout)
    assert info.get("backing-filename") == (None if mode == "standalone" else "other.qcow2")
    assert _raw(ours, tmp_path) == _raw(theirs, tmp_path)
    if mode != "unsafe":
        assert _raw(ours, tmp_path) == before  # safe rebases keep the guest contents


@pytest.mark.clause("tools.cli.errors")
def test_commit_and_rebase_refuse_up_front(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    top = _chain(tmp_path / "c", "top")
    alone = tmp_path / "alone.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", alone, "1M")
    snap = tmp_path / "snap.qcow2"
    shutil.copyfile(alone, snap)
    qemu_img("snapshot", "-c", "s1", snap)
    snapshot_bytes = snap.read_bytes()
    top_bytes = top.read_bytes()
    calls = [
        (commit_main, [str(alone)]),                                  # no backing file
        (commit_main, ["-b", str(alone), str(top)]),                   # not its backing
        (commit_main, [str(tmp_path / "missing.qcow2")]),
        (rebase_main, ["-b", "base.qcow2", str(top)]),                 # no -F
        (rebase_main, ["-b", "nope.qcow2", "-F", "qcow2", str(top)]),  # missing backing
        (rebase_main, [str(top)]),                                     # no -b
        (rebase_main, ["-u", "-b", "x" * 1100, "-F", "raw", str(snap)]),  # name too long
        (snapshot_main, ["-c", "s1", str(snap)]),                     # name in use
        (snapshot_main, ["-d", "1", str(snap)]),                      # -d takes a name
        (snapshot_main, ["-a", "s2", str(snap)]),                     # no such snapshot
        (snapshot_main, [str(snap)]),                                  # no action
    ]
    for main, argv in calls:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert snap.read_bytes() == snapshot_bytes and top.read_bytes() == top_bytes
    assert sorted(p.name for p in top.parent.iterdir()) == ["base.qcow2", "top.qcow2"]


@pytest.mark.clause("tools.info.json")
def test_snapshot_list_matches_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    image = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    assert snapshot_main(["-l", str(image)]) == 0
    assert capsys.readouterr().out == qemu_img("snapshot", "-l", image).stdout == ""
    for name in ("first", "a-much-longer-snapshot-name"):
        qemu_img("snapshot", "-c", name, image)
    assert snapshot_main(["-l", str(image)]) == 0
    assert capsys.readouterr().out == qemu_img("snapshot", "-l", image).stdout

"""pyimago.tools create and resize against qemu-img create and resize."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyimago.tools._cli import create_main, resize_main

from .conftest import IMPLS, QCOW2_FEATURES, assert_qemu_check_clean, qemu_img

pytestmark = pytest.mark.qemu

_CREATES = [
    ["-f", "qcow2"],
    ["-f", "qcow2", "-o", "cluster_size=4k,compat=0.10,preallocation=metadata"],
    ["-f", "qcow2", "-o", "refcount_bits=1,compression_type=zstd"],
    ["-f", "qcow2", "-o", "cluster_size=512,preallocation=full"],
    ["-f", "qcow2", "-o", "compat=1.1,preallocation=off"],
    ["-f", "raw"],
    ["-f", "raw", "-o", "preallocation=full"],
]


def _info(path: Path, cwd: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(
        qemu_img("info", "--output=json", path.name, cwd=cwd).stdout
    )
    record.pop("actual-size")  # depends on the file system's allocation habits
    return record


@pytest.mark.clause("tools.create.image")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args", _CREATES, ids=lambda a: " ".join(a))
def test_create_matches_qemu(args: list[str], impl: str, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    theirs = qemu_img("create", *args, "qemu.img", "3M", cwd=tmp_path).stdout
    assert create_main(["--impl", impl, *args, "ours.img", "3M"]) == 0
    assert capsys.readouterr().out == theirs.replace("qemu.img", "ours.img")
    ours_info, qemu_info = _info(tmp_path / "ours.img", tmp_path), _info(
        tmp_path / "qemu.img", tmp_path)
    ours_info["filename"] = qemu_info["filename"]
    assert ours_info == qemu_info
    if args[1] == "qcow2":
        assert_qemu_check_clean(tmp_path / "ours.img")
    assert qemu_img("compare", "ours.img", "qemu.img", cwd=tmp_path).returncode == 0


@pytest.mark.clause("tools.create.image")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", QCOW2_FEATURES)
def test_create_with_new_qcow2_features_matches_qemu(
        options: str, impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "qemu"
    ours.mkdir()
    theirs.mkdir()
    expected = qemu_img("create", "-f", "qcow2", "-o", options, "img.qcow2", "3M",
                        cwd=theirs).stdout
    monkeypatch.chdir(ours)
    status = create_main(["--impl", impl, "-f", "qcow2", "-o", options, "img.qcow2", "3M"])
    out, err = capsys.readouterr()
    if status == 2 and "support" in err:
        pytest.skip(f"pyimago.{impl} does not create {options} images yet: {err.strip()}")
    assert status == 0, err
    assert out == expected
    assert _info(ours / "img.qcow2", ours) == _info(theirs / "img.qcow2", theirs)
    assert_qemu_check_clean(ours / "img.qcow2")
    for folder in (ours, theirs):
        subprocess.run(["qemu-io", "-c", "write -P 0x3c 100k 200k", "img.qcow2"], cwd=folder,
                       check=True, capture_output=True, timeout=60)
    assert qemu_img("compare", ours / "img.qcow2", theirs / "img.qcow2").returncode == 0


@pytest.mark.clause("tools.create.image")
def test_create_with_backing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "5M", cwd=tmp_path)
    theirs = qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "q.qcow2",
                      cwd=tmp_path).stdout
    assert create_main(["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "o.qcow2"]) == 0
    assert capsys.readouterr().out == theirs.replace("q.qcow2", "o.qcow2")
    ours, qemu = _info(tmp_path / "o.qcow2", tmp_path), _info(tmp_path / "q.qcow2", tmp_path)
    ours["filename"] = qemu["filename"]
    assert ours == qemu
    assert_qemu_check_clean(tmp_path / "o.qcow2")
    # -u: the backing file need not exist; its format and the size must be given.
    assert create_main(["-q", "-f", "qcow2", "-u", "-b", "later.raw", "-F", "raw",
                        "u.qcow2", "1M"]) == 0
    assert json.loads(qemu_img("info", "-U", "--output=json", "--backing-chain", "u.qcow2",
                               ok=(0, 1), cwd=tmp_path).stdout or "[]") == []


@pytest.mark.clause("tools.cli.errors")
@pytest.mark.parametrize(
    "argv",
    [["-f", "qcow2", "-b", "base.qcow2", "x.qcow2"],          # no -F
     ["-f", "qcow2", "-b", "missing", "-F", "raw", "x.qcow2"],  # backing does not open
     ["-f", "raw", "-b", "base.qcow2", "-F", "qcow2", "x.raw", "1M"],
     ["-f", "qcow2", "x.qcow2"],                               # no size
     ["-f", "qcow2", "-o", "cluster_size=1000", "x.qcow2", "1M"],
     ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "x.qcow2", "1M"],
     ["-f", "vmdk", "x.vmdk", "1M"],
     ["-f", "qcow2", "x.qcow2", "1Q"]],
)
def test_create_bad_arguments_exit_2_and_create_nothing(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path)
    assert create_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2"]


_RESIZES = [
    ([], "+1M"),
    ([], "8M"),
    (["--shrink"], "-1M"),
    (["--shrink"], "1536K"),
    (["--preallocation=metadata"], "+3M"),
    (["--preallocation=full"], "+1M"),
    (["--preallocation=falloc"], "6M"),
]


@pytest.mark.clause("tools.resize.size")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("flags", "size"), _RESIZES)
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resize_matches_qemu(fmt: str, flags: list[str], size: str, impl: str,
                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("ours", "qemu"):
        path = tmp_path / name
        qemu_img("create", "-q", "-f", fmt, "-o", "cluster_size=4096" if fmt == "qcow2"
                 else "preallocation=off", path, "4M")
        subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x61 0 3M", str(path)],
                       check=True, capture_output=True, timeout=60)
    theirs = qemu_img("resize", "-f", fmt, *flags, tmp_path / "qemu", "--", size, ok=(0, 1))
    status = resize_main(["--impl", impl, "-f", fmt, *flags, str(tmp_path / "ours"), "--", size])
    if theirs.returncode:
        assert status == 2, theirs.stderr  # e.g. raw has no metadata to preallocate
        return
    assert status == 0
    assert capsys.readouterr().out == "Image resized.\n"
    ours = json.loads(qemu_img("info", "--output=json", "-f", fmt, tmp_path / "ours").stdout)
    qemu = json.loads(qemu_img("info", "--output=json", "-f", fmt, tmp_path / "qemu").stdout)
    assert ours["virtual-size"] == qemu["virtual-size"]
    if fmt == "qcow2":
        assert_qemu_check_clean(tmp_path / "ours")
    assert qemu_img("compare", "-f", fmt, "-F", fmt, tmp_path / "ours",
                    tmp_path / "qemu").returncode == 0


@pytest.mark.clause("tools.cli.errors")
def test_resize_refuses_before_changing_anything(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    before = path.read_bytes()
    for argv in (["-1M"], ["1M"], ["--preallocation=full", "--shrink", "1M"], ["+lots"],
                 ["--preallocation=sometimes", "+1M"], ["+1000"], ["-5G"]):
        assert resize_main([str(path), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, argv
    assert path.read_bytes() == before
    assert resize_main([str(tmp_path / "missing.qcow2"), "1M"]) == 2


@pytest.mark.clause("tools.cli.errors")
@pytest.mark.parametrize("backing", ["img.qcow2", "./img.qcow2", "sub/../img.qcow2"])
def test_create_over_its_own_backing_file_is_refused_and_keeps_the_image(
        backing: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """qemu-img: "Trying to create an image with the same filename as the backing file"
    (pyimago also catches other spellings of the same file, which qemu-img would overwrite
    with an image that is its own backing file)."""
    (tmp_path / "sub").mkdir()
    image = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    subprocess.run(["qemu-io", "-c", "write -P 0x3c 0 64k", str(image)], check=True,
                   capture_output=True, timeout=60)
    before = image.read_bytes()
    assert create_main(["-f", "qcow2", "-b", backing, "-F", "qcow2", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same filename" in err
    assert image.read_bytes() == before
    assert qemu_img("create", "-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", "img.qcow2",
                    cwd=tmp_path, ok=(1,)).returncode == 1


@pytest.mark.clause("tools.cli.errors")
def test_a_create_the_file_system_refuses_names_the_image_and_leaves_no_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """qcow2 metadata preallocation of 100 TiB: the L2 tables fit in the free space check
    only where the file system has room for them, and the file itself is then larger than
    ext4 and xfs files may be (EFBIG); either way one line naming the image, and the partial
    file this call made is gone."""
    image = tmp_path / "huge.qcow2"
    status = create_main(["-f", "qcow2", "-o", "preallocation=metadata,cluster_size=2M",
                          str(image), "100T"])
    err = capsys.readouterr().err
    if status == 0:  # a file system that holds 100 TiB files (tmpfs, btrfs): nothing to see
        image.unlink()
        pytest.skip("this file system accepts a 100 TiB file")
    assert status == 2
    assert err.count("\n") == 1 and "huge.qcow2" in err and "Traceback" not in err, err
    assert not image.exists()

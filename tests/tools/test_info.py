"""pyimago.tools info against qemu-img info, on the QEMU corpus and the peer images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyimago.tools import image_info, render_info
from pyimago.tools._cli import info_main
from pyimago.tools._common import size_to_str

from .conftest import IMPLS, QCOW2_FEATURES, peer_names, qemu_img, qemu_json

pytestmark = pytest.mark.qemu


def _ours(path: Path, impl: str, cwd: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "pyimago.tools", "info", "--impl", impl, "--output=json",
         "--backing-chain", str(path.relative_to(cwd))],
        capture_output=True, text=True, cwd=cwd, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    records: list[dict[str, Any]] = json.loads(proc.stdout)
    return records


@pytest.mark.clause("tools.info.json")
@pytest.mark.parametrize("impl", IMPLS)
def test_info_json_matches_qemu_on_corpus(qemu_corpus: list[Any], impl: str) -> None:
    for spec in qemu_corpus:
        cwd = spec.path.parent.parent
        rel = spec.path.relative_to(cwd)
        theirs = qemu_json("info", "--backing-chain", rel, cwd=cwd)
        ours = _ours(spec.path, impl, cwd)
        assert ours == theirs, spec.name


@pytest.mark.clause("tools.info.json")
@pytest.mark.parametrize("impl", IMPLS)
def test_info_human_matches_qemu_on_corpus(
    qemu_corpus: list[Any], impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for spec in qemu_corpus:
        cwd = spec.path.parent.parent
        rel = str(spec.path.relative_to(cwd))
        theirs = qemu_img("info", "--backing-chain", rel, cwd=cwd).stdout
        monkeypatch.chdir(cwd)
        ours = render_info(image_info(rel, impl=impl, backing_chain=True), backing_chain=True)
        assert ours == theirs, spec.name


@pytest.mark.clause("tools.info.json")
@pytest.mark.parametrize("name", peer_names())
def test_info_json_matches_qemu_on_peer_images(peer_folder: Path, name: str) -> None:
    path = peer_folder / name
    proc = qemu_img("info", "--output=json", path, ok=(0, 1))
    ours_status = info_main(["--output=json", str(path)])
    if proc.returncode != 0:
        assert ours_status == 2, f"qemu-img refuses {name}, we accept it"
        return
    try:
        ours = image_info(str(path))
    except Exception as exc:  # recorded refusals: features pyimago does not implement
        assert ours_status == 2
        pytest.skip(f"{name}: pyimago refuses it: {exc}")
    theirs = json.loads(proc.stdout)
    assert ours == [theirs]


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 B"), (512, "512 B"), (1023, "0.999 KiB"), (1024, "1 KiB"), (729088, "712 KiB"),
     (1114112, "1.06 MiB"), (4 << 20, "4 MiB"), (10 << 30, "10 GiB")],
)
def test_size_to_str_is_qemus(value: int, text: str) -> None:
    assert size_to_str(value) == text


@pytest.mark.clause("tools.cli.errors")
def test_info_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    assert info_main([str(tmp_path / "missing.qcow2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.qcow2" in err
    assert info_main(["-f", "vmdk", "x"]) == 2
    assert "vmdk" in capsys.readouterr().err
    garbage = tmp_path / "bad.qcow2"
    garbage.write_bytes(b"QFI\xfb" + b"\xff" * 508)
    assert info_main([str(garbage)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.clause("tools.info.json")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", QCOW2_FEATURES)
def test_info_shows_qcow2_features_as_qemu(impl: str, options: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, "img.qcow2", "1M", cwd=tmp_path)
    subprocess.run(["qemu-io", "-c", "write -P 0x5c 0 64k", "img.qcow2"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=60)
    monkeypatch.chdir(tmp_path)
    for output in ("json", "human"):
        theirs = qemu_img("info", f"--output={output}", "img.qcow2", cwd=tmp_path).stdout
        ours = render_info(image_info("img.qcow2", impl=impl), output=output)
        if output == "json":
            assert json.loads(ours) == json.loads(theirs), options
        else:
            assert ours == theirs, options


@pytest.mark.clause("tools.info.json")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", ["cluster_size=64k", "extended_l2=on,cluster_size=16k"])
def test_info_lists_persistent_bitmaps_as_qemu(impl: str, options: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, "img.qcow2", "4M", cwd=tmp_path)
    for args in (["b0"], ["--granularity", "1M", "--disable", "second"],
                 ["--granularity", "512", "n\u00e4me with spaces"]):
        qemu_img("bitmap", "--add", *args[:-1], "img.qcow2", args[-1], cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    theirs = qemu_json("info", "img.qcow2", cwd=tmp_path)
    assert len(theirs["format-specific"]["data"]["bitmaps"]) == 3
    assert json.loads(render_info(image_info("img.qcow2", impl=impl), output="json")) == theirs
    assert render_info(image_info("img.qcow2", impl=impl)) == qemu_img(
        "info", "img.qcow2", cwd=tmp_path).stdout


@pytest.mark.clause("tools.cli.errors")
def test_info_refuses_a_bitmap_directory_past_the_file(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    image = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    qemu_img("bitmap", "--add", image, "b0")
    data = bytearray(image.read_bytes())
    ext = data.index((0x23852875).to_bytes(4, "big"))
    data[ext + 24 : ext + 32] = (1 << 40).to_bytes(8, "big")  # bitmap_directory_offset
    image.write_bytes(bytes(data))
    assert info_main([str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bitmap directory" in err

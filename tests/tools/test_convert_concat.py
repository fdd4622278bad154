"""pyimago.tools convert with several sources: concatenated as qemu-img convert does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyimago.tools import ConvertOptions, ToolError, convert
from pyimago.tools._cli import convert_main

from .conftest import IMPLS, assert_qemu_check_clean, qemu_img, qemu_json

pytestmark = [pytest.mark.qemu, pytest.mark.clause("tools.convert.concat")]

#: Corpus images concatenated: qcow2 of several cluster sizes, a chain, compressed and zero
#: clusters, a raw disk (and, added by the fixture, a raw file that ends mid-sector).
_PARTS = ("v3-c64k", "raw-plain", "chain-depth3", "v2-c512", "v3-zlib", "v3-zero-clusters")


def _odd_raw(folder: Path) -> Path:
    """A raw file of 1,000,000 bytes (QEMU counts it as 1,000,448), data in its last sector."""
    path = folder / "odd.raw"
    with open(path, "wb") as f:
        f.truncate(1_000_000)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x6d 4096 8192",
                    "-c", "write -P 0x6e 999424 576", str(path)],
                   check=True, capture_output=True, timeout=60)
    return path


@pytest.fixture
def sources(qemu_corpus: list[Any], tmp_path: Path) -> list[str]:
    by_name = {spec.name: spec.path for spec in qemu_corpus}
    odd = _odd_raw(tmp_path)
    return [str(by_name[_PARTS[0]]), str(odd), *(str(by_name[n]) for n in _PARTS[1:]),
            str(odd)]


@pytest.mark.parametrize("impl", IMPLS)
def test_concatenated_raw_output_is_byte_identical_to_qemus(sources: list[str], impl: str,
                                                            tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    convert(sources, str(ours), ConvertOptions(out_fmt="raw"), impl=impl)
    qemu_img("convert", "-O", "raw", *sources, theirs)
    # The size is the sum of the sources' sizes in whole sectors (1,000,000 -> 1,000,448).
    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.stat().st_size % 512 == 0
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("extra", [[], ["-o", "cluster_size=4k"], ["-c"], ["-S", "0"]],
                         ids=["plain", "c4k", "compressed", "S0"])
def test_concatenated_qcow2_output_matches_qemus(sources: list[str], impl: str,
                                                 extra: list[str], tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    assert convert_main(["--impl", impl, "-O", "qcow2", *extra, *sources, str(ours)]) == 0
    qemu_img("convert", "-O", "qcow2", *extra, *sources, theirs)
    assert_qemu_check_clean(ours)
    assert qemu_img("compare", ours, theirs).returncode == 0
    ours_info, theirs_info = qemu_json("info", ours), qemu_json("info", theirs)
    assert ours_info["virtual-size"] == theirs_info["virtual-size"]
    if "-c" in extra:
        # The same clusters end up compressed (the sources' seams included).
        counts = [qemu_json("check", p).get("compressed-clusters") for p in (ours, theirs)]
        assert counts[0] == counts[1] and counts[0]


@pytest.mark.parametrize("impl", IMPLS)
def test_concatenated_into_an_existing_larger_image_keeps_its_tail(sources: list[str],
                                                                   impl: str,
                                                                   tmp_path: Path) -> None:
    """-n: the sources are written from offset 0; what lies past their sum is left as the
    existing output had it (qemu-img does the same)."""
    size = sum(qemu_json("info", s)["virtual-size"] for s in sources) + (3 << 20)
    outs = []
    for name in ("ours.qcow2", "theirs.qcow2"):
        out = tmp_path / name
        qemu_img("create", "-q", "-f", "qcow2", out, size)
        subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {size}", str(out)],
                       check=True, capture_output=True, timeout=120)
        outs.append(out)
    assert convert_main(["--impl", impl, "-n", "-O", "qcow2", *sources, str(outs[0])]) == 0
    qemu_img("convert", "-n", "-O", "qcow2", *sources, outs[1])
    assert_qemu_check_clean(outs[0])
    assert qemu_img("compare", outs[0], outs[1]).returncode == 0


def test_output_smaller_than_the_sources_is_refused(sources: list[str],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", out, "1M")
    before = out.read_bytes()
    with pytest.raises(ToolError, match="smaller than the source"):
        convert(sources[:2], str(out), ConvertOptions(out_fmt="qcow2", no_create=True))
    assert out.read_bytes() == before


def test_one_source_of_an_odd_size_is_padded_to_a_sector_as_qemu_does(tmp_path: Path) -> None:
    odd = _odd_raw(tmp_path)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    convert(str(odd), str(ours))
    qemu_img("convert", "-O", "raw", odd, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert len(ours.read_bytes()) == 1_000_448


@pytest.mark.clause("tools.cli.errors")
@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["-l", "s1", "SRC", "SRC", "o"], "-l 's1'"),
     (["-O", "qcow2", "-B", "SRC", "-F", "qcow2", "SRC", "SRC", "o"], "(-B) 'SRC'"),
     (["-O", "qcow2", "-o", "backing_file=SRC,backing_fmt=qcow2", "SRC", "SRC", "o"],
      "(-B) 'SRC'"),
     (["SRC", "missing-source", "o"], "missing-source"),
     (["-f", "qcow2", "SRC", "RAW", "o"], "RAW"),
     (["SRC", "RAW", "RAW"], "also a source"),
     (["SRC", "SRC"], "also a source"),
     (["--target-is-zero", "SRC", "o"], "-n"),
     (["--target-is-zero", "-n", "-O", "qcow2", "-B", "RAW", "-F", "raw", "SRC", "SRC"],
      "backing file")],
)
def test_bad_several_source_calls_exit_2_and_write_nothing(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "SRC", "1M")
    qemu_img("create", "-q", "-f", "raw", "RAW", "1M")
    before = {p: (tmp_path / p).read_bytes() for p in ("SRC", "RAW")}
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert needle in err
    assert sorted(os.listdir(tmp_path)) == ["RAW", "SRC"]
    assert {p: (tmp_path / p).read_bytes() for p in ("SRC", "RAW")} == before


@pytest.mark.clause("tools.convert.content")
@pytest.mark.parametrize("impl", IMPLS)
def test_target_is_zero_skips_the_zero_ranges(sources: list[str], impl: str,
                                              tmp_path: Path) -> None:
    """--target-is-zero -n: zero ranges are not written.  Into a fresh (zero) image the
    output reads as the sources (as qemu-img's does); into one that does not read zero, a
    sector differs from the sources only where the sources' sector is all zeroes (skipped,
    as qemu-img skips them), and somewhere it does (the option took effect)."""
    size = sum(qemu_json("info", s)["virtual-size"] for s in sources)
    whole = tmp_path / "whole.raw"
    qemu_img("convert", "-O", "raw", *sources, whole)
    expected = whole.read_bytes()
    for fill in (None, 0x5A):
        out = tmp_path / "ours.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", out, size)
        if fill is not None:
            subprocess.run(["qemu-io", "-c", f"write -P {fill} 0 {size}", str(out)],
                           check=True, capture_output=True, timeout=120)
        args = ["--target-is-zero", "-n", "-O", "qcow2", *sources, str(out)]
        assert convert_main(["--impl", impl, *args]) == 0
        assert_qemu_check_clean(out)
        raw = tmp_path / "ours.raw"
        qemu_img("convert", "-O", "raw", out, raw)
        got = raw.read_bytes()
        if fill is None:
            assert got == expected
            continue
        skipped = 0
        for at in range(0, len(expected), 512):
            want, have = expected[at : at + 512], got[at : at + 512]
            if want != have:
                assert want.count(0) == len(want), at  # only zero sectors are skipped
                skipped += 1
        assert skipped

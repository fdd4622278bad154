"""The tools on an image another process holds (qemu-io running in the background): one line
and exit 2 without -U, in the command line's terms; with -U the reading tools work as
qemu-img -U does; the writing ones refuse -U."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyimago import cli

from .conftest import held_by_qemu_io, qemu_img

pytestmark = [pytest.mark.qemu, pytest.mark.clause("tools.cli.errors")]


@pytest.fixture
def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """held.qcow2 (with data and a snapshot), open read-write in a qemu-io process."""
    image = tmp_path / "held.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "4M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(image)], check=True,
                   capture_output=True, timeout=60)
    qemu_img("snapshot", "-c", "s1", image)
    qemu_img("create", "-q", "-f", "raw", tmp_path / "other.raw", "4M")
    monkeypatch.chdir(tmp_path)
    with held_by_qemu_io(image):
        yield image


#: (arguments, whether -U is the way out).  The image is always held.img's name last but
#: for convert's output.
_REFUSED = [
    (["info", "held.qcow2"], True),
    (["map", "held.qcow2"], True),
    (["measure", "-O", "qcow2", "held.qcow2"], True),
    (["compare", "held.qcow2", "other.raw"], True),
    (["check", "held.qcow2"], True),
    (["snapshot", "-l", "held.qcow2"], True),
    (["convert", "held.qcow2", "out.raw"], True),
    (["convert", "-n", "other.raw", "held.qcow2"], False),
    (["check", "-r", "leaks", "held.qcow2"], False),
    (["snapshot", "-c", "s2", "held.qcow2"], False),
    (["resize", "held.qcow2", "8M"], False),
    (["rebase", "-u", "-b", "", "held.qcow2"], False),
    (["create", "-f", "qcow2", "held.qcow2", "1M"], False),
]


@pytest.mark.parametrize(("argv", "share_helps"), _REFUSED,
                         ids=[" ".join(a) for a, _ in _REFUSED])
def test_a_held_image_is_one_line_naming_the_lock(
        held: Path, argv: list[str], share_helps: bool,
        capsys: pytest.CaptureFixture[str]) -> None:
    before = held.read_bytes()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "held.qcow2 is in use by another process" in err and "lock" in err, err
    assert "force_share" not in err and "locking=" not in err  # the API's words, not the CLI's
    assert ("-U" in err) == share_helps, err
    assert held.read_bytes() == before
    assert not (held.parent / "out.raw").exists()


def test_u_reads_a_held_image_as_qemu_img_u(held: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for tool, extra in (("info", ["--output=json"]), ("map", ["--output=json"]),
                        ("check", ["--output=json"]), ("snapshot", ["-l"])):
        assert cli.main([tool, "-U", *extra, "held.qcow2"]) == 0, tool
        ours = capsys.readouterr().out
        theirs = qemu_img(tool, "-U", *extra, "held.qcow2").stdout
        if tool == "info":  # actual-size is the file system's and may move
            ours, theirs = (t.split('"actual-size"')[0] for t in (ours, theirs))
        if tool == "check":  # the same record (qemu-img's key order is its own)
            ours, theirs = (json.loads(t) for t in (ours, theirs))
        assert ours == theirs, tool
    assert cli.main(["compare", "-U", "held.qcow2", "other.raw"]) == 1
    assert cli.main(["convert", "-U", "held.qcow2", "out.raw"]) == 0
    qemu_img("convert", "-U", "-O", "raw", "held.qcow2", "qemu.raw")
    assert (held.parent / "out.raw").read_bytes() == (held.parent / "qemu.raw").read_bytes()
    assert cli.main(["measure", "-U", "-O", "qcow2", "held.qcow2"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv", [["check", "-U", "-r", "leaks", "held.qcow2"],
                                  ["snapshot", "-U", "-c", "s2", "held.qcow2"],
                                  ["snapshot", "-U", "-d", "s1", "held.qcow2"]])
def test_u_with_a_write_is_refused_up_front(held: Path, argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    before = held.read_bytes()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-U" in err, err
    assert held.read_bytes() == before

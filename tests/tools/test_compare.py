"""pyimago.tools compare against qemu-img compare: verdicts, messages, exit statuses."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from pyimago.tools import compare
from pyimago.tools._cli import compare_main

from .conftest import IMPLS, qemu_img

pytestmark = [pytest.mark.qemu, pytest.mark.clause("tools.compare.verdict")]


def _pairs(corpus: list[Any], count: int) -> list[tuple[Path, Path]]:
    paths = [s.path for s in corpus]
    pairs = list(itertools.combinations(paths, 2))
    return random.Random(14).sample(pairs, min(count, len(pairs)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strict", [False, True])
def test_compare_matches_qemu_on_corpus_pairs(qemu_corpus: list[Any], impl: str,
                                              strict: bool) -> None:
    for a, b in _pairs(qemu_corpus, 60):
        flags = ["-s"] if strict else []
        theirs = qemu_img("compare", *flags, a, b, ok=(0, 1))
        ours = compare(str(a), str(b), strict=strict, impl=impl)
        assert (ours.exit_code, list(ours.messages)) == (
            theirs.returncode, theirs.stdout.splitlines()
        ), (a, b)


def test_compare_matches_qemu_on_copies(qemu_corpus: list[Any], tmp_path: Path) -> None:
    for spec in qemu_corpus[::3]:
        for fmt in ("raw", "qcow2"):
            copy = tmp_path / f"{spec.name}.{fmt}"
            qemu_img("convert", "-O", fmt, spec.path, copy)
            for strict in ([], ["-s"]):
                theirs = qemu_img("compare", *strict, spec.path, copy, ok=(0, 1))
                ours = compare(str(spec.path), str(copy), strict=bool(strict))
                assert ours.exit_code == theirs.returncode, (spec.name, fmt, strict)
                assert list(ours.messages) == theirs.stdout.splitlines()
                if not strict:
                    assert ours.exit_code == 0


@pytest.mark.parametrize(
    ("size_a", "size_b", "writes_b", "message"),
    [
        (1 << 20, 2 << 20, [], "Images are identical."),
        (1 << 20, 2 << 20, ["write -P 1 1500000 1"], "Content mismatch at offset 1499648!"),
        (1 << 20, 1 << 20, ["write -P 7 1000 1"], "Content mismatch at offset 512!"),
        (1 << 20, 1 << 20, ["write -z 0 4096"], "Images are identical."),
    ],
)
def test_compare_first_difference(tmp_path: Path, size_a: int, size_b: int,
                                  writes_b: list[str], message: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", a, size_a)
    qemu_img("create", "-q", "-f", "qcow2", b, size_b)
    for cmd in writes_b:
        qemu_img_io(b, cmd)
    theirs = qemu_img("compare", a, b, ok=(0, 1))
    status = compare_main([str(a), str(b)])
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == message
    assert (status, out) == (theirs.returncode, theirs.stdout)


def qemu_img_io(path: Path, cmd: str) -> None:
    import subprocess

    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True,
                   capture_output=True, timeout=60)


@pytest.mark.clause("tools.cli.errors")
def test_compare_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(4096))
    assert compare_main([str(raw), str(tmp_path / "missing")]) == 2
    assert compare_main(["-f", "qcow2", str(raw), str(raw)]) == 2
    assert compare_main([str(raw)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err
    assert compare_main(["-q", str(raw), str(raw)]) == 0
    assert capsys.readouterr().out == ""

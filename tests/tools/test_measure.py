"""pyimago.tools measure against qemu-img measure."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pyimago.tools import measure
from pyimago.tools._cli import measure_main
from pyimago.tools._common import parse_options

from .conftest import IMPLS, qemu_img, qemu_json

pytestmark = [pytest.mark.qemu, pytest.mark.clause("tools.measure.sizes")]

_TARGETS = (
    ("qcow2", ""),
    ("raw", ""),
    ("qcow2", "cluster_size=4k,refcount_bits=64"),
    ("qcow2", "compat=0.10,cluster_size=512"),
    ("qcow2", "preallocation=full"),
    ("qcow2", "backing_file=x"),
    ("qcow2", "extended_l2=on,cluster_size=16k,lazy_refcounts=on,data_file=d.bin"),
)


@pytest.mark.parametrize("impl", IMPLS)
def test_measure_matches_qemu_on_corpus(qemu_corpus: list[Any], impl: str) -> None:
    for spec in qemu_corpus:
        for out_fmt, opts in _TARGETS:
            extra = ["-o", opts] if opts else []
            theirs = qemu_json("measure", "-O", out_fmt, *extra, spec.path)
            ours = measure(str(spec.path), out_fmt=out_fmt, impl=impl,
                           options=parse_options([opts] if opts else [], out_fmt))
            assert ours == theirs, (spec.name, out_fmt, opts)


@pytest.mark.parametrize("size", ["0", "1", "512", "1M", "1G", "1.5G", "10T"])
@pytest.mark.parametrize("opts", ["", "cluster_size=2M", "refcount_bits=1,cluster_size=512",
                                  "extended_l2=on", "extended_l2=on,cluster_size=2M"])
def test_measure_size_matches_qemu(size: str, opts: str, capsys: pytest.CaptureFixture[str]
                                   ) -> None:
    extra = ["-o", opts] if opts else []
    theirs = qemu_img("measure", "--output=json", "-O", "qcow2", *extra, "--size", size,
                      ok=(0, 1))
    status = measure_main(["--output=json", "-O", "qcow2", *extra, "--size", size])
    if theirs.returncode:
        # qemu-img refuses (an L1 table past 32 MiB): so do we, with exit 2.
        assert status == 2 and "too large" in capsys.readouterr().err
        return
    assert status == 0
    assert json.loads(capsys.readouterr().out) == json.loads(theirs.stdout)


@pytest.mark.clause("tools.cli.errors")
@pytest.mark.parametrize(
    "argv",
    [["--size", "1G", "img"], [], ["-O", "vmdk", "--size", "1"], ["-o", "nope=1", "--size", "1"],
     ["-O", "qcow2", "-o", "cluster_size=3k", "--size", "1M"], ["--size", "-5"],
     ["-O", "qcow2", "-o", "extended_l2=sometimes", "--size", "1M"], ["/no/such/image"]],
)
def test_measure_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    assert measure_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1

"""pyimago.tools convert -c: compressed qcow2 output, checked against qemu-img convert -c."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyimago.reference import UnsupportedError
from pyimago.tools._cli import convert_main
from pyimago.tools._common import implementation
from pyimago.tools._convert import _BACKING, _DATA, _ZERO, _on_clusters

from .conftest import IMPLS, assert_qemu_check_clean, qemu_img

pytestmark = pytest.mark.clause("tools.convert.compressed")


def test_data_runs_widen_to_whole_clusters() -> None:
    runs = [(0, 100, _ZERO), (100, 50, _DATA), (150, 1000, _ZERO), (1150, 10, _DATA),
            (1160, 2840, _BACKING), (4000, 96, _DATA), (4096, 4000, _ZERO)]
    out = list(_on_clusters(iter(runs), 1024, 8096))
    assert out == [(0, 2048, _DATA), (2048, 1024, _BACKING), (3072, 1024, _DATA),
                   (4096, 4000, _ZERO)]
    # Tiling: every byte once, in order.
    assert [o for o, _, _ in out] == [0, *(o + n for o, n, _ in out[:-1])]
    # The last cluster stops at the disk's end.
    assert list(_on_clusters(iter([(0, 1100, _ZERO), (1100, 200, _DATA)]), 1024, 1300)) == [
        (0, 1024, _ZERO), (1024, 276, _DATA)]


def _require_compressed_writes(impl: str, folder: Path) -> None:
    """Skip (loudly) where the implementation cannot write compressed clusters yet."""
    module = implementation(impl)
    probe = folder / "probe.qcow2"
    module.create_image(str(probe), 1 << 20)
    image = module.open_image(str(probe), writable=True)
    try:
        image.write_compressed(bytes(65536), 0)
    except (AttributeError, UnsupportedError) as exc:
        pytest.skip(f"pyimago.{impl} does not write compressed clusters yet: {exc}")
    finally:
        image.close()
        probe.unlink()


def _check(path: Path) -> dict[str, Any]:
    out = qemu_img("check", "--output=json", path).stdout
    report: dict[str, Any] = json.loads(out)
    return report


def _share(corpus: list[Any], impl: str) -> list[Any]:
    small = [s for s in corpus if s.path.stat().st_size < 64 << 20]
    return small if impl == "fast" else small[::5]


@pytest.mark.qemu
@pytest.mark.parametrize("impl", IMPLS)
def test_convert_compressed_matches_qemu(qemu_corpus: list[Any], impl: str,
                                         tmp_path: Path) -> None:
    _require_compressed_writes(impl, tmp_path)
    for index, spec in enumerate(_share(qemu_corpus, impl)):
        opts = ["-o", "cluster_size=4k"] if index % 3 == 1 else (
            ["-o", "compression_type=zstd"] if index % 3 == 2 else [])
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        probe = qemu_img("convert", "-c", "-O", "qcow2", *opts, spec.path, theirs, ok=(0, 1))
        if probe.returncode:
            continue  # e.g. zstd missing from this QEMU
        assert convert_main(["--impl", impl, "-c", "-O", "qcow2", *opts, str(spec.path),
                             str(ours)]) == 0, spec.name
        assert_qemu_check_clean(ours)
        assert qemu_img("compare", spec.path, ours).returncode == 0, spec.name
        mine, qemus = _check(ours), _check(theirs)
        # The same clusters compressed (QEMU's rule: whole non-zero clusters, stored
        # compressed when that saves space), and about the same file.
        assert mine.get("compressed-clusters", 0) == qemus.get("compressed-clusters", 0), (
            spec.name, mine, qemus)
        assert mine.get("allocated-clusters", 0) == qemus.get("allocated-clusters", 0), (
            spec.name, mine, qemus)
        assert ours.stat().st_size <= theirs.stat().st_size * 1.05 + 3 * 65536, spec.name
        ours.unlink()
        theirs.unlink()


@pytest.mark.qemu
@pytest.mark.parametrize("impl", IMPLS)
def test_convert_compressed_odd_sizes_and_backing(impl: str, tmp_path: Path) -> None:
    _require_compressed_writes(impl, tmp_path)
    src = tmp_path / "src.raw"
    # Compressible text, random data (stays uncompressed), zeroes, and a partial last cluster.
    with open(src, "wb") as f:
        f.write(b"pyimago compressed " * 5000)
        f.write(bytes(200_000))
        f.write(open("/dev/urandom", "rb").read(70_000))  # noqa: SIM115
        f.write(b"tail" * 333)
    for name, opts in (("64k", []), ("512", ["-o", "cluster_size=512"]),
                       ("2m", ["-o", "cluster_size=2M"])):
        ours, theirs = tmp_path / f"{name}.ours.qcow2", tmp_path / f"{name}.qemu.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", *opts, src, theirs)
        assert convert_main(["--impl", impl, "-c", "-f", "raw", "-O", "qcow2", *opts,
                             str(src), str(ours)]) == 0
        assert_qemu_check_clean(ours)
        assert qemu_img("compare", "-f", "raw", src, ours).returncode == 0
        assert _check(ours).get("compressed-clusters") == _check(theirs).get(
            "compressed-clusters"), name
        # Same packing, and the file ends on a whole sector as qemu-img's does.
        assert ours.stat().st_size == theirs.stat().st_size, name
    # Over a backing file: only the top layer's clusters, compressed.
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", src, base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top,
             cwd=tmp_path)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 4k 100k", str(top)],
                   check=True, capture_output=True, timeout=60)
    out = tmp_path / "new-top.qcow2"
    assert convert_main(["--impl", impl, "-c", "-O", "qcow2", "-B", "base.qcow2", "-F",
                         "qcow2", str(top), str(out)]) == 0
    assert_qemu_check_clean(out)
    assert qemu_img("compare", top, out).returncode == 0
    depth0 = [e for e in json.loads(qemu_img("map", "--output=json", out).stdout)
              if e["depth"] == 0 and e["present"]]
    assert sum(e["length"] for e in depth0) == 2 * 65536  # the clusters 4k..104k touches


@pytest.mark.clause("tools.cli.errors")
@pytest.mark.parametrize("argv", [
    ["-c", "-O", "raw", "SRC", "out"],
    ["-c", "-O", "qcow2", "-o", "data_file=out.data", "SRC", "out"],
    ["-c", "SRC", "out"],  # -O defaults to raw
])
def test_convert_compressed_refusals(argv: list[str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    Path("SRC").write_bytes(bytes(65536))
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-c" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SRC"]

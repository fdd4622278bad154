"""The chunkmap sample driver (examples/chunkmap.py) conforms, the way the README shows it:
one plain test function, the marker, and ``pyimago fuzz chunkmap:target``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chunkmap
import pytest
from pyimago.oracle import run_driver_conformance
from pyimago.reference import CorruptImageError, MemoryStorage, create_image, open_image

EXAMPLES = Path(chunkmap.__file__).parent


@pytest.mark.clause(
    "access.cow.partial-cluster", "access.discard-to-backing.visible",
    "access.resize.shrink-discards", "access.close.flushes", "backing.shorter",
    "backing.longer",
)
def test_chunkmap_conforms() -> None:
    stats = run_driver_conformance(chunkmap.target())
    print(stats)
    # A green run that tested something: every kind of operation, chains of every depth,
    # both storages, every layout.
    kinds = {kind for kind, _ in stats.ops}
    assert {"read", "write", "write_zeroes", "discard_to_zero", "discard_to_any",
            "discard_to_backing", "resize", "reopen", "sweep"} <= kinds
    assert {depth for depth, _ in stats.chain_depths} == {1, 2, 3}
    assert {storage for storage, _ in stats.storages} == {"memory", "file"}
    assert {unit for unit, _ in stats.granularities} == {512, 1024, 4096, 65536}
    assert stats.granules_touched > 1000 and stats.bytes_compared > 10_000_000


@pytest.mark.pyimago_target("chunkmap:target", max_examples=10)
def test_chunkmap_conforms_by_marker() -> None:
    pass


def test_pyimago_fuzz_chunkmap(tmp_path: Path) -> None:
    pyimago = Path(sys.executable).with_name("pyimago")
    junit = tmp_path / "chunkmap.xml"
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run(
        [str(pyimago), "fuzz", "chunkmap:target", "--examples", "10", "--profile", "ci",
         "--junit", str(junit), "--failures-dir", str(tmp_path)],
        cwd=EXAMPLES, capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "chunkmap conforms" in proc.stdout and "operations" in proc.stdout
    assert 'failures="0"' in junit.read_text()


# -- the format itself ------------------------------------------------------------------------


@pytest.mark.clause("backing.resolve-relative", "backing.probe")
def test_file_chain_opens_its_backing_files(tmp_path: Path) -> None:
    create_image(tmp_path / "base.qcow2", 1 << 20, cluster_size=4096)
    with open_image(tmp_path / "base.qcow2", writable=True) as base:
        base.write(b"B" * 8192, 0)
    chunkmap.create_image(tmp_path / "mid.cm", 1 << 20, chunk_size=4096,
                          backing_file="base.qcow2", backing_fmt="qcow2")
    chunkmap.create_image(tmp_path / "top.cm", 2 << 20, chunk_size=1024,
                          backing_file="mid.cm")
    with chunkmap.open_image(tmp_path / "mid.cm", writable=True) as mid:
        mid.write(b"M" * 100, 4000)
    with chunkmap.open_image(tmp_path / "top.cm", writable=True) as top:
        top.write(b"T", 4001)  # copy-on-write of a 1 KiB chunk through two backings
    with chunkmap.open_image(tmp_path / "top.cm") as top:
        assert top.read(3998, 6) == b"BBMTMM"
        assert top.read(8190, 4) == b"BB\0\0"
        assert top.read((2 << 20) - 2, 4) == bytes(4)
        driver = top.driver
        assert isinstance(driver, chunkmap.ChunkMapDriver) and driver.backing is not None
        assert isinstance(driver.backing.driver, chunkmap.ChunkMapDriver)


def test_created_preallocated_and_rejects_what_it_is_not() -> None:
    storage = MemoryStorage()
    chunkmap.create_image(storage, 10000, chunk_size=512, preallocation="full")
    with chunkmap.open_image(storage) as img:
        mapping, length = img.get_shallow_mapping(0, 10000)
        assert type(mapping).__name__ == "RawMapping" and length == 10000
        assert img.read(0, 10000) == bytes(10000)
    qcow2 = MemoryStorage()
    create_image(qcow2, 65536)
    with pytest.raises(CorruptImageError, match="not a chunkmap image"):
        chunkmap.open_image(qcow2)
    with pytest.raises(ValueError, match="power of two"):
        chunkmap.create_image(MemoryStorage(), 4096, chunk_size=3000)

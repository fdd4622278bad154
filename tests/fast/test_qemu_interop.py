"""pyimago.fast against QEMU: reading what QEMU writes, QEMU checking what fast writes."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from pyimago import fast
from pyimago.fast import PreallocateMode

from .conftest import assert_qemu_check_clean, qemu_img, qemu_raw_bytes, require_qemu

KiB = 1024
MiB = 1024 * KiB


#: Larger corpus images (a sparse 5 GiB one) are compared at sampled offsets only.
_WHOLE_LIMIT = 64 * MiB


def _qemu_raw_file(path: Path | str, tmp: Path) -> Path:
    out = tmp / (Path(path).name + ".qemu.raw")
    qemu_img("convert", "-O", "raw", path, out)
    return out


def _samples(size: int, rnd: random.Random) -> list[tuple[int, int]]:
    if size <= _WHOLE_LIMIT:
        return [(0, size)]
    picks = [(0, 4 * MiB), (max(0, size - 4 * MiB), 4 * MiB + 512)]
    picks += [(rnd.randrange(0, size), rnd.randrange(1, 2 * MiB)) for _ in range(30)]
    return picks


def _expected(raw: Path, off: int, ln: int) -> bytes:
    with raw.open("rb") as f:
        f.seek(off)
        return f.read(ln).ljust(ln, b"\0")


@pytest.mark.qemu
@pytest.mark.clause(
    "access.read.no-short",
    "access.mapping.special-compressed",
    "backing.resolve-relative",
    "backing.format-extension",
    "backing.shorter",
    "backing.longer",
    "qcow2.header.refcount-order",
)
def test_fast_reads_every_corpus_image_as_qemu(qemu_corpus: list[Any], tmp_path: Path) -> None:
    """Reads (serial, parallel, odd chunks) equal ``qemu-img convert -O raw``."""
    rnd = random.Random(7)
    for spec in qemu_corpus:
        raw = _qemu_raw_file(spec.path, tmp_path)
        with fast.open_image(spec.path, format=spec.fmt) as img:
            assert img.size == raw.stat().st_size, spec.name
            for off, ln in _samples(img.size, rnd):
                want = _expected(raw, off, ln)
                assert img.read(off, ln) == want, (spec.name, off, ln)
                img.set_read_parallelization(2)
                assert img.read(off, ln) == want, (spec.name, off, ln, "parallel")
                img.set_read_parallelization(1)
            for _ in range(20):
                off = rnd.randrange(0, max(1, img.size))
                ln = rnd.randrange(1, 300 * KiB)
                assert img.read(off, ln) == _expected(raw, off, ln), (spec.name, off, ln)
        raw.unlink()


@pytest.mark.qemu
@pytest.mark.clause("access.cow.partial-cluster", "access.mapping.special-compressed")
def test_fast_overwrites_corpus_images_cleanly(qemu_corpus: list[Any], tmp_path: Path) -> None:
    """Writing into copies of QEMU's images (compressed and zero clusters, snapshots,
    chains) keeps them consistent for QEMU, which reads back what was written."""
    rnd = random.Random(11)
    for spec in qemu_corpus:
        if spec.fmt != "qcow2":
            continue
        # Copy the recipe's whole folder so relative backing names still resolve.
        src = Path(spec.path)
        root = next(p for p in src.parents if p.name == spec.name)
        shutil.copytree(root, tmp_path / spec.name)
        path = tmp_path / spec.name / src.relative_to(root)
        try:
            img = fast.open_image(path, writable=True)
        except fast.UnsupportedFeatureError:
            continue
        written: list[tuple[int, bytes]] = []
        with img:
            for _ in range(6):
                if not img.size:
                    break
                off = rnd.randrange(0, min(img.size, _WHOLE_LIMIT))
                data = os.urandom(min(rnd.randrange(1, 200 * KiB), img.size - off))
                img.write(data, off)
                written.append((off, data))
            sample = [(o, img.read(o, ln)) for o, ln in _samples(img.size, rnd)]
        assert_qemu_check_clean(path)
        raw = _qemu_raw_file(path, tmp_path)
        for off, data in sample:
            assert _expected(raw, off, len(data)) == data, (spec.name, off)
        for off, data in written[-1:]:
            # The last write is wholly visible (earlier ones may be partly overwritten).
            assert _expected(raw, off, len(data)) == data, spec.name
        raw.unlink()


def _configs() -> list[Any]:
    out = []
    for cs in (512, 4096, 65536, 2 * MiB):
        for bits in (1, 4, 16, 64):
            if cs == 2 * MiB and bits != 16:
                continue
            out.append(pytest.param(cs, bits, "1.1", id=f"cs{cs}-rb{bits}"))
    out.append(pytest.param(65536, 16, "0.10", id="v2"))
    return out


@pytest.mark.qemu
@pytest.mark.clause(
    "access.write.no-short",
    "access.write-zeroes.no-free",
    "access.discard-to-zero.frees",
    "access.resize.shrink-discards",
    "access.resize.grow-zero",
)
@pytest.mark.parametrize(("cs", "bits", "compat"), _configs())
def test_images_fast_writes_pass_qemu_check(
    cs: int, bits: int, compat: str, tmp_path: Path
) -> None:
    require_qemu()
    rnd = random.Random(cs * 131 + bits)
    size = max(64 * cs, 2 * MiB) if cs < 2 * MiB else 8 * MiB
    path = tmp_path / "img.qcow2"
    fast.create_image(path, size, cluster_size=cs, refcount_bits=bits, compat=compat)
    model = bytearray(size)
    modes = list(PreallocateMode)
    with fast.open_image(path, writable=True, cache_bytes=64 * KiB) as img:
        for step in range(40):
            off = rnd.randrange(0, img.size)
            ln = rnd.randrange(0, min(img.size - off, 3 * cs + 700) + 1)
            op = rnd.choice("wwwwzdbr")
            if op == "w":
                data = os.urandom(ln)
                img.write(data, off)
                model[off : off + ln] = data
            elif op == "z":
                img.write_zeroes(off, ln)
                model[off : off + ln] = bytes(ln)
            elif op == "d":
                img.discard_to_zero(off, ln)
                model[off : off + ln] = bytes(ln)
            elif op == "b":
                img.discard_to_backing(off, ln)
                model[off : off + ln] = img.read(off, ln)
            elif step % 3 == 0:
                new = rnd.randrange(1, 2 * size // 512) * 512
                img.resize(new, rnd.choice(modes))
                if new < len(model):
                    del model[new:]
                else:
                    model.extend(img.read(len(model), new - len(model)))
        assert img.read(0, img.size) == bytes(model)
    assert_qemu_check_clean(path)
    assert qemu_raw_bytes(path, tmp_path) == bytes(model)


@pytest.mark.qemu
@pytest.mark.clause("qcow2.header.l1-size", "access.resize.grow-none")
def test_refcount_table_and_l1_growth(tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: the refcount table (64 entries per cluster)
    and the L1 table must both grow several times."""
    require_qemu()
    path = tmp_path / "grow.qcow2"
    fast.create_image(path, 64 * KiB, cluster_size=512, refcount_bits=64)
    with fast.open_image(path, writable=True) as img:
        data = os.urandom(3 * MiB)
        img.resize(3 * MiB)
        img.write(data, 0)
        assert img.read(0, len(data)) == data
    assert_qemu_check_clean(path)
    assert qemu_raw_bytes(path, tmp_path) == data


@pytest.mark.qemu
@pytest.mark.clause("backing.resolve-relative", "backing.format-extension", "backing.read-only")
def test_chain_written_by_fast_reads_in_qemu(tmp_path: Path) -> None:
    require_qemu()
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(3 * MiB))
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    fast.create_image(mid, 4 * MiB, backing_file="base.raw", backing_fmt="raw")
    fast.create_image(top, 4 * MiB, backing_file="mid.qcow2", backing_fmt="qcow2")
    expected = bytearray(base.read_bytes().ljust(4 * MiB, b"\0"))
    with fast.open_image(mid, writable=True) as img:
        img.write(b"M" * 100_000, 1_000_000)
        expected[1_000_000:1_100_000] = b"M" * 100_000
    with fast.open_image(top, writable=True) as img:
        img.write(b"T" * 5000, 1_050_000)
        expected[1_050_000:1_055_000] = b"T" * 5000
        assert img.read(0, 4 * MiB) == bytes(expected)
    for p in (mid, top):
        assert_qemu_check_clean(p)
    assert qemu_raw_bytes(top, tmp_path) == bytes(expected)
    with fast.open_image(top, writable=True) as img:
        # Whole clusters become unallocated again: the middle layer shows through.
        img.discard_to_backing(0, 4 * MiB)
        expected[1_050_000:1_055_000] = b"M" * 5000
        assert img.read(0, 4 * MiB) == bytes(expected)
    assert_qemu_check_clean(top)
    assert qemu_raw_bytes(top, tmp_path) == bytes(expected)
    info = qemu_img("info", top).stdout
    assert "backing file format: qcow2" in info


@pytest.mark.qemu
@pytest.mark.clause("access.cow.partial-cluster")
def test_writes_leave_internal_snapshots_intact(tmp_path: Path) -> None:
    """Clusters and L2 tables shared with a snapshot (COPIED clear) are copied on write:
    after fast writes, QEMU reverting to the snapshot finds the old bytes."""
    require_qemu()
    path = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, str(4 * MiB))
    old = os.urandom(3 * MiB)
    with fast.open_image(path, writable=True) as img:
        img.write(old, 0)
    qemu_img("snapshot", "-c", "s1", path)
    new = bytearray(old)
    with fast.open_image(path, writable=True) as img:
        for off in (0, 100_000, 1_500_000, 2 * MiB + 7):
            data = os.urandom(70_000)
            img.write(data, off)
            new[off : off + len(data)] = data
        img.discard_to_zero(1 * MiB, 64 * KiB)
        new[1 * MiB : 1 * MiB + 64 * KiB] = bytes(64 * KiB)
    assert_qemu_check_clean(path)
    assert qemu_raw_bytes(path, tmp_path)[: 3 * MiB] == bytes(new)
    qemu_img("snapshot", "-a", "s1", path)
    assert_qemu_check_clean(path)
    assert qemu_raw_bytes(path, tmp_path)[: 3 * MiB] == old

"""pyimago.fast's compressed writes against QEMU: qemu-img checks and reads what we write,
the compressed bytes are QEMU's own, and the rules of qcow2_co_pwritev_compressed_task hold."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from pyimago import fast
from pyimago.fast import (
    InvalidRequestError,
    MemoryStorage,
    RawMapping,
    ReadOnlyError,
    SpecialMapping,
    UnsupportedError,
)
from pyimago.oracle.crash import RecordingStorage

from .conftest import assert_qemu_check_clean, qemu_img, qemu_raw_bytes
from .test_crash_order import judge_every_cut

pytestmark = pytest.mark.usefixtures("needs_qemu")

CS = 65536


def _mixed(n_clusters: int, tail: int, seed: int) -> bytes:
    """Clusters that compress well, not at all, or are zero; then ``tail`` bytes."""
    rnd = random.Random(seed)
    out = bytearray()
    for k in range(n_clusters + (1 if tail else 0)):
        n = CS if k < n_clusters else tail
        kind = rnd.randrange(3)
        if kind == 0:
            out += rnd.randbytes(n)
        elif kind == 1:
            out += (b"cluster %d says hello " % k * (n // 16 + 1))[:n]
        else:
            out += bytes(n)
    return bytes(out)


def _compressed_share(path: Path) -> float:
    out = json.loads(qemu_img("check", "--output=json", path).stdout)
    return out["compressed-clusters"] / max(1, out["allocated-clusters"])


@pytest.mark.qemu
@pytest.mark.clause("qcow2.compressed.write-fallback", "qcow2.compressed.zlib",
                    "qcow2.compressed.zstd", "qcow2.compressed.write-packing")
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("threads", [1, 2])
def test_qemu_reads_what_we_compress(tmp_path: Path, ctype: str, threads: int) -> None:
    data = _mixed(24, 3072, seed=threads)
    path = tmp_path / "c.qcow2"
    fast.create_image(path, len(data), compression_type=ctype)
    with fast.open_image(path, writable=True) as img:
        img.set_write_parallelization(threads)
        img.write_compressed_many(data[: 12 * CS], 0)
        for at in range(12 * CS, len(data), CS):
            img.write_compressed(data[at : at + CS], at)
        assert img.read(0, len(data)) == data
        kinds = {type(img.get_mapping(at, 1)[0]) for at in range(0, len(data), CS)}
        assert SpecialMapping in kinds and RawMapping in kinds
    assert_qemu_check_clean(path)
    assert qemu_raw_bytes(path, tmp_path) == data
    raw = tmp_path / "want.raw"
    raw.write_bytes(data)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, path)
    assert _compressed_share(path) > 0.3


@pytest.mark.qemu
@pytest.mark.clause("qcow2.compressed.write-fallback", "qcow2.compressed.write-packing")
def test_the_compressed_bytes_and_packing_are_qemu_s(tmp_path: Path) -> None:
    # Same zlib settings as QEMU: the same deflate stream, packed the same way (two
    # clusters of ~20 KiB share host clusters).
    rnd = random.Random(5)
    data = b"".join(rnd.randbytes(CS // 3) + bytes(CS - CS // 3) for _ in range(4))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, theirs)
    fast.create_image(ours, len(data))
    with fast.open_image(ours, writable=True) as img:
        img.write_compressed_many(data, 0)
    blobs = []
    for path in (ours, theirs):
        with fast.open_image(path) as img:
            layer = img.driver
            entries = [layer._entry(c) for c in range(4)]
            held = [layer._held(e) for e in entries]
            at = [e & layer._comp_host for e in entries]
            blobs.append([(layer.storage.read(a, 30000), a - at[0], len(h))
                          for a, h in zip(at, held, strict=True)])
    for (mine, my_at, my_span), (qemu, q_at, q_span) in zip(*blobs, strict=True):
        assert my_at == q_at and my_span == q_span
        assert mine[:20000] == qemu[:20000]
    assert_qemu_check_clean(ours)


@pytest.mark.qemu
@pytest.mark.clause("qcow2.compressed.write-unallocated-only", "qcow2.compressed.write-fallback")
def test_allocated_clusters_refuse_compressed_data_as_qemu(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    fast.create_image(path, 4 * CS)
    text = b"compress me " * (CS // 12) + bytes(CS % 12)
    noise = random.Random(3).randbytes(CS)
    with fast.open_image(path, writable=True) as img:
        img.write(b"x" * 100, 0)
        with pytest.raises(InvalidRequestError, match="already allocated"):
            img.write_compressed(text, 0)
        assert img.read(0, 101) == b"x" * 100 + b"\0"
        img.write_compressed(text, CS)
        with pytest.raises(InvalidRequestError, match="already allocated"):
            img.write_compressed(text, CS)
        # Incompressible data takes the plain path, which may overwrite (QEMU's order:
        # compress first, refuse allocated clusters only for what is stored compressed).
        img.write_compressed(noise, 0)
        img.write_zeroes(2 * CS, CS)  # keeps nothing to keep: a zero cluster, no host
        img.write_compressed(text, 2 * CS)
        assert img.read(0, 3 * CS) == noise + text + text
    assert_qemu_check_clean(path)
    # QEMU agrees: qemu-io's compressed write into our compressed cluster fails too.
    proc = subprocess.run(["qemu-io", "-c", f"write -c 0 {CS}", "-c", f"write -c {CS} {CS}",
                           str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert "write failed" in proc.stdout + proc.stderr


@pytest.mark.clause("qcow2.compressed.write-fallback", "access.write.read-only",
                    "access.write.past-end")
def test_bad_compressed_requests_are_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.qcow2"
    fast.create_image(path, 2 * CS + 1024)
    before = path.read_bytes()
    with fast.open_image(path, writable=True) as img:
        for data, at in ((bytes(CS), 512), (bytes(CS - 512), 0), (bytes(1024), CS),
                         (bytes(2048), 2 * CS), (b"", 0)):
            with pytest.raises(InvalidRequestError):
                img.write_compressed(data, at)
        with pytest.raises(InvalidRequestError, match="past the disk end"):
            img.write_compressed(bytes(CS), 2 * CS)
        # A multi-cluster batch is checked whole before anything is written.
        with pytest.raises(InvalidRequestError):
            img.write_compressed_many(bytes(CS + 512), 0)
        img.write_compressed(b"\1" * 1024, 2 * CS)  # the partial last cluster
    assert path.read_bytes() != before
    with fast.open_image(path) as img:
        assert img.read(2 * CS, 1024) == b"\1" * 1024
        with pytest.raises(ReadOnlyError):
            img.write_compressed(bytes(CS), 0)
    rawp = tmp_path / "r.raw"
    fast.create_image(rawp, CS, format="raw")
    with fast.open_image(rawp, writable=True) as img, pytest.raises(UnsupportedError):
        img.write_compressed(bytes(CS), 0)
    assert_qemu_check_clean(path)


@pytest.mark.qemu
@pytest.mark.clause("qcow2.compressed.shared-sector", "qcow2.compressed.cow-overwrite",
                    "qcow2.compressed.write-packing")
@pytest.mark.parametrize("refcount_bits", [1, 16])
def test_packed_clusters_are_freed_one_by_one(tmp_path: Path, refcount_bits: int) -> None:
    path = tmp_path / "p.qcow2"
    fast.create_image(path, 16 * CS, refcount_bits=refcount_bits)
    rnd = random.Random(9)
    data = b"".join(rnd.randbytes(CS // 4).ljust(CS, b"\0") for _ in range(16))
    with fast.open_image(path, writable=True) as img:
        img.write_compressed_many(data, 0)
        layer = img.driver
        shared = {c for k in range(16) for c in layer._held(layer._entry(k))}
        # ~16 KiB each: four to a host cluster, some spilling into the next one
        # (refcount_bits=1: a cluster each, none shared).
        assert len(shared) == (16 if refcount_bits == 1 else 5)
    assert_qemu_check_clean(path)
    with fast.open_image(path, writable=True) as img:
        img.write(b"new" * 100, 5 * CS + 7)
        img.discard_to_zero(0, 2 * CS)
        img.write_compressed(data[CS : 2 * CS], CS)
    want = bytearray(data)
    want[0 : 2 * CS] = bytes(CS) + data[CS : 2 * CS]
    want[5 * CS + 7 : 5 * CS + 307] = b"new" * 100
    assert_qemu_check_clean(path)
    assert qemu_raw_bytes(path, tmp_path) == bytes(want)


@pytest.mark.qemu
@pytest.mark.clause("crash.power-cut", "crash.order.refcount-before-reference",
                    "crash.order.data-before-entry")
def test_a_cut_during_compressed_writes_leaks_at_most(tmp_path: Path) -> None:
    store = MemoryStorage()
    fast.create_image(store, 32 * 4096, cluster_size=4096)
    rec = RecordingStorage(store)
    rnd = random.Random(2)
    data = b"".join((rnd.randbytes(700) * 2).ljust(4096, b"\0") for _ in range(32))
    img = fast.open_image(rec, writable=True, format="qcow2", l2_cache_tables=1)
    img.write_compressed_many(data[: 16 * 4096], 0)
    img.flush()
    img.write_compressed_many(data[16 * 4096 :], 16 * 4096)
    img.write(b"over", 4096 * 3)
    img.flush()
    img.close()
    assert judge_every_cut(rec, 0) > 10
    with fast.open_image(MemoryStorage(bytes(rec.state_after(rec.mutations))),
                         format="qcow2") as back:
        want = bytearray(data)
        want[4096 * 3 : 4096 * 3 + 4] = b"over"
        assert back.read(0, len(data)) == bytes(want)


@pytest.mark.clause("qcow2.compressed.write-packing", "access.read.no-short")
def test_a_reused_compressed_offset_is_never_read_from_the_inflate_cache() -> None:
    # Found by the random snapshot sequences: a compressed cluster freed and a new one of
    # the same compressed length placed at the same host offset has the same L2 entry; the
    # one-entry inflate cache (keyed by the entry) returned the old data.
    store = MemoryStorage()
    fast.create_image(store, 8 * 4096, cluster_size=4096)
    with fast.open_image(store, writable=True, format="qcow2") as img:
        first = (b"\1" * 2048).ljust(4096, b"\0")
        second = (b"\2" * 2048).ljust(4096, b"\0")
        img.write_compressed(first, 0)
        entry = img.driver._entry(0)
        assert img.read(0, 4096) == first
        img.discard_to_zero(0, 4096)
        img.flush()
        img.write_compressed(second, 0)
        assert img.driver._entry(0) == entry  # the same descriptor...
        assert img.read(0, 4096) == second  # ...for other data

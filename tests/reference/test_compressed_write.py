"""``write_compressed`` of pyimago.reference's qcow2 driver, checked against QEMU.

What we write passes ``qemu-img check`` without errors or leaks and ``qemu-img compare``
against a model of the guest; a sequence of compressed writes into a new image gives the very
file ``qemu-io write -c`` gives; a power cut after any storage write of a compressed write
leaves at most leaks.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pyimago.oracle.crash import RecordingStorage
from pyimago.reference import (
    InvalidRequestError,
    MemoryStorage,
    ReadOnlyError,
    UnsupportedError,
    check,
    create_image,
    open_image,
)
from pyimago.reference.qcow2.compression import compress_cluster
from pyimago.reference.qcow2.tables import ClusterType
from pyimago_tests_reference_helpers import (
    KiB,
    MiB,
    assert_qemu_reads,
    every_cut,
    qemu_check,
    qemu_img,
    qemu_io,
)

pytestmark = pytest.mark.qemu


@pytest.mark.clause("qcow2.compressed.write-packing", "qcow2.compressed.zlib")
@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB])
def test_same_file_as_qemu_io_write_c(tmp_path: Path, cluster_size: int) -> None:
    """Pattern clusters written compressed, out of order: byte-identical to QEMU's file."""
    plan = [(0, 7), (1, 9), (3, 3), (2, 0x55), (5, 1)]
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", theirs,
             str(MiB))
    qemu_io(theirs, [f"write -c -P {p} {c * cluster_size} {cluster_size}" for c, p in plan])
    create_image(ours, MiB, cluster_size=cluster_size)
    with open_image(ours, writable=True) as img:
        for c, p in plan:
            img.write_compressed(bytes([p]) * cluster_size, c * cluster_size)
    # The header cluster aside (QEMU leaves the optional feature name table out of small
    # clusters), the files are the same bytes: tables, refcounts, packed compressed data.
    assert ours.read_bytes()[cluster_size:] == theirs.read_bytes()[cluster_size:]


@pytest.mark.clause(
    "qcow2.compressed.write-fallback",
    "qcow2.compressed.write-packing",
    "qcow2.compressed.zstd",
    "qcow2.compressed.cow-overwrite",
)
@pytest.mark.parametrize(
    ("compression", "cluster_size", "refcount_bits"),
    [("zlib", 512, 16), ("zlib", 64 * KiB, 1), ("zstd", 4 * KiB, 16), ("zlib", 4 * KiB, 2)],
)
def test_mixed_writes_pass_qemu_check(
    tmp_path: Path, compression: str, cluster_size: int, refcount_bits: int
) -> None:
    """Compressible and incompressible clusters, a partial last cluster, normal writes over
    compressed clusters: qemu-img check is clean and the guest reads the model."""
    cs = cluster_size
    tail = b"tail" * (cs // 16) if cs >= 2 * KiB else b""  # a partial last cluster
    size = 24 * cs + len(tail)
    rng = random.Random(cs + refcount_bits)
    model = bytearray(size)
    path = tmp_path / "t.qcow2"
    create_image(path, size, cluster_size=cs, refcount_bits=refcount_bits,
                 compression_type=compression)
    with open_image(path, writable=True) as img:
        for c in rng.sample(range(24), 24):
            kind = rng.choice(["text", "noise", "zero", "half"])
            data = {
                "text": (f"cluster {c} ".encode() * cs)[:cs],
                "noise": rng.randbytes(cs),
                "zero": bytes(cs),
                "half": rng.randbytes(cs // 2) + bytes(cs // 2),
            }[kind]
            img.write_compressed(data, c * cs)
            model[c * cs : (c + 1) * cs] = data
        if tail:
            img.write_compressed(tail, 24 * cs)
            model[24 * cs :] = tail
        # Normal writes into compressed clusters decompress them (copy-on-write).
        for off in (cs // 2, 5 * cs + 3, size - 20):
            img.write(b"overwritten", off)
            model[off : off + 11] = b"overwritten"
        assert img.read(0, size) == model
    report = qemu_check(path)
    assert_qemu_reads(path, bytes(model), tmp_path)
    ours = check(path).to_json()
    for key in ("corruptions", "leaks", "allocated-clusters", "compressed-clusters",
                "fragmented-clusters", "image-end-offset"):
        assert ours.get(key, 0) == report.get(key, 0), key


@pytest.mark.clause("qcow2.compressed.write-fallback")
def test_incompressible_cluster_is_written_plainly() -> None:
    noise = random.Random(5).randbytes(4 * KiB)
    assert compress_cluster(noise, 0) is None
    assert compress_cluster(bytes(4 * KiB), 0) is not None
    storage = MemoryStorage()
    create_image(storage, 64 * KiB, cluster_size=4 * KiB)
    with open_image(storage, writable=True) as img:
        img.write_compressed(noise, 0)
        img.write_compressed(bytes(4 * KiB), 4 * KiB)
        driver = img.driver
        assert driver._get_l2_entry(0).type is ClusterType.NORMAL  # type: ignore[attr-defined]
        entry = driver._get_l2_entry(4 * KiB)  # type: ignore[attr-defined]
        assert entry.type is ClusterType.COMPRESSED and not entry.copied
        assert img.read(0, 8 * KiB) == noise + bytes(4 * KiB)


@pytest.mark.clause("qcow2.compressed.write-whole-cluster",
                    "qcow2.compressed.write-unallocated-only")
def test_refused_requests_change_nothing() -> None:
    storage = MemoryStorage()
    create_image(storage, 64 * KiB + 512, cluster_size=4 * KiB)
    with open_image(storage, writable=True) as img:
        img.write(b"x" * 4 * KiB, 8 * KiB)
        img.write_zeroes(12 * KiB, 4 * KiB)  # v3: a plain zero cluster takes compressed data
        img.flush()
        before = storage.read(0, storage.size())
        for data, offset in [
            (bytes(4 * KiB), 512),             # misaligned
            (bytes(2 * KiB), 0),               # short
            (bytes(8 * KiB), 0),               # two clusters
            (bytes(4 * KiB), 8 * KiB),         # allocated
            (bytes(4 * KiB), 64 * KiB),        # runs past the end: the tail is 512 bytes
        ]:
            with pytest.raises(InvalidRequestError):
                img.write_compressed(data, offset)
        img.flush()
        assert storage.read(0, storage.size()) == before
        img.write_compressed(b"t" * 512, 64 * KiB)
        img.write_compressed(b"z" * 4 * KiB, 12 * KiB)
        with pytest.raises(InvalidRequestError):
            img.write_compressed(b"again" * 100 + bytes(3596), 12 * KiB)  # compressed now
    with open_image(storage) as img:
        assert img.read(64 * KiB, 512) == b"t" * 512
        assert img.read(12 * KiB, 4 * KiB) == b"z" * 4 * KiB
        with pytest.raises(ReadOnlyError):
            img.write_compressed(bytes(4 * KiB), 0)
    raw = MemoryStorage()
    create_image(raw, 64 * KiB, format="raw")
    with open_image(raw, format="raw", writable=True) as img, pytest.raises(UnsupportedError):
        img.write_compressed(bytes(512), 0)


@pytest.mark.clause("crash.power-cut", "qcow2.compressed.write-packing")
def test_power_cut_during_compressed_writes() -> None:
    """A cut after any storage write of a run of compressed writes (packing across host
    clusters, a new L2 table, a refcount block) leaves at most leaks, and every cluster
    reads either its old content (zeroes) or its new one."""
    cs = 512
    storage = MemoryStorage()
    create_image(storage, 160 * KiB, cluster_size=cs)
    rec = RecordingStorage(MemoryStorage(storage.read(0, storage.size()), name="top"))
    clusters = {c: (f"{c:04d}".encode() * cs)[:cs] for c in (0, 1, 2, 130, 131, 300)}
    with open_image(rec, writable=True) as img:
        for c, data in clusters.items():
            img.write_compressed(data, c * cs)
    assert rec.mutations > 6
    for k, image in every_cut(rec):
        with open_image(MemoryStorage(image, name="cut")) as img:
            for c, data in clusters.items():
                assert img.read(c * cs, cs) in (data, bytes(cs)), f"cut {k}, cluster {c}"

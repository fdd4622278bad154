"""pyimago.fast writes images with extended L2 entries and external data files as QEMU does.

Every image is created by ``fast.create_image`` (or by qemu-img and then written by us), and
judged by qemu-img: ``check`` finds no errors and no leaks, ``compare`` finds the guest disk
we expect, ``map`` maps it as we do; a ``data_file_raw`` data file holds the raw disk.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pyimago import fast
from pyimago.reference import InvalidRequestError, PreallocateMode
from pyimago_tests_interop_mapcheck import assert_same_bytes, assert_shallow_map_like_qemu

if TYPE_CHECKING:
    from .conftest import QemuTools

pytestmark = [pytest.mark.qemu]

KiB = 1024
MiB = 1 << 20


def _judge(qemu: QemuTools, path: Path, want: bytes, name: str) -> None:
    """qemu-img check clean, compare equal, map as we map."""
    out = qemu.check(path)
    assert out.get("corruptions", 0) == 0 and out.get("check-errors", 0) == 0, (name, out)
    assert out.get("leaks", 0) == 0, (name, out)
    assert_same_bytes(qemu.convert_raw(path), want, 0, name)
    qmap = qemu.map(path)
    formats = [layer["format"] for layer in qemu.info(path)]
    with fast.open_image(path) as img:
        assert_same_bytes(bytes(img.read(0, img.size)), want, 0, f"{name} (ours)")
        assert_shallow_map_like_qemu(img, qmap, formats, name)


# -- create_image ------------------------------------------------------------------------------


@pytest.mark.clause("create.qcow2.extended-l2", "create.qcow2.data-file")
@pytest.mark.parametrize(
    ("options", "qemu_opts"),
    [
        ({"extended_l2": True, "cluster_size": 8192}, "extended_l2=on,cluster_size=8k"),
        ({"extended_l2": True, "compat": "0.10"}, "extended_l2=on,compat=0.10"),
        ({"data_file": "d.raw", "compat": "0.10"}, "data_file=d.raw,compat=0.10"),
        ({"data_file_raw": True}, "data_file_raw=on"),
        ({"data_file": "d.raw", "data_file_raw": True, "backing_file": "b.raw",
          "backing_fmt": "raw"},
         "data_file=d.raw,data_file_raw=on,backing_file=b.raw,backing_fmt=raw"),
    ],
)
def test_create_refuses_what_qemu_refuses(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any], qemu_opts: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    fast.create_image(tmp_path / "b.raw", MiB, format="raw")
    proc = qemu.img("create", "-q", "-f", "qcow2", "-o", qemu_opts, tmp_path / "q.qcow2", "1M",
                    ok=(1,))
    assert proc.returncode == 1
    with pytest.raises(InvalidRequestError, match="create_image"):
        fast.create_image(tmp_path / "a.qcow2", MiB, **options)
    assert not (tmp_path / "d.raw").exists()


@pytest.mark.parametrize("key", ["extended_l2", "data_file_raw"])
def test_create_flags_must_be_bools(tmp_path: Path, key: str) -> None:
    with pytest.raises(InvalidRequestError, match=key):
        fast.create_image(tmp_path / "a.qcow2", MiB, data_file="d.raw", **{key: "on"})


@pytest.mark.clause("create.qcow2.extended-l2", "create.qcow2.data-file", "create.layout")
@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize(
    "options",
    [{"extended_l2": True, "cluster_size": 16384}, {"data_file": "d.raw"},
     {"data_file": "d.raw", "data_file_raw": True},
     {"data_file": "d.raw", "extended_l2": True, "cluster_size": 32768}],
    ids=["extl2", "data-file", "data-file-raw", "data-file-extl2"],
)
def test_created_images_are_what_qemu_makes(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any], prealloc: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.raw").write_bytes(b"stale" * 1000)  # emptied, as qemu-img empties it
    size = 3 * MiB + 512
    path = tmp_path / "a.qcow2"
    fast.create_image(path, size, preallocation=prealloc, **options)
    info = qemu.info(path)[0]["format-specific"]["data"]
    assert info["extended-l2"] is bool(options.get("extended_l2"))
    assert info.get("data-file") == options.get("data_file")
    if "data_file" in options:
        assert info["data-file-raw"] is bool(options.get("data_file_raw"))
        assert os.path.getsize(tmp_path / "d.raw") == size
    _judge(qemu, path, bytes(size), f"{options} {prealloc}")


# -- writes, zeroes, discards ------------------------------------------------------------------


_CONFIGS = {
    "extl2-64k": {"extended_l2": True},
    "extl2-16k": {"extended_l2": True, "cluster_size": 16384},
    "data-file": {"data_file": "d.raw", "cluster_size": 4096},
    "data-file-raw": {"data_file": "d.raw", "data_file_raw": True, "cluster_size": 4096},
    "data-file-extl2": {"data_file": "d.raw", "extended_l2": True, "cluster_size": 32768},
}


def _random_ops(img: Any, want: bytearray, seed: int, count: int, sub: int) -> None:
    """Writes, zeroings and discards at odd and subcluster-aligned places."""
    rnd = random.Random(seed)
    size = len(want)
    for _ in range(count):
        off = rnd.randrange(size)
        n = rnd.randrange(1, min(size - off, 3 * sub + 1000) + 1)
        if rnd.random() < 0.5:
            off -= off % sub
            n = min(max(sub, n - n % sub), size - off)
        op = rnd.random()
        if op < 0.55:
            data = bytes([rnd.randrange(1, 256)]) * n
            img.write(data, off)
            want[off : off + n] = data
        elif op < 0.7:
            img.write_zeroes(off, n)
            want[off : off + n] = bytes(n)
        elif op < 0.8:
            img.discard_to_zero(off, n)
            want[off : off + n] = bytes(n)
        elif op < 0.9:
            img.discard_to_backing(off, n)
            want[off : off + n] = img.read(off, n)
        else:
            img.discard_to_any(off, n)
            want[off : off + n] = img.read(off, n)


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.extended-l2.clear",
                    "qcow2.data-file.write", "qcow2.data-file.raw", "interop.qemu-check",
                    "interop.qemu-map")
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("config", sorted(_CONFIGS))
def test_random_operations_pass_qemu_check_and_compare(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, seed: int
) -> None:
    monkeypatch.chdir(tmp_path)
    options = _CONFIGS[config]
    size = 2 * MiB
    path = tmp_path / "a.qcow2"
    fast.create_image(path, size, **options)
    cs = int(options.get("cluster_size", 65536))
    sub = cs // 32 if options.get("extended_l2") else cs
    want = bytearray(size)
    with fast.open_image(path, writable=True) as img:
        _random_ops(img, want, seed, 120, sub)
        assert_same_bytes(bytes(img.read(0, size)), bytes(want), 0, "before close")
    _judge(qemu, path, bytes(want), f"{config} seed {seed}")
    if options.get("data_file_raw"):
        assert qemu.info(path)[0]["format-specific"]["data"]["data-file-raw"] is True
        assert_same_bytes((tmp_path / "d.raw").read_bytes(), bytes(want), 0, "raw data file")


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.extended-l2.clear", "interop.qemu-map")
@pytest.mark.parametrize("seed", [3, 4])
def test_extended_l2_over_a_backing_file(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Copy-on-write per subcluster: what the backing shows through stays there."""
    monkeypatch.chdir(tmp_path)
    size = 2 * MiB
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, str(size))
    qemu.io(base, [f"write -P 0xaa 0 {size}"])
    path = tmp_path / "top.qcow2"
    fast.create_image(path, size, extended_l2=True, cluster_size=32768,
                      backing_file="base.qcow2", backing_fmt="qcow2")
    want = bytearray(b"\xaa" * size)
    with fast.open_image(path, writable=True) as img:
        _random_ops(img, want, seed, 100, 1024)
    _judge(qemu, path, bytes(want), f"backed seed {seed}")


@pytest.mark.clause("qcow2.extended-l2.write", "interop.qemu-map")
def test_untouched_subclusters_stay_unallocated(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's calculate_l2_meta: a write into a new cluster copies only the subclusters it
    touches; the rest keeps showing the backing file."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xbb" * MiB)
    path = tmp_path / "top.qcow2"
    fast.create_image(path, MiB, extended_l2=True, backing_file="base.raw", backing_fmt="raw")
    with fast.open_image(path, writable=True) as img:
        img.write(b"\x01" * 1000, 3000)  # inside subcluster 1 (2 KiB subclusters)
        img.write(b"\x02" * 4096, 65536 + 6144)  # subclusters 3 and 4 of cluster 1, aligned
    top = [e for e in qemu.map(path) if e["depth"] == 0]
    assert [(e["start"], e["length"]) for e in top] == [(2048, 2048), (65536 + 6144, 4096)]
    want = bytearray(b"\xbb" * MiB)
    want[3000:4000] = b"\x01" * 1000
    want[65536 + 6144 : 65536 + 10240] = b"\x02" * 4096
    _judge(qemu, path, bytes(want), "untouched")


@pytest.mark.clause("qcow2.extended-l2.clear")
def test_zeroing_works_per_subcluster(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "a.qcow2"
    fast.create_image(path, MiB, extended_l2=True)
    with fast.open_image(path, writable=True) as img:
        img.write(b"\x05" * 3 * 65536, 0)
        img.write_zeroes(4096, 4096)  # subclusters 2 and 3: zero bits, no data written
        img.discard_to_zero(16384, 2048 + 100)  # subcluster 8, and zeroes written into 9
        # qcow2.extended-l2.clear: whole subclusters are discarded (subclusters 1-31 of
        # cluster 1), as QEMU 9.1 does (QEMU 7.2 would leave the partial cluster alone).
        img.discard_to_backing(65536 + 2048, 65536)
        img.discard_to_backing(2 * 65536, 65536)
    entries = [(e["start"], e["length"], e["zero"], e["data"]) for e in qemu.map(path)]
    assert entries[:5] == [(0, 4096, False, True), (4096, 4096, True, False),
                           (8192, 8192, False, True), (16384, 2048, True, False),
                           (18432, 65536 + 2048 - 18432, False, True)]
    assert all(e[2] and not e[3] for e in entries[5:]), entries[5:]
    want = bytearray(b"\x05" * (65536 + 2048) + bytes(MiB - 65536 - 2048))
    want[4096:8192] = bytes(4096)
    want[16384:18532] = bytes(2148)
    _judge(qemu, path, bytes(want), "zeroing")


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.data-file.write", "interop.qemu-read")
@pytest.mark.parametrize("options", ["extended_l2=on,cluster_size=16k",
                                     "data_file=d.raw,cluster_size=4k",
                                     "data_file=d.raw,data_file_raw=on,extended_l2=on"])
def test_writing_qemu_made_images(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "q.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", options, path, "2M")
    qemu.io(path, ["write -P 0x11 0 100k", "write -z 200k 50k", "write -P 0x22 1000k 3k",
                   "discard 64k 32k"])
    want = bytearray(qemu.convert_raw(path))
    with fast.open_image(path, writable=True) as img:
        _random_ops(img, want, 7, 80, 512)
    _judge(qemu, path, bytes(want), options)
    if "data_file_raw" in options:
        assert_same_bytes((tmp_path / "d.raw").read_bytes(), bytes(want), 0, "raw data file")


# -- resize ------------------------------------------------------------------------------------


@pytest.mark.clause("qcow2.data-file.resize", "qcow2.extended-l2.write")
@pytest.mark.parametrize("mode", list(PreallocateMode))
@pytest.mark.parametrize("config", ["extl2-16k", "data-file-raw", "data-file-extl2"])
def test_resize(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str,
    mode: PreallocateMode,
) -> None:
    monkeypatch.chdir(tmp_path)
    options = _CONFIGS[config]
    path = tmp_path / "a.qcow2"
    fast.create_image(path, MiB, **options)
    cut = MiB - 70 * KiB - 512
    with fast.open_image(path, writable=True) as img:
        img.write(b"\x09" * (MiB - 1000), 500)
        img.resize(cut)
        img.resize(2 * MiB + 512, mode)
        grown = img.read(cut, 2 * MiB + 512 - cut)
    if mode is not PreallocateMode.NONE or options.get("data_file_raw"):
        # NONE leaves the area unspecified (the cut cluster's old bytes may show, as on
        # plain images); a raw data file is mapped whole (preallocation=metadata).
        assert grown == bytes(len(grown))
    want = bytearray(2 * MiB + 512)
    want[500:cut] = b"\x09" * (cut - 500)
    want[cut:] = grown
    _judge(qemu, path, bytes(want), f"{config} {mode}")
    if "data_file" in options:
        assert os.path.getsize(tmp_path / "d.raw") == 2 * MiB + 512
    if options.get("data_file_raw"):
        assert_same_bytes((tmp_path / "d.raw").read_bytes(), bytes(want), 0, "raw data file")


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.extended-l2.clear", "interop.qemu-check")
@pytest.mark.parametrize("kind", ["compressed", "snapshot"])
def test_extended_l2_over_compressed_and_shared_clusters(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Writes into compressed clusters (copied whole) and into clusters a snapshot shares
    (no COPIED: copied from the first to the last allocated subcluster, bitmap kept)."""
    monkeypatch.chdir(tmp_path)
    size = 2 * MiB
    src = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", src,
             str(size))
    qemu.io(src, ["write -P 0x31 0 300k", "write -P 0x32 1000k 7k", "write -z 100k 10k",
                  "write -P 0x33 1500k 1k"])
    path = tmp_path / "img.qcow2"
    if kind == "compressed":
        qemu.img("convert", "-c", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k",
                 src, path)
    else:
        path = src
        qemu.img("snapshot", "-c", "s1", path)
    before = qemu.convert_raw(path)
    want = bytearray(before)
    with fast.open_image(path, writable=True) as img:
        _random_ops(img, want, 11, 60, 1024)
        img.write(b"\x44" * 100, 1000 * KiB + 5000)  # inside a shared/compressed cluster
        want[1000 * KiB + 5000 : 1000 * KiB + 5100] = b"\x44" * 100
    _judge(qemu, path, bytes(want), kind)
    if kind == "snapshot":
        snap = tmp_path / "snap.raw"
        qemu.img("convert", "-l", "s1", "-O", "raw", path, snap)
        # The snapshot still reads what the image held when it was taken.
        assert_same_bytes(snap.read_bytes(), before, 0, "snapshot s1")


@pytest.mark.clause("qcow2.data-file.write")
def test_data_file_mappings_name_the_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyimago.reference import RawMapping

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "a.qcow2"
    fast.create_image(path, MiB, data_file="d.raw", cluster_size=4096)
    with fast.open_image(path, writable=True) as img:
        storage, host, n = img.ensure_data_mapping(8192 + 100, 5000, True)
        assert (host, n) == (8192 + 100, 4096 - 100)
        assert storage.name.endswith("d.raw") or "d.raw" in str(storage)
        storage.write(b"\x07" * n, host)
        img.write(b"\x08" * 4096, 0)
        m, ln = img.get_mapping(0, MiB)
        assert isinstance(m, RawMapping) and (m.offset, ln) == (0, 4096)
        assert "d.raw" in str(m.storage)
        assert img.read(8192, 200) == bytes(100) + b"\x07" * 100
    assert (tmp_path / "d.raw").read_bytes()[:4096] == b"\x08" * 4096


@pytest.mark.clause("qcow2.extended-l2.write", "interop.qemu-check", "interop.qemu-compare")
def test_extended_l2_with_compressed_writes_and_snapshots(
    qemu: QemuTools, tmp_path: Path
) -> None:
    """The other write features of pyimago.fast on an extended L2 image: compressed clusters
    and an internal snapshot, then writes that copy them on write per subcluster."""
    size = 2 * MiB
    path = tmp_path / "x.qcow2"
    fast.create_image(path, size, extended_l2=True, cluster_size=32768)
    want = bytearray(size)
    with fast.open_image(path, writable=True) as img:
        for k in range(8):
            data = bytes([k + 1]) * 32768
            img.write_compressed(data, k * 3 * 32768)
            want[k * 3 * 32768 : (k * 3 + 1) * 32768] = data
        img.write(b"\x11" * 70000, 100000)
        want[100000:170000] = b"\x11" * 70000
        img.create_snapshot("s1")
        snap = bytes(want)
        _random_ops(img, want, 5, 80, 1024)
    _judge(qemu, path, bytes(want), "after the snapshot")
    out = tmp_path / "s1.raw"
    qemu.img("convert", "-l", "s1", "-O", "raw", path, out)
    assert_same_bytes(out.read_bytes(), snap, 0, "snapshot s1")
    with fast.open_image(path, writable=True) as img:
        img.delete_snapshot("s1")
        img.write(b"\x55" * 40000, 0)
        want[:40000] = b"\x55" * 40000
    _judge(qemu, path, bytes(want), "after deleting the snapshot")


@pytest.mark.clause("qcow2.data-file.raw", "create.qcow2.data-file",
                    "create.qcow2.extended-l2")
@pytest.mark.parametrize("options", ["data_file=d.raw,data_file_raw=on",
                                     "extended_l2=on,preallocation=metadata,backing_file=b.raw,"
                                     "backing_fmt=raw"])
def test_created_layout_maps_as_qemu_made_one(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str
) -> None:
    """A raw data file is mapped whole from the start (qemu-img: preallocation=metadata);
    extended L2 preallocation over a backing file allocates no subcluster."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.raw").write_bytes(b"\x61" * MiB)
    qemu.img("create", "-q", "-f", "qcow2", "-o", options, tmp_path / "q.qcow2", "1M")
    kwargs: dict[str, Any] = {}
    for item in options.split(","):
        key, value = item.split("=")
        kwargs[key] = {"on": True}.get(value, value)
    fast.create_image(tmp_path / "f.qcow2", MiB, **kwargs)
    strip = [{k: v for k, v in e.items() if k != "offset"} for e in qemu.map(tmp_path / "q.qcow2")]
    ours = [{k: v for k, v in e.items() if k != "offset"} for e in qemu.map(tmp_path / "f.qcow2")]
    assert ours == strip
    with fast.open_image(tmp_path / "f.qcow2", writable=True) as img:
        img.resize(2 * MiB)
    if "data_file_raw" in options:
        qemu.img("resize", tmp_path / "q.qcow2", "2M")
        assert qemu.map(tmp_path / "f.qcow2") == qemu.map(tmp_path / "q.qcow2")


@pytest.mark.clause("qcow2.data-file.raw-cleared")
def test_raw_bit_cleared_when_a_backing_shows_through(
    qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "a.qcow2"
    fast.create_image(path, MiB, data_file="d.raw", data_file_raw=True)
    base = tmp_path / "b.raw"
    base.write_bytes(b"\x62" * MiB)
    with fast.open_image(base, format="raw") as below, \
            fast.open_image(path, writable=True, backing=below) as img:
        img.write(b"\x01" * 4096, 0)
        img.discard_to_zero(0, 65536)
        img.flush()
        assert path.read_bytes()[88:96] == (2).to_bytes(8, "big")  # autoclear bit 1
        img.discard_to_backing(65536, 65536)
        assert img.read(65536, 4) == b"\x62" * 4
        assert path.read_bytes()[88:96] == bytes(8)
    assert qemu.info(path)[0]["format-specific"]["data"]["data-file-raw"] is False

"""qcow2 features QEMU writes every day, read by both implementations as QEMU reads them.

Extended L2 entries (subclusters), external data files (``data_file_raw`` or not), internal
snapshots (listed, and opened read-only as ``qemu-img convert -l`` reads them), dirty images
(lazy refcounts, left dirty by ``qemu-io -c abort``) and corrupt-marked images.  Every image
is made by qemu-img / qemu-io here; the peer images of ``/work/shared/peer-images`` are
read too when present.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyimago import fast, reference
from pyimago.reference import (
    CorruptImageError,
    GateDeniedError,
    ImageNotFoundError,
    InvalidRequestError,
    SnapshotInfo,
    UnsupportedFeatureError,
)
from pyimago_tests_interop_mapcheck import (
    assert_deep_map_like_qemu,
    assert_same_bytes,
    assert_shallow_map_like_qemu,
)
from pyimago_tests_qemu import peer_images_folder

if TYPE_CHECKING:
    from .conftest import QemuTools

pytestmark = [pytest.mark.qemu]

KiB = 1024
MiB = 1 << 20
PEER = peer_images_folder()

Opener = Callable[..., Any]


@pytest.fixture(params=["reference", "fast"])
def open_image(request: pytest.FixtureRequest) -> Opener:
    """``open_image`` of each implementation."""
    opener: Opener = reference.open_image if request.param == "reference" else fast.open_image
    return opener


def _read_all(img: Any) -> bytes:
    return bytes(img.read(0, img.size))


def _assert_reads_like_qemu(img: Any, qemu: QemuTools, path: Path, name: str,
                            *convert_args: str) -> None:
    out = path.parent / f"{path.name}.{len(convert_args)}.raw"
    qemu.img("convert", *convert_args, "-O", "raw", path, out)
    want = out.read_bytes()
    assert img.size == len(want), f"{name}: size {img.size} != qemu's {len(want)}"
    assert_same_bytes(_read_all(img), want, 0, name)
    # odd chunks, crossing subcluster and cluster boundaries
    pos, step = 0, 3 * KiB + 17
    while pos < len(want):
        got = bytes(img.read(pos, min(step, len(want) - pos)))
        assert_same_bytes(got, want[pos : pos + len(got)], pos, f"{name} chunk at {pos}")
        pos += step * 7


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- extended L2 entries ---------------------------------------------------------------------------


def _extl2_image(qemu: QemuTools, folder: Path, *, cluster: int, backing: bool) -> Path:
    path = folder / f"extl2-{cluster}-{backing}.qcow2"
    size = max(4 * MiB, 12 * cluster)
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o",
                              f"extended_l2=on,cluster_size={cluster}"]
    if backing:
        base = folder / f"base-{cluster}.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", base, str(size))
        qemu.io(base, [f"write -P 0xaa 0 {size}"])
        args += ["-b", base.name, "-F", "qcow2"]
    qemu.img(*args, path, str(size))
    sc = cluster // 32
    qemu.io(path, [
        f"write -P 0x11 {sc} {sc}",  # one subcluster of the first cluster
        f"write -P 0x22 {cluster + 3 * sc} {5 * sc}",  # a run inside a cluster
        f"write -z {2 * cluster + 4 * sc} {2 * sc}",  # zero subclusters, no host cluster
        f"write -z {4 * cluster} {cluster}",  # a whole zero cluster
        f"write -P 0x33 {8 * cluster} {2 * cluster}",  # whole clusters
        f"write -z {8 * cluster + sc} {sc}",  # zero subcluster of an allocated cluster
        f"write -P 0x44 {MiB - sc} {3 * sc}",  # across an L2-table-sized boundary
        f"discard {9 * cluster} {cluster}",
    ])
    return path


@pytest.mark.clause("qcow2.extended-l2.subclusters", "qcow2.extended-l2.bitmap",
                    "qcow2.features.extended-l2", "interop.qemu-read", "interop.qemu-map")
@pytest.mark.parametrize("cluster", [16 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("backing", [False, True])
def test_extended_l2_reads_and_maps_as_qemu(
    open_image: Opener, qemu: QemuTools, tmp_path: Path, cluster: int, backing: bool
) -> None:
    path = _extl2_image(qemu, tmp_path, cluster=cluster, backing=backing)
    qmap = qemu.map(path)
    formats = [layer["format"] for layer in qemu.info(path)]
    with open_image(path) as img:
        _assert_reads_like_qemu(img, qemu, path, path.name)
        assert_shallow_map_like_qemu(img, qmap, formats, path.name)
        assert_deep_map_like_qemu(img, qmap, formats, path.name)


@pytest.mark.clause("qcow2.extended-l2.subclusters", "qcow2.extended-l2.bitmap",
                    "qcow2.data-file.offsets", "qcow2.snapshots.open", "interop.qemu-read",
                    "interop.qemu-map")
@pytest.mark.parametrize("kind", ["compressed", "data-file", "snapshot"])
def test_extended_l2_combined(
    open_image: Opener, qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """Extended L2 entries with compressed clusters, with an external data file, and in an
    internal snapshot."""
    monkeypatch.chdir(tmp_path)
    src = _extl2_image(qemu, tmp_path, cluster=32 * KiB, backing=False)
    path = tmp_path / f"{kind}.qcow2"
    convert_args: tuple[str, ...] = ()
    if kind == "compressed":
        qemu.img("convert", "-c", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k",
                 src, path)
        qemu.io(path, ["write -P 0x77 3k 1k", "write -z 40k 2k"])  # a subcluster over data
    elif kind == "data-file":
        qemu.img("create", "-q", "-f", "qcow2", "-o",
                 "extended_l2=on,cluster_size=32k,data_file=x.data", path, "4M")
        qemu.io(path, ["write -P 0x78 0 3k", "write -P 0x79 33k 2k", "write -z 70k 1k",
                       "write -P 0x7a 1M 100k"])
    else:
        shutil.copy(src, path)
        qemu.img("snapshot", "-q", "-c", "s", path)
        qemu.io(path, ["write -P 0x7b 0 64k", "discard 256k 64k"])
        convert_args = ("-l", "s")
    with open_image(path, snapshot="s" if convert_args else None) as img:
        _assert_reads_like_qemu(img, qemu, path, kind, *convert_args)
        if not convert_args:
            qmap = qemu.map(path)
            assert_shallow_map_like_qemu(img, qmap, ["qcow2"], kind)
            assert_deep_map_like_qemu(img, qmap, ["qcow2"], kind)


def _patch_l2_bitmap(path: Path, cluster_index: int, bitmap: int, entry: int | None = None) -> None:
    """Rewrite the extended L2 entry of guest cluster ``cluster_index`` (first L2 table)."""
    with path.open("r+b") as f:
        head = f.read(104)
        l1_offset = struct.unpack_from(">Q", head, 40)[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        assert l2_offset, "the image has no first L2 table"
        f.seek(l2_offset + 16 * cluster_index)
        if entry is not None:
            f.write(struct.pack(">Q", entry))
        else:
            f.seek(8, os.SEEK_CUR)
        f.write(struct.pack(">Q", bitmap))


@pytest.fixture(scope="module")
def extl2_base(qemu: QemuTools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 KiB-cluster image with extended L2 entries over a backing file; clusters 0-3 and
    8 have host clusters."""
    folder = tmp_path_factory.mktemp("extl2-base")
    path = _extl2_image(qemu, folder, cluster=64 * KiB, backing=True)
    qemu.io(path, [f"write -P {0x90 + i} {i * 64 * KiB + 1000} 60000" for i in range(4)])
    return path


_BITMAPS = st.lists(
    st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)), min_size=12, max_size=12
)


@pytest.mark.slow
@pytest.mark.clause("qcow2.extended-l2.bitmap", "interop.qemu-read", "interop.qemu-map")
@settings(max_examples=15, deadline=None)
@given(bitmaps=_BITMAPS)
def test_random_subcluster_bitmaps_read_as_qemu(
    extl2_base: Path, qemu: QemuTools, bitmaps: list[tuple[int, int]]
) -> None:
    """Random valid bitmaps on the first 12 clusters: both implementations read and map as
    qemu-img does (allocated and zero bits never overlap; clusters without a host cluster
    get zero bits only)."""
    path = extl2_base.with_name("random.qcow2")  # next to the backing file it names
    shutil.copy(extl2_base, path)
    with path.open("r+b") as f:
        l1_offset = struct.unpack(">Q", (f.seek(40), f.read(8))[1])[0]
        l2_offset = struct.unpack(">Q", (f.seek(l1_offset), f.read(8))[1])[0] & 0x00FFFFFFFFFFFE00
        for i, (alloc, zero) in enumerate(bitmaps):
            f.seek(l2_offset + 16 * i)
            entry = struct.unpack(">Q", f.read(8))[0]
            if not entry & 0x00FFFFFFFFFFFE00:
                alloc = 0  # no host cluster: nothing may be allocated
            f.write(struct.pack(">Q", (zero & ~alloc) << 32 | alloc))
    qmap = qemu.map(path)
    formats = [layer["format"] for layer in qemu.info(path)]
    for opener in (reference.open_image, fast.open_image):
        with opener(path) as img:
            _assert_reads_like_qemu(img, qemu, path, f"{opener.__module__}")
            assert_shallow_map_like_qemu(img, qmap, formats, opener.__module__)
            assert_deep_map_like_qemu(img, qmap, formats, opener.__module__)


@pytest.mark.clause("qcow2.extended-l2.bitmap")
@pytest.mark.parametrize(
    ("cluster_index", "bitmap", "entry"),
    [
        (0, (1 << 33) | (1 << 1), None),  # allocated cluster: subcluster 1 both alloc and zero
        (5, 1 << 7, 0),  # no host cluster, but a subcluster marked allocated
    ],
)
def test_invalid_subcluster_bitmaps_are_corrupt(
    open_image: Opener, qemu: QemuTools, tmp_path: Path, cluster_index: int, bitmap: int,
    entry: int | None,
) -> None:
    path = _extl2_image(qemu, tmp_path, cluster=64 * KiB, backing=False)
    _patch_l2_bitmap(path, cluster_index, bitmap, entry)
    # QEMU refuses to read it too (-EIO).
    proc = qemu.img("convert", "-O", "raw", path, tmp_path / "x.raw", ok=(0, 1))
    assert proc.returncode == 1
    with open_image(path) as img, pytest.raises(CorruptImageError, match="bitmap"):
        img.read(cluster_index * 64 * KiB, 64 * KiB)


# -- external data files ---------------------------------------------------------------------------


def _data_file_image(qemu: QemuTools, folder: Path, *, raw: bool) -> tuple[Path, Path]:
    """An image with a data file named relatively; the caller is in ``folder``, as QEMU 7.2
    resolves relative data file names against the working directory."""
    assert Path.cwd() == folder
    path = folder / "df.qcow2"
    data = folder / "df.data"
    opts = f"data_file={data.name},cluster_size=4096" + (",data_file_raw=on" if raw else "")
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, path, "3M")
    qemu.io(path, [
        "write -P 0x51 0 5000",  # guest offset 0: host offset 0 in the data file
        f"write -P 0x52 {MiB - 100} 8292",
        f"write -z {2 * MiB} 16384",
        f"write -P 0x53 {3 * MiB - 4096} 4096",
    ])
    return path, data


@pytest.mark.clause("qcow2.data-file.offsets", "qcow2.data-file.open", "interop.qemu-read",
                    "interop.qemu-map")
@pytest.mark.parametrize("raw", [False, True])
def test_data_file_reads_and_maps_as_qemu(
    open_image: Opener, qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    path, data = _data_file_image(qemu, tmp_path, raw=raw)
    qmap = qemu.map(path)
    with open_image(path) as img:
        assert img.driver.data_file == data.name
        _assert_reads_like_qemu(img, qemu, path, path.name)
        assert_shallow_map_like_qemu(img, qmap, ["qcow2"], path.name)
        assert_deep_map_like_qemu(img, qmap, ["qcow2"], path.name)
        m, _ = img.get_mapping(0, 4096)
        assert m.storage is not img.driver.storage, "data must come from the data file"


@pytest.mark.clause("qcow2.data-file.open")
def test_data_file_given_explicitly(
    open_image: Opener, qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path, data = _data_file_image(qemu, tmp_path, raw=False)
    want = qemu.convert_raw(path)
    moved = tmp_path / "elsewhere.bin"
    data.rename(moved)
    with pytest.raises(ImageNotFoundError) as info:
        open_image(path)
    assert info.value.filename.endswith(data.name)
    with open_image(path, data_file=moved) as img:
        assert_same_bytes(_read_all(img), want, 0, "data_file=")
    plain = tmp_path / "plain.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", plain, "1M")
    with pytest.raises(InvalidRequestError, match="data_file"):
        open_image(plain, data_file=moved)


@pytest.mark.clause("qcow2.data-file.open")
def test_data_file_goes_through_the_gate(
    open_image: Opener, qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path, data = _data_file_image(qemu, tmp_path, raw=False)
    seen: list[tuple[str, str | None]] = []

    class Deny:
        def check(self, p: str, *, format: str | None, writable: bool, referrer: str) -> None:
            seen.append((p, format))
            raise GateDeniedError(f"{referrer} may not open {p}")

    with pytest.raises(GateDeniedError):
        open_image(path, gate=Deny())
    assert seen == [(str(data), "raw")]


def _gunzip(name: str, folder: Path) -> Path:
    src = PEER / "dissect.hypervisor" / f"{name}.gz"
    if not src.exists():
        pytest.skip(f"peer image {src} is absent")
    out = folder / name
    with gzip.open(src) as fin, out.open("wb") as fout:
        shutil.copyfileobj(fin, fout)
    return out


@pytest.mark.slow
@pytest.mark.clause("qcow2.data-file.offsets", "qcow2.data-file.open", "interop.qemu-read")
def test_peer_data_file_image(
    open_image: Opener, qemu: QemuTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _gunzip("data-file.qcow2", tmp_path)
    _gunzip("data-file.bin", tmp_path)
    out = tmp_path / "want.raw"
    qemu.img("convert", "-O", "raw", path, out)
    with open_image(path) as img, out.open("rb") as want:
        assert img.size == out.stat().st_size
        for pos in range(0, img.size, 16 * MiB):
            got = bytes(img.read(pos, 16 * MiB))
            assert_same_bytes(got, want.read(16 * MiB), pos, "data-file.qcow2")
        assert_shallow_map_like_qemu(img, qemu.map(path), ["qcow2"], "data-file.qcow2")


# -- internal snapshots ----------------------------------------------------------------------------


def _expected_snapshots(qemu: QemuTools, path: Path) -> list[SnapshotInfo]:
    info = json.loads(qemu.img("info", "--output=json", path).stdout)
    return [
        SnapshotInfo(
            id=s["id"], name=s["name"], vm_state_size=s["vm-state-size"],
            date_sec=s["date-sec"], date_nsec=s["date-nsec"],
            vm_clock_nsec=s["vm-clock-sec"] * 10**9 + s["vm-clock-nsec"],
            disk_size=-1, icount=s.get("icount"),
        )
        for s in info.get("snapshots", [])
    ]


def _without_disk_size(s: SnapshotInfo) -> SnapshotInfo:
    return SnapshotInfo(s.id, s.name, s.vm_state_size, s.date_sec, s.date_nsec,
                        s.vm_clock_nsec, -1, s.icount)


def _snapshot_image(qemu: QemuTools, folder: Path, compat: str) -> Path:
    path = folder / f"snap-{compat}.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"compat={compat},cluster_size=4096",
             path, "2M")
    qemu.io(path, ["write -P 0x61 0 1M", "write -P 0x62 5000 9000"])
    qemu.img("snapshot", "-q", "-c", "first", path)
    qemu.io(path, ["write -P 0x63 4096 8192", "write -z 65536 65536", "discard 200k 8k"])
    qemu.img("snapshot", "-q", "-c", "second one", path)
    if compat != "0.10":  # QEMU cannot resize v2 images with snapshots
        qemu.img("resize", "-q", path, "3M")  # the snapshots keep their smaller disk size
    qemu.io(path, ["write -P 0x64 1900k 100k", "write -P 0x65 0 512"])
    return path


@pytest.mark.clause("qcow2.snapshots.list", "qcow2.snapshots.open", "interop.qemu-read")
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_snapshots_list_and_read_as_qemu(
    open_image: Opener, qemu: QemuTools, tmp_path: Path, compat: str
) -> None:
    path = _snapshot_image(qemu, tmp_path, compat)
    want = _expected_snapshots(qemu, path)
    with open_image(path) as img:
        listed = img.driver.snapshots
        assert [_without_disk_size(s) for s in listed] == want
        assert [s.disk_size for s in listed] == [2 * MiB, 2 * MiB]
        _assert_reads_like_qemu(img, qemu, path, "active")
    for key in ("1", "first", "2", "second one"):
        with open_image(path, snapshot=key) as snap:
            # the image's size, as qemu-img convert -l reads it
            assert snap.size == (2 if compat == "0.10" else 3) * MiB
            assert snap.driver.snapshot.name in ("first", "second one")
            _assert_reads_like_qemu(snap, qemu, path, f"snapshot {key}", "-l", key)
    with pytest.raises(InvalidRequestError, match="no snapshot"):
        open_image(path, snapshot="third")
    with pytest.raises(InvalidRequestError, match="read-only"):
        open_image(path, snapshot="first", writable=True)


@pytest.mark.clause("qcow2.snapshots.preserved", "qcow2.snapshots.extra-data")
def test_writes_keep_snapshots_and_their_extra_data(
    open_image: Opener, qemu: QemuTools, tmp_path: Path
) -> None:
    path = _snapshot_image(qemu, tmp_path, "1.1")
    snaps = []
    for key in ("first", "second one"):
        out = tmp_path / f"{key}.raw"
        qemu.img("convert", "-l", key, "-O", "raw", path, out)
        snaps.append(out.read_bytes())
    with path.open("rb") as f:
        head = f.read(72)
        table_at = struct.unpack_from(">Q", head, 64)[0]
        f.seek(table_at)
        table = f.read(4096)
    with open_image(path, writable=True) as img:
        img.write(b"\x99" * 20000, 1000)
        img.write_zeroes(300 * KiB, 64 * KiB)
        img.flush()
    qemu.check(path)
    for key, want in zip(("first", "second one"), snaps, strict=True):
        with open_image(path, snapshot=key) as snap:
            assert_same_bytes(_read_all(snap), want, 0, f"snapshot {key} after our writes")
    with path.open("rb") as f:
        f.seek(table_at)
        assert f.read(4096) == table, "the snapshot table (with its extra data) changed"


@pytest.mark.slow
@pytest.mark.clause("qcow2.snapshots.list", "qcow2.snapshots.open", "interop.qemu-read")
def test_peer_snapshot_image(open_image: Opener, qemu: QemuTools, tmp_path: Path) -> None:
    path = _gunzip("snapshot.qcow2", tmp_path)
    want = _expected_snapshots(qemu, path)
    with open_image(path) as img:
        assert [_without_disk_size(s) for s in img.driver.snapshots] == want
    for s in want:
        out = tmp_path / f"{s.id}.raw"
        qemu.img("convert", "-l", s.id, "-O", "raw", path, out)
        with open_image(path, snapshot=s.name) as snap, out.open("rb") as f:
            for pos in range(0, snap.size, 16 * MiB):
                got = bytes(snap.read(pos, 16 * MiB))
                assert_same_bytes(got, f.read(16 * MiB), pos, f"snapshot {s.name}")


# -- dirty and corrupt bits ------------------------------------------------------------------------


@pytest.mark.clause("qcow2.features.dirty", "qcow2.features.lazy-refcounts")
def test_dirty_image_reads_without_writing(
    open_image: Opener, qemu: QemuTools, tmp_path: Path
) -> None:
    path = tmp_path / "dirty.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096",
             path, "2M")
    # qemu-io's abort leaves the image with lazy refcounts unflushed: the dirty bit set
    # (iotest 039 does the same).
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x72 4096 200k", "-c", "abort", str(path)],
        capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode != 0
    with path.open("rb") as f:
        f.seek(72)
        assert struct.unpack(">Q", f.read(8))[0] & 1, "qemu left no dirty bit"
    before = _sha(path)
    with open_image(path) as img:
        _assert_reads_like_qemu(img, qemu, path, "dirty")
    assert _sha(path) == before, "a read-only open changed the dirty image"
    # qcow2.features.dirty: a writable open repairs the refcounts first, then clears the bit.
    with open_image(path, writable=True):
        pass
    qemu.img("check", path)  # repaired: no errors, no leaks (exit 0)
    with path.open("rb") as f:
        f.seek(72)
        assert not struct.unpack(">Q", f.read(8))[0] & 1, "the dirty bit stayed"


@pytest.mark.clause("qcow2.features.corrupt")
def test_corrupt_image_reads_but_is_not_written(
    open_image: Opener, qemu: QemuTools, tmp_path: Path
) -> None:
    path = tmp_path / "corrupt.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, "1M")
    qemu.io(path, ["write -P 0x81 0 100k"])
    with path.open("r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 1 << 1))
    before = _sha(path)
    with open_image(path) as img:
        _assert_reads_like_qemu(img, qemu, path, "corrupt")
    with pytest.raises(UnsupportedFeatureError, match="corrupt") as info:
        open_image(path, writable=True)
    assert "read-only" in str(info.value)  # the reason, and what can be done
    assert _sha(path) == before

"""The reference writes images with extended L2 entries and external data files as QEMU does.

Each test creates an image (with ``create_image`` or ``qemu-img create``), changes it through
``FormatAccess`` while keeping a ``bytearray`` model of what the guest must read, and closes
it.  Then ``qemu-img check`` must find no errors and no leaks, ``qemu-img compare`` must find
the image identical to the model, and (for a raw data file) the data file itself must read as
the model.  Where the result of an operation depends on QEMU's bitmap rules, the raw L2 entry
is compared with the one ``qemu-io`` writes for the same request.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pyimago.reference import (
    CorruptImageError,
    FormatAccess,
    InvalidRequestError,
    PreallocateMode,
    ZeroMapping,
    create_image,
    open_image,
)
from pyimago_tests_qemu import assert_qemu_reads

if TYPE_CHECKING:
    from .conftest import QemuTools

pytestmark = [pytest.mark.qemu]

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU 7.2 resolves a relative data file name against its working directory
    (qcow2.data-file.open); our images name theirs relative to their folder."""
    monkeypatch.chdir(tmp_path)


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _l2_entries(path: Path, count: int, *, extended: bool = True) -> list[tuple[int, int]]:
    """The first ``count`` (entry, bitmap) pairs of the first L2 table."""
    data = path.read_bytes()
    l1_offset = struct.unpack(">Q", data[40:48])[0]
    l2 = struct.unpack(">Q", data[l1_offset : l1_offset + 8])[0] & 0x00FFFFFFFFFFFE00
    width = 16 if extended else 8
    out = []
    for i in range(count):
        entry = struct.unpack(">Q", data[l2 + width * i : l2 + width * i + 8])[0]
        bitmap = struct.unpack(">Q", data[l2 + 16 * i + 8 : l2 + 16 * i + 16])[0] if extended else 0
        out.append((entry, bitmap))
    return out


def _random_ops(img: FormatAccess, model: bytearray, seed: int, count: int, unit: int) -> None:
    """Writes, write_zeroes and discards at subcluster-ish granularity, mirrored in ``model``."""
    rng = random.Random(seed)
    size = img.size
    for step in range(count):
        op = rng.choice(["write", "write", "write", "zero", "zero", "discard_zero", "discard"])
        start = rng.randrange(0, size // unit) * unit + rng.choice([0, 0, rng.randrange(unit)])
        start = min(start, size - 1)
        length = min(rng.choice([1, 512, unit, 3 * unit, 40 * unit, rng.randrange(1, 4 * unit)]),
                     size - start)
        if op == "write":
            data = _noise(length, seed * 1000 + step)
            img.write(data, start)
            model[start : start + length] = data
        elif op == "zero":
            img.write_zeroes(start, length)
            model[start : start + length] = bytes(length)
        elif op == "discard_zero":
            img.discard_to_zero(start, length)
            model[start : start + length] = bytes(length)
        else:
            img.discard_to_any(start, length)
            # the content is unspecified: take what we read back (QEMU must agree below)
            model[start : start + length] = img.read(start, length)


def _check_and_compare(qemu: QemuTools, path: Path, model: bytes, tmp_path: Path) -> None:
    qemu.check(path)
    assert_qemu_reads(path, model, tmp_path)


# -- create_image options ------------------------------------------------------------------------


@pytest.mark.clause("create.qcow2.extended-l2", "qcow2.extended-l2.subclusters")
@pytest.mark.parametrize("cluster_size", [16 * KiB, 64 * KiB, 2 * MiB])
def test_create_extended_l2_is_what_qemu_reads(
    qemu: QemuTools, tmp_path: Path, cluster_size: int
) -> None:
    path = tmp_path / "x.qcow2"
    create_image(path, 3 * MiB, extended_l2=True, cluster_size=cluster_size)
    info = qemu.info(path)[0]
    assert info["format-specific"]["data"]["extended-l2"] is True
    assert info["cluster-size"] == cluster_size
    qemu.check(path)
    with open_image(path) as img:
        assert img.info().qcow2 is not None and img.info().qcow2.extended_l2


@pytest.mark.clause("create.qcow2.extended-l2")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"extended_l2": True, "cluster_size": 8 * KiB}, "8192"),
        ({"extended_l2": True, "compat": "0.10"}, "0.10"),
        ({"extended_l2": "yes"}, "'yes'"),
        ({"data_file_raw": True}, "data_file"),
        ({"data_file": "d.raw", "compat": "0.10"}, "d.raw"),
        ({"data_file": "d.raw", "data_file_raw": True, "backing_file": "b.qcow2"}, "b.qcow2"),
        ({"data_file": ""}, "''"),
        ({"backing_file": "b.qcow2", "preallocation": "metadata"}, "metadata"),
    ],
)
def test_create_option_rules(tmp_path: Path, options: dict[str, object], message: str) -> None:
    """QEMU's qcow2_co_create rules; the error names the offending value; nothing is made."""
    with pytest.raises(InvalidRequestError, match=message):
        create_image(tmp_path / "x.qcow2", MiB, unsafe=True, **options)
    assert not (tmp_path / "x.qcow2").exists()
    assert not (tmp_path / "d.raw").exists()


@pytest.mark.clause("create.qcow2.data-file", "qcow2.data-file.resize")
@pytest.mark.parametrize("raw", [False, True])
def test_create_data_file_is_what_qemu_reads(qemu: QemuTools, tmp_path: Path, raw: bool) -> None:
    path = tmp_path / "x.qcow2"
    (tmp_path / "d.raw").write_bytes(b"stale" * 1000)
    create_image(path, 3 * MiB, data_file="d.raw", data_file_raw=raw)
    # qemu-img makes the data file as large as the disk, and empty
    assert (tmp_path / "d.raw").read_bytes() == bytes(3 * MiB)
    data = qemu.info(path)[0]["format-specific"]["data"]
    assert data["data-file"] == "d.raw"
    assert data["data-file-raw"] is raw
    qemu.check(path)
    entries = qemu.map(path)
    if raw:
        # preallocation=metadata is implied: everything maps to its own place in the data file
        assert [(e["start"], e["length"], e["data"], e.get("offset")) for e in entries] == [
            (0, 3 * MiB, True, 0)
        ]
    else:
        assert all(not e["data"] for e in entries)


@pytest.mark.clause("create.qcow2.extended-l2")
def test_create_extended_l2_backing_with_preallocation(qemu: QemuTools, tmp_path: Path) -> None:
    """"Backing file and preallocation can only be used at the same time if extended_l2 is on":
    the preallocated subclusters stay unallocated and show the backing file."""
    base = tmp_path / "b.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "1M")
    qemu.io(base, ["write -P 5 0 1M"])
    top = tmp_path / "t.qcow2"
    create_image(top, MiB, extended_l2=True, cluster_size=64 * KiB, backing_file="b.qcow2",
                 backing_fmt="qcow2", preallocation="metadata")
    qemu.check(top)
    assert qemu.convert_raw(top) == b"\5" * MiB
    want = _l2_entries(top, 16)
    with open_image(top, writable=True) as img:
        assert img.read(0, MiB) == b"\5" * MiB
        img.write(b"\7" * 1024, 64 * KiB + 2048)
    entry, bitmap = _l2_entries(top, 2)[1]
    # written in place into the preallocated cluster: only subcluster 1 is allocated
    assert entry == want[1][0] and bitmap == 0b10
    qemu.check(top)
    model = bytearray(b"\5" * MiB)
    model[64 * KiB + 2048 : 64 * KiB + 3072] = b"\7" * 1024
    assert qemu.convert_raw(top) == bytes(model)


# -- extended L2 writes --------------------------------------------------------------------------


QEMU_IO_CASES = [
    # (qemu-io commands on a fresh 256k image with 64k clusters, what we do)
    ["write -P 3 2k 1k"],
    ["write -P 3 0 64k", "write -z 4k 8k"],
    ["write -P 3 1k 100k", "write -z 40k 4k", "write -P 4 60k 1"],
    ["write -P 3 0 256k", "discard 64k 64k", "write -P 9 70k 2k"],
    ["write -z 0 6k", "write -P 1 3k 1k"],
    ["write -P 1 0 64k", "write -z -u 0 64k", "write -P 2 10k 1"],
]


def _apply_qemu_io_cmd(img: FormatAccess, cmd: str) -> None:
    words = cmd.split()
    def num(s: str) -> int:
        return int(s[:-1]) * KiB if s.endswith("k") else int(s)
    if words[0] == "write" and words[1] == "-P":
        length = num(words[4])
        img.write(bytes([int(words[2])]) * length, num(words[3]))
    elif words[0] == "write" and words[1] == "-z":
        if words[2] == "-u":
            img.discard_to_zero(num(words[3]), num(words[4]))
        else:
            img.write_zeroes(num(words[2]), num(words[3]))
    elif words[0] == "discard":
        img.discard_to_zero(num(words[1]), num(words[2]))
    else:
        raise AssertionError(cmd)


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.extended-l2.clear")
@pytest.mark.parametrize("cmds", QEMU_IO_CASES, ids=lambda c: "; ".join(c))
def test_extended_l2_entries_as_qemu_writes_them(
    qemu: QemuTools, tmp_path: Path, cmds: list[str]
) -> None:
    """The same requests leave the same subcluster bitmaps (and contents) as in QEMU."""
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", theirs, "256k")
    qemu.io(theirs, cmds)
    create_image(ours, 256 * KiB, extended_l2=True)
    with open_image(ours, writable=True) as img:
        for cmd in cmds:
            _apply_qemu_io_cmd(img, cmd)
    qemu.check(ours)
    assert qemu.convert_raw(ours) == qemu.convert_raw(theirs)
    want = [(e & ~0x00FFFFFFFFFFFE00, b) for e, b in _l2_entries(theirs, 4)]
    got = [(e & ~0x00FFFFFFFFFFFE00, b) for e, b in _l2_entries(ours, 4)]
    assert got == want


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.extended-l2.clear",
                    "qcow2.extended-l2.mapping")
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backing", [False, True])
def test_extended_l2_random_ops_pass_qemu_check(
    qemu: QemuTools, tmp_path: Path, seed: int, backing: bool
) -> None:
    size, cs = 2 * MiB + 48 * KiB, 32 * KiB
    path = tmp_path / "x.qcow2"
    model = bytearray(size)
    opts: dict[str, object] = {}
    if backing:
        base = tmp_path / "b.qcow2"
        create_image(base, size)
        base_data = _noise(size, seed + 77)
        with open_image(base, writable=True) as b:
            b.write(base_data, 0)
        model[:] = base_data
        opts = {"backing_file": "b.qcow2", "backing_fmt": "qcow2"}
    create_image(path, size, extended_l2=True, cluster_size=cs, **opts)
    with open_image(path, writable=True, l2_cache_tables=1) as img:
        _random_ops(img, model, seed, 60, cs // 32)
        assert img.read(0, size) == model
    _check_and_compare(qemu, path, bytes(model), tmp_path)
    # qemu-img map agrees with our mapping, subcluster by subcluster
    with open_image(path) as img:
        for e in qemu.map(path):
            if e["zero"] and not e["data"] and e["depth"] == 0:
                mapping, _ = img.get_mapping(e["start"], e["length"])
                assert isinstance(mapping, ZeroMapping), e


@pytest.mark.clause("qcow2.extended-l2.write")
def test_qemu_writes_on_top_of_our_extended_l2_writes(qemu: QemuTools, tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    size = MiB
    create_image(path, size, extended_l2=True)
    model = bytearray(size)
    with open_image(path, writable=True) as img:
        _random_ops(img, model, 5, 30, 2 * KiB)
    qemu.io(path, ["write -P 8 3k 5k", "write -z 100k 6k"])
    model[3 * KiB : 8 * KiB] = b"\x08" * 5 * KiB
    model[100 * KiB : 106 * KiB] = bytes(6 * KiB)
    with open_image(path, writable=True) as img:
        assert img.read(0, size) == model
        img.write(b"\x09" * 3000, 5 * KiB)
        model[5 * KiB : 5 * KiB + 3000] = b"\x09" * 3000
    _check_and_compare(qemu, path, bytes(model), tmp_path)


@pytest.mark.clause("qcow2.extended-l2.invalid-write")
def test_invalid_bitmap_on_write_marks_corrupt(qemu: QemuTools, tmp_path: Path) -> None:
    """QEMU: "Marking image as corrupt: Invalid cluster entry found" on the write path."""
    path = tmp_path / "x.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "1M")
    qemu.io(path, ["write -P 1 0 64k"])
    data = bytearray(path.read_bytes())
    l1_offset = struct.unpack(">Q", data[40:48])[0]
    l2 = struct.unpack(">Q", data[l1_offset : l1_offset + 8])[0] & 0x00FFFFFFFFFFFE00
    data[l2 + 8 : l2 + 16] = struct.pack(">Q", 0x0000000100000001)  # sc 0 allocated and zero
    path.write_bytes(bytes(data))
    with open_image(path, writable=True) as img, pytest.raises(CorruptImageError,
                                                                 match="bitmap"):
        img.write(b"x", 0)
    info = json.loads(qemu.img("info", "--output=json", path).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True


# -- external data files -------------------------------------------------------------------------


@pytest.mark.clause("qcow2.data-file.write", "qcow2.data-file.raw",
                    "qcow2.data-file.write")
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("raw", "extended"), [(False, False), (True, False), (False, True),
                                               (True, True)])
def test_data_file_random_ops_pass_qemu_check(
    qemu: QemuTools, tmp_path: Path, seed: int, raw: bool, extended: bool
) -> None:
    size = 2 * MiB + 24 * KiB
    path, data = tmp_path / "x.qcow2", tmp_path / "d.raw"
    create_image(path, size, data_file="d.raw", data_file_raw=raw, extended_l2=extended)
    model = bytearray(size)
    with open_image(path, writable=True, l2_cache_tables=1) as img:
        _random_ops(img, model, seed, 50, 2 * KiB if extended else 64 * KiB)
        assert img.read(0, size) == model
    _check_and_compare(qemu, path, bytes(model), tmp_path)
    info = qemu.info(path)[0]["format-specific"]["data"]
    assert info["data-file-raw"] is raw
    if raw:
        # "the external data file can be read as a consistent standalone raw image"
        assert data.read_bytes() == model
    # nothing but metadata in the qcow2 file: its clusters are all refcounted metadata
    with open_image(path) as img:
        assert img.read(0, size) == model


@pytest.mark.clause("qcow2.data-file.write", "qcow2.data-file.resize")
@pytest.mark.parametrize("raw", [False, True])
def test_data_file_resize(qemu: QemuTools, tmp_path: Path, raw: bool) -> None:
    path, data = tmp_path / "x.qcow2", tmp_path / "d.raw"
    create_image(path, MiB, data_file="d.raw", data_file_raw=raw)
    with open_image(path, writable=True) as img:
        img.write(b"\1" * MiB, 0)
        img.resize(3 * MiB)
        assert data.stat().st_size == 3 * MiB
        img.write(b"\2" * 4096, 2 * MiB)
        img.resize(MiB + 512 * KiB)
        assert data.stat().st_size == MiB + 512 * KiB
        img.resize(2 * MiB, PreallocateMode.NONE)
    model = b"\1" * MiB + bytes(MiB)
    _check_and_compare(qemu, path, model, tmp_path)
    if raw:
        assert data.read_bytes() == model
        assert [(e["start"], e["length"], e["data"]) for e in qemu.map(path)] == [
            (0, 2 * MiB, True)
        ]


@pytest.mark.clause("qcow2.data-file.write")
def test_qemu_made_data_file_images_take_our_writes(
    qemu: QemuTools, tmp_path: Path
) -> None:
    path = tmp_path / "x.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", path, "1M")
    qemu.io(path, ["write -P 1 0 100k"])
    model = bytearray(MiB)
    model[: 100 * KiB] = b"\1" * 100 * KiB
    with open_image(path, writable=True) as img:
        _random_ops(img, model, 9, 30, 64 * KiB)
    _check_and_compare(qemu, path, bytes(model), tmp_path)


@pytest.mark.clause("qcow2.data-file.raw-cleared", "qcow2.data-file.raw")
def test_raw_bit_kept_until_a_backing_shows_through(qemu: QemuTools, tmp_path: Path) -> None:
    path, data = tmp_path / "x.qcow2", tmp_path / "d.raw"
    create_image(path, MiB, data_file="d.raw", data_file_raw=True)
    base = tmp_path / "b.qcow2"
    create_image(base, MiB)
    with open_image(base, writable=True) as b:
        b.write(b"\5" * MiB, 0)
    with open_image(base) as backing:
        with open_image(path, writable=True, backing=backing) as img:
            img.write(b"\1" * 200 * KiB, 0)
            img.write_zeroes(64 * KiB, 64 * KiB)
            img.discard_to_zero(128 * KiB, 64 * KiB)
            # autoclear bit 1 (header bytes 88-95) is kept while the data file stays raw
            assert int.from_bytes(path.read_bytes()[88:96], "big") == 0b10
            assert data.read_bytes()[: 200 * KiB] == b"\1" * 64 * KiB + bytes(128 * KiB) + (
                b"\1" * 8 * KiB)
            img.discard_to_backing(0, 64 * KiB)
            assert img.read(0, 64 * KiB) == b"\5" * 64 * KiB
        assert qemu.info(path)[0]["format-specific"]["data"]["data-file-raw"] is False
    qemu.check(path)


@pytest.mark.clause("qcow2.extended-l2.write", "qcow2.extended-l2.clear")
def test_extended_l2_with_compressed_clusters_and_snapshots(qemu: QemuTools,
                                                            tmp_path: Path) -> None:
    """Subcluster writes over compressed clusters (the whole cluster is rewritten) and over
    clusters a snapshot shares (copied to a new cluster), as qemu-img reads them."""
    path = tmp_path / "x.qcow2"
    create_image(path, MiB, extended_l2=True)
    with open_image(path, writable=True) as img:
        img.write(b"a" * 3000, 70000)
        img.write_compressed(b"z" * 65536, 128 * KiB)
        img.write(b"q" * 10, 128 * KiB + 100)
        img.write_compressed(b"d" * 65536, 192 * KiB)
        img.write_zeroes(196 * KiB, 4 * KiB)
        before = img.read(0, MiB)
        img.create_snapshot("s1")
        img.write(b"after" * 1000, 2000)
        img.write(b"more" * 1000, 70000)
        img.write_zeroes(64 * KiB, 2 * KiB)
        now = img.read(0, MiB)
    qemu.check(path)
    assert qemu.convert_raw(path) == now
    snap = tmp_path / "s1.raw"
    qemu.img("convert", "-l", "s1", "-O", "raw", path, snap)
    assert snap.read_bytes() == before

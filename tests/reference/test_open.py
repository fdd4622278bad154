"""open_image / create_image: probing, gates, backing chains, option validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pyimago.reference import (
    CorruptImageError,
    DenyImplicitOpenGate,
    FolderImplicitOpenGate,
    GateDeniedError,
    ImageNotFoundError,
    InvalidRequestError,
    MemoryStorage,
    PermissiveImplicitOpenGate,
    PyimagoError,
    Qcow2Driver,
    RawDriver,
    ReadOnlyError,
    UnsupportedError,
    UnsupportedFeatureError,
    create_image,
    open_image,
    probe_format,
)
from pyimago_tests_reference_helpers import KiB, MiB, header_of, qemu_check, qemu_img


def _qcow2(path: Path, size: int = 64 * KiB, **opts: object) -> Path:
    create_image(path, size, cluster_size=512, **opts)
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- probing -------------------------------------------------------------------------------------


@pytest.mark.clause("backing.probe")
def test_probe(tmp_path: Path) -> None:
    q = _qcow2(tmp_path / "a.qcow2")
    r = _raw(tmp_path / "a.raw", b"hello" + bytes(507))
    e = _raw(tmp_path / "empty", b"")
    with open_image(q) as img:
        assert isinstance(img.driver, Qcow2Driver)
    with open_image(r) as img:
        assert isinstance(img.driver, RawDriver) and img.read(0, 5) == b"hello"
    with open_image(e) as img:
        assert isinstance(img.driver, RawDriver) and img.size == 0
    assert probe_format(MemoryStorage(b"QFI\xfb")) == "qcow2"
    assert probe_format(MemoryStorage(b"QFI")) == "raw"


@pytest.mark.clause("backing.probe", "raw.passthrough")
def test_explicit_format_wins(tmp_path: Path) -> None:
    q = _qcow2(tmp_path / "a.qcow2")
    with open_image(q, format="raw") as img:
        assert img.read(0, 4) == b"QFI\xfb"
        assert img.size == q.stat().st_size
    with pytest.raises(CorruptImageError):
        open_image(_raw(tmp_path / "r", bytes(4096)), format="qcow2")


@pytest.mark.clause("errors.bad-input-clear")
@pytest.mark.parametrize("fmt", ["vmdk", "QCOW2", ""])
def test_unknown_format(tmp_path: Path, fmt: str) -> None:
    q = _qcow2(tmp_path / "a.qcow2")
    with pytest.raises(UnsupportedFeatureError, match=repr(fmt)):
        open_image(q, format=fmt)


@pytest.mark.clause("errors.bad-input-clear")
def test_not_a_target() -> None:
    with pytest.raises(InvalidRequestError):
        open_image(42)  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "nope.qcow2")


@pytest.mark.clause("access.write.read-only")
def test_read_only_storage_cannot_open_writable() -> None:
    storage = MemoryStorage()
    create_image(storage, 64 * KiB)
    with pytest.raises(ReadOnlyError):
        open_image(MemoryStorage(storage.snapshot(), writable=False), writable=True, backing=None)


# -- backing chains ------------------------------------------------------------------------------


@pytest.mark.clause("backing.resolve-relative")
def test_relative_backing_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "top" / "sub").mkdir(parents=True)
    base = _raw(tmp_path / "base" / "b.raw", b"B" * 64 * KiB)
    top = tmp_path / "top" / "sub" / "t.qcow2"
    _qcow2(top, backing_file="../../base/b.raw", backing_fmt="raw")
    assert not os.path.isabs("../../base/b.raw")
    monkeypatch.chdir(tmp_path / "top")  # not the overlay's folder
    with open_image(os.path.relpath(top)) as img:
        assert img.read(0, 4) == b"BBBB"
    assert base.exists()


@pytest.mark.clause("backing.resolve-relative")
def test_absolute_backing_name(tmp_path: Path) -> None:
    base = _raw(tmp_path / "b.raw", b"A" * 64 * KiB)
    top = _qcow2(tmp_path / "elsewhere.qcow2", backing_file=str(base), backing_fmt="raw")
    with open_image(top) as img:
        assert img.read(100, 1) == b"A"


@pytest.mark.clause("backing.format-extension", "backing.probe")
def test_backing_format_extension_honoured(tmp_path: Path) -> None:
    """A raw backing file that starts with the qcow2 magic is read as raw with backing_fmt=raw
    (and would be probed, wrongly, as qcow2 without it)."""
    content = b"QFI\xfb" + b"\x00\x00\x00\x03" + b"R" * (64 * KiB - 8)
    base = _raw(tmp_path / "tricky.raw", content)
    top = _qcow2(tmp_path / "top.qcow2", backing_file="tricky.raw", backing_fmt="raw")
    with open_image(top) as img:
        assert img.read(0, 64 * KiB) == content
    # qemu-img create would refuse this backing file too (it probes as a broken qcow2).
    probed = _qcow2(tmp_path / "probed.qcow2", backing_file="tricky.raw", unsafe=True)
    with pytest.raises(PyimagoError):
        open_image(probed)
    assert base.exists()


@pytest.mark.qemu
@pytest.mark.clause("backing.format-extension", "interop.qemu-read")
def test_backing_format_extension_from_qemu(tmp_path: Path) -> None:
    content = b"QFI\xfb" + b"Q" * (64 * KiB - 4)
    _raw(tmp_path / "b.img", content)
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.img", "-F", "raw", top, "64K")
    with open_image(top) as img:
        assert img.read(0, 64 * KiB) == content


@pytest.mark.clause("backing.loop")
def test_image_backing_itself(tmp_path: Path) -> None:
    path = _qcow2(tmp_path / "self.qcow2", backing_file="self.qcow2", backing_fmt="qcow2",
                  unsafe=True)
    with pytest.raises(CorruptImageError, match="loop"):
        open_image(path)


@pytest.mark.clause("backing.loop")
def test_two_image_loop(tmp_path: Path) -> None:
    a = _qcow2(tmp_path / "a.qcow2", backing_file="b.qcow2", unsafe=True)
    _qcow2(tmp_path / "b.qcow2", backing_file="a.qcow2")
    with pytest.raises(CorruptImageError, match="loop"):
        open_image(a)


@pytest.mark.clause("backing.loop")
def test_loop_through_symlink(tmp_path: Path) -> None:
    a = _qcow2(tmp_path / "a.qcow2", backing_file="link.qcow2", unsafe=True)
    (tmp_path / "link.qcow2").symlink_to(a)
    with pytest.raises(CorruptImageError, match="loop"):
        open_image(a)


@pytest.mark.clause("backing.loop")
def test_chain_depth_limit(tmp_path: Path) -> None:
    _raw(tmp_path / "img0", bytes(512))
    for i in range(1, 70):
        _qcow2(tmp_path / f"img{i}", 512, backing_file=f"img{i - 1}")
    with open_image(tmp_path / "img60") as img:
        assert img.read(0, 512) == bytes(512)
    with pytest.raises(CorruptImageError, match="deeper"):
        open_image(tmp_path / "img69")


@pytest.mark.clause("backing.probe")
def test_missing_backing_names_the_path(tmp_path: Path) -> None:
    top = _qcow2(tmp_path / "t.qcow2", backing_file="gone.qcow2", unsafe=True)
    with pytest.raises(ImageNotFoundError) as info:
        open_image(top)
    assert info.value.filename == str(tmp_path / "gone.qcow2")
    assert "gone.qcow2" in str(info.value)


@pytest.mark.clause("backing.gate")
def test_deny_gate(tmp_path: Path) -> None:
    _raw(tmp_path / "b.raw", bytes(64 * KiB))
    top = _qcow2(tmp_path / "t.qcow2", backing_file="b.raw", backing_fmt="raw")
    with pytest.raises(GateDeniedError, match=r"b\.raw"):
        open_image(top, gate=DenyImplicitOpenGate())
    # The gate is not asked about the image the caller named, nor about explicit backings.
    alone = _qcow2(tmp_path / "alone.qcow2")
    with open_image(alone, gate=DenyImplicitOpenGate()):
        pass
    with open_image(tmp_path / "b.raw") as base, open_image(
        top, gate=DenyImplicitOpenGate(), backing=base
    ) as img:
        assert img.read(0, 1) == b"\0"


@pytest.mark.clause("backing.gate")
def test_folder_gate(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    _raw(inside / "b.raw", b"I" * 64 * KiB)
    _raw(outside / "b.raw", b"O" * 64 * KiB)
    ok = _qcow2(inside / "ok.qcow2", backing_file="b.raw", backing_fmt="raw")
    bad = _qcow2(inside / "bad.qcow2", backing_file="../out/b.raw", backing_fmt="raw")
    (inside / "sneaky.raw").symlink_to(outside / "b.raw")
    sneaky = _qcow2(inside / "sneaky.qcow2", backing_file="sneaky.raw", backing_fmt="raw")
    gate = FolderImplicitOpenGate(inside)
    with open_image(ok, gate=gate) as img:
        assert img.read(0, 1) == b"I"
    with pytest.raises(GateDeniedError):
        open_image(bad, gate=gate)
    with pytest.raises(GateDeniedError):
        open_image(sneaky, gate=gate)
    with open_image(bad, gate=FolderImplicitOpenGate(inside, outside)) as img:
        assert img.read(0, 1) == b"O"
    with open_image(bad, gate=PermissiveImplicitOpenGate()) as img:
        assert img.read(0, 1) == b"O"


@pytest.mark.clause("backing.gate")
def test_gate_applies_down_the_chain(tmp_path: Path) -> None:
    inside = tmp_path / "in"
    inside.mkdir()
    _raw(tmp_path / "base.raw", bytes(64 * KiB))
    _qcow2(inside / "mid.qcow2", backing_file="../base.raw", backing_fmt="raw")
    top = _qcow2(inside / "top.qcow2", backing_file="mid.qcow2", backing_fmt="qcow2")
    with pytest.raises(GateDeniedError, match=r"base\.raw"):
        open_image(top, gate=FolderImplicitOpenGate(inside))


@pytest.mark.clause("backing.probe")
def test_backing_opened_read_only(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "b.qcow2")
    top = _qcow2(tmp_path / "t.qcow2", backing_file="b.qcow2", backing_fmt="qcow2")
    before = base.read_bytes()
    with open_image(top, writable=True) as img:
        backing = getattr(img.driver, "backing", None)
        assert backing is not None and not backing.writable
        img.write(b"x" * 1000, 0)
    assert base.read_bytes() == before


# -- create_image options ------------------------------------------------------------------------


@pytest.mark.clause("create.options", "errors.bad-input-clear")
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"cluster_size": 1000}, "cluster_size"),
        ({"cluster_size": 256}, "cluster_size"),
        ({"cluster_size": 4 * MiB}, "cluster_size"),
        ({"cluster_size": "64k"}, "cluster_size"),
        ({"cluster_size": True}, "cluster_size"),
        ({"compat": "2.0"}, "compat"),
        ({"compat": 3}, "compat"),
        ({"refcount_bits": 3}, "refcount_bits"),
        ({"refcount_bits": 128}, "refcount_bits"),
        ({"refcount_bits": 0}, "refcount_bits"),
        ({"compat": "0.10", "refcount_bits": 8}, "refcount_bits"),
        ({"compat": "0.10", "compression_type": "zstd"}, "compression_type"),
        ({"compression_type": "lz4"}, "compression_type"),
        ({"preallocation": "sparse"}, "preallocation"),
        ({"backing_fmt": "raw"}, "backing_fmt"),
        ({"backing_file": ""}, "backing_file"),
        ({"backing_file": 7}, "backing_file"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"backing_file": "b", "preallocation": "metadata"}, "preallocation"),
    ],
)
def test_bad_create_options(options: dict[str, object], needle: str) -> None:
    storage = MemoryStorage()
    with pytest.raises(InvalidRequestError) as info:
        create_image(storage, 64 * KiB, **options)
    assert needle in str(info.value)
    assert storage.size() == 0


@pytest.mark.clause("create.options")
@pytest.mark.parametrize("option", ["encryption", "encrypt"])
def test_unsupported_create_options(option: str) -> None:
    with pytest.raises(UnsupportedError, match=option):
        create_image(MemoryStorage(), 64 * KiB, **{option: "on"})


@pytest.mark.clause("create.options", "qcow2.header.size-512")
@pytest.mark.parametrize("size", [-512, 1000, 511, None, 1.5, True])
def test_bad_create_size(size: object) -> None:
    with pytest.raises(InvalidRequestError):
        create_image(MemoryStorage(), size, format="qcow2")  # type: ignore[arg-type]


@pytest.mark.clause("create.options")
def test_bad_create_format_and_raw_options() -> None:
    with pytest.raises(UnsupportedFeatureError, match="vmdk"):
        create_image(MemoryStorage(), 512, format="vmdk")
    with pytest.raises(UnsupportedFeatureError, match="vmdk"):
        create_image(MemoryStorage(), 512, backing_file="b", backing_fmt="vmdk")
    with pytest.raises(InvalidRequestError, match="cluster_size"):
        create_image(MemoryStorage(), 512, format="raw", cluster_size=512)
    create_image(MemoryStorage(), 1000, format="raw")  # raw sizes need no alignment


@pytest.mark.clause("create.options", "create.layout")
def test_create_size_from_backing(tmp_path: Path) -> None:
    _raw(tmp_path / "b.raw", bytes(1000))
    top = tmp_path / "t.qcow2"
    create_image(top, None, backing_file="b.raw", backing_fmt="raw")
    assert header_of(top.read_bytes()).size == 1024  # rounded up to whole sectors


@pytest.mark.qemu
@pytest.mark.clause("create.options", "create.layout", "interop.qemu-check")
@pytest.mark.parametrize(
    "options",
    [
        {"compat": "0.10"},
        {"cluster_size": 512, "refcount_bits": 1},
        {"cluster_size": 2 * MiB, "refcount_bits": 64, "preallocation": "metadata"},
        {"compression_type": "zstd", "preallocation": "full"},
        {"backing_file": "b.raw", "backing_fmt": "raw"},
        {"preallocation": "falloc", "cluster_size": 4096},
    ],
)
def test_created_images_pass_qemu_check(tmp_path: Path, options: dict[str, object]) -> None:
    _raw(tmp_path / "b.raw", bytes(4 * MiB))
    path = tmp_path / "c.qcow2"
    create_image(path, 4 * MiB, **options)
    qemu_check(path)
    info = qemu_img("info", "--output=json", path).stdout
    assert '"virtual-size": 4194304' in info


# -- in-memory chains ----------------------------------------------------------------------------


@pytest.mark.clause("storage.memory.survives-reopen")
def test_memory_chain_survives_close_and_reopen() -> None:
    base_storage, top_storage = MemoryStorage(name="base"), MemoryStorage(name="top")
    create_image(base_storage, 64 * KiB, cluster_size=512)
    with open_image(base_storage, writable=True, backing=None) as base:
        base.write(b"B" * 4096, 0)
    create_image(top_storage, 64 * KiB, cluster_size=512, backing_file="base",
                 backing_fmt="qcow2")
    with pytest.raises(InvalidRequestError, match="backing="):
        open_image(top_storage)
    with open_image(base_storage) as base, open_image(
        top_storage, writable=True, backing=base
    ) as top:
        top.write(b"T" * 100, 1000)
    # Both storages keep their bytes after close; open them again.
    with open_image(base_storage) as base, open_image(top_storage, backing=base) as top:
        expected = b"B" * 1000 + b"T" * 100 + b"B" * 2996 + bytes(60 * KiB)
        assert top.read(0, 64 * KiB) == expected
    # backing=None hides the backing file (clusters the overlay never wrote read as zero;
    # the partial-cluster write copied its clusters' rest from the backing).
    with open_image(top_storage, backing=None) as top:
        assert top.read(0, 1536) == bytes(512) + b"B" * 488 + b"T" * 100 + b"B" * 436

"""qcow2 feature bits: which images may be opened, and how (read-only / writable)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago.reference import (
    CorruptImageError,
    InvalidRequestError,
    MemoryStorage,
    UnsupportedFeatureError,
    create_image,
    open_image,
)
from pyimago.reference.qcow2.constants import QCOW2_EXT_MAGIC_FEATURE_TABLE
from pyimago.reference.qcow2.extensions import (
    FEATURE_TYPE_INCOMPATIBLE,
    HeaderExtension,
    feature_names,
    pack_feature_table,
)
from pyimago_tests_reference_helpers import (
    KiB,
    extensions_of,
    header_of,
    make_image,
    patch_header,
    qemu_check,
    qemu_img,
    set_extensions,
)


def _image(**header: int) -> bytearray:
    data = make_image(cluster_size=4 * KiB, writes=[(0, b"data")])
    patch_header(data, **header)
    return data


def _open(data: bytes | bytearray, writable: bool) -> None:
    with open_image(MemoryStorage(data), writable=writable, backing=None) as img:
        assert img.read(0, 4) == b"data"


@pytest.mark.clause("qcow2.features.incompatible-unknown")
@pytest.mark.parametrize("bit", [5, 17, 63])
@pytest.mark.parametrize("writable", [False, True])
def test_unknown_incompatible_bit(bit: int, writable: bool) -> None:
    data = _image(incompatible_features=1 << bit)
    with pytest.raises(UnsupportedFeatureError) as info:
        _open(data, writable)
    assert f"bit {bit}" in str(info.value) and f"bit {bit}" in info.value.feature


@pytest.mark.clause("qcow2.features.incompatible-unknown", "qcow2.extensions.feature-names")
def test_unknown_incompatible_bit_named_from_feature_table() -> None:
    data = _image(incompatible_features=(1 << 5) | (1 << 40))
    exts = extensions_of(data)
    table = next(e for e in exts if e.type == QCOW2_EXT_MAGIC_FEATURE_TABLE)
    named = HeaderExtension(
        QCOW2_EXT_MAGIC_FEATURE_TABLE,
        table.data + pack_feature_table([(FEATURE_TYPE_INCOMPATIBLE, 5, "frobnication")]),
    )
    set_extensions(data, [named if e is table else e for e in exts])
    assert feature_names(extensions_of(data))[(FEATURE_TYPE_INCOMPATIBLE, 5)] == "frobnication"
    with pytest.raises(UnsupportedFeatureError) as info:
        _open(data, False)
    message = str(info.value)
    assert "bit 5 (frobnication)" in message and "bit 40" in message


@pytest.mark.clause("qcow2.features.encryption")
@pytest.mark.parametrize("method", [1, 2, 0xFFFFFFFF])
def test_encryption_refused(method: int) -> None:
    with pytest.raises(UnsupportedFeatureError) as info:
        _open(_image(crypt_method=method), False)
    assert info.value.feature == "encryption" and str(method) in str(info.value)


@pytest.mark.clause("qcow2.features.external-data")
def test_external_data_file_writable_open_needs_the_data_file() -> None:
    """Writable opens are allowed; an image in a storage object that names no data file needs
    data_file= (qcow2.data-file.open)."""
    data = _image(incompatible_features=1 << 2)
    with pytest.raises(InvalidRequestError, match="data_file="):
        _open(data, True)


@pytest.mark.clause("qcow2.features.extended-l2")
def test_extended_l2_opens_writable() -> None:
    storage = MemoryStorage()
    create_image(storage, 256 * KiB, extended_l2=True)
    with open_image(storage, writable=True) as img:
        img.write(b"sub", 70 * KiB)
    with open_image(storage) as img:
        assert img.read(70 * KiB, 3) == b"sub"
        assert img.info().qcow2 is not None and img.info().qcow2.extended_l2


@pytest.mark.qemu
@pytest.mark.clause("qcow2.features.external-data", "qcow2.features.extended-l2",
                    "qcow2.features.encryption")
@pytest.mark.parametrize(
    ("opts", "feature", "writable"),
    [
        ("encrypt.format=aes,encrypt.key-secret=sec0", "encryption", False),
    ],
)
def test_qemu_images_with_unsupported_features(
    tmp_path: Path, opts: str, feature: str, writable: bool
) -> None:
    path = tmp_path / "f.qcow2"
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if "encrypt" in opts:
        args += ["--object", "secret,id=sec0,data=123456"]
    qemu_img(*args, "-o", opts.format(dir=tmp_path), path, "1M")
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(path, writable=writable)
    assert info.value.feature == feature
    if writable:
        with open_image(path) as img:  # read-only opens work
            assert img.read(0, 4096) == bytes(4096)


@pytest.mark.clause("qcow2.features.dirty", "qcow2.dirty.repair-on-open")
def test_dirty_repaired_only_when_writable() -> None:
    data = _image(incompatible_features=1 << 0)
    storage = MemoryStorage(data)
    with open_image(storage, backing=None) as img:
        assert img.read(0, 4) == b"data"
    assert storage.snapshot() == data  # read-only: nothing written
    with open_image(storage, writable=True, backing=None) as img:
        assert header_of(storage.snapshot()).incompatible_features == 0
        assert img.read(0, 4) == b"data"


@pytest.mark.clause("qcow2.features.corrupt")
def test_corrupt_refused_only_when_writable() -> None:
    data = _image(incompatible_features=1 << 1)
    _open(data, False)
    with pytest.raises(UnsupportedFeatureError) as info:
        _open(data, True)
    assert info.value.feature == "corrupt bit"


@pytest.mark.clause("qcow2.features.autoclear-clear")
@pytest.mark.parametrize("bits", [1, 0b11, 1 << 40 | 1 << 63])
def test_autoclear_cleared_on_writable_open(bits: int) -> None:
    data = _image(autoclear_features=bits)
    storage = MemoryStorage(data)
    with open_image(storage, backing=None):
        pass
    assert header_of(storage.snapshot()).autoclear_features == bits
    with open_image(storage, writable=True, backing=None) as img:
        # Cleared before the first write.
        assert header_of(storage.snapshot()).autoclear_features == 0
        img.write(b"x", 0)
    after = storage.snapshot()
    assert header_of(after).autoclear_features == 0
    # Nothing else in the header cluster changed.
    expected = bytearray(data)
    expected[88:96] = bytes(8)
    assert after[: 4 * KiB] == expected[: 4 * KiB]


def test_compatible_bits_ignored() -> None:
    _open(_image(compatible_features=(1 << 64) - 1), True)


@pytest.mark.clause("qcow2.features.compression-type")
def test_compression_bit_without_type() -> None:
    with pytest.raises(CorruptImageError, match="compression"):
        _open(_image(incompatible_features=1 << 3), False)


@pytest.mark.clause("qcow2.features.compression-type")
def test_compression_type_without_bit() -> None:
    data = make_image(cluster_size=4 * KiB, compression_type="zstd", writes=[(0, b"data")])
    _open(data, True)
    patch_header(data, incompatible_features=0)
    with pytest.raises(CorruptImageError, match="compression"):
        _open(data, False)


@pytest.mark.qemu
@pytest.mark.clause("qcow2.features.compression-type", "qcow2.compressed.zstd")
def test_qemu_zstd_image_opens(tmp_path: Path) -> None:
    path = tmp_path / "z.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", path, "1M")
    with open_image(path, writable=True) as img:
        img.write(b"z" * 512, 0)
    qemu_check(path)

"""qcow2 feature bits (specs/qcow2-features.toml) and header extensions
(specs/qcow2-extensions.toml), on crafted images."""

from __future__ import annotations

import functools

import pytest
from pyimago.oracle.conformance._qcow2 import EXT_BACKING_FORMAT, Qcow2Bytes
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    expect_error,
    file_bytes,
    pattern,
)
from pyimago.reference import (
    CorruptImageError,
    MemoryStorage,
    PyimagoError,
    UnsupportedFeatureError,
)

pytestmark = pytest.mark.needs("qcow2")


def _open_and_close(img: ImageKit, store: MemoryStorage) -> None:
    img.open(store).close()


@pytest.mark.clause("qcow2.features.incompatible-unknown", "errors.feature-named")
def test_unknown_incompatible_bits_are_refused(img: ImageKit) -> None:
    for bit in (5, 17, 63):
        image = img.crafted()
        image.set(incompatible_features=1 << bit)
        error = img.refuses(image, UnsupportedFeatureError, f"incompatible bit {bit}")
        assert str(bit) in str(error), f"the error does not name bit {bit}: {error}"


@pytest.mark.clause("qcow2.features.dirty")
def test_dirty_images_are_never_written_with_stale_refcounts(img: ImageKit) -> None:
    image = img.crafted(64 * KiB, writes=[(0, pattern(1, 4 * KiB))])
    image.set(incompatible_features=1)
    # Stale refcounts, as a crash with lazy refcounts leaves them: data cluster 0 has none.
    host = image.host_offset(0)
    image.set_refcount(host // 512, 0)
    with img.open_bytes(image) as disk:
        assert disk.read(0, 4 * KiB) == pattern(1, 4 * KiB), "a dirty image does not open"
    store = MemoryStorage(bytes(image.data))
    try:
        disk = img.open(store)
    except UnsupportedFeatureError as exc:
        assert "dirty" in str(exc).lower(), f"the refusal does not name 'dirty': {exc}"
        assert store.snapshot() == bytes(image.data), "a refused open modified the image"
        return
    with disk:
        disk.write(pattern(2, 2 * KiB), 8 * KiB)
    after = img.bytes_of(store)
    assert not after.errors(), (
        f"a dirty image was written with unrepaired refcounts: {after.errors()}"
    )
    assert after.refcount(host // 512) == 1, "the data cluster's refcount was not rebuilt"


@pytest.mark.clause("qcow2.features.corrupt")
def test_corrupt_images_are_not_written(img: ImageKit) -> None:
    image = img.crafted(64 * KiB, writes=[(0, pattern(3, 1000))])
    image.set(incompatible_features=1 << 1)
    with img.open_bytes(image) as disk:
        assert disk.read(0, 1000) == pattern(3, 1000), "read-only open of a corrupt image failed"
    store = MemoryStorage(bytes(image.data))
    error = expect_error(UnsupportedFeatureError, "writable open of a corrupt image",
                         functools.partial(_open_and_close, img, store))
    assert "corrupt" in str(error).lower(), f"the refusal does not name 'corrupt': {error}"
    assert store.snapshot() == bytes(image.data), "a refused open modified the image"


@pytest.mark.clause("qcow2.features.compression-type")
def test_compression_type_field_must_match_the_bit(img: ImageKit) -> None:
    base = img.crafted(64 * KiB, compression_type="zstd")
    assert base.header_length >= 112
    wrong_type = Qcow2Bytes(base.data)
    wrong_type.set(compression_type=2)
    img.refuses(wrong_type, UnsupportedFeatureError, "compression type 2")
    bit_without_field = Qcow2Bytes(base.data)
    bit_without_field.set(compression_type=0)
    img.refuses(bit_without_field, CorruptImageError, "incompatible bit 3 with compression type 0")
    field_without_bit = Qcow2Bytes(base.data)
    field_without_bit.set(incompatible_features=0)
    img.refuses(field_without_bit, CorruptImageError, "compression type 1 without bit 3")


@pytest.mark.clause("qcow2.features.compatible-ignored")
def test_compatible_bits_are_ignored_and_kept(img: ImageKit) -> None:
    image = img.crafted(64 * KiB)
    image.set(compatible_features=1 | 1 << 40)  # lazy refcounts and an unknown bit
    store = MemoryStorage(bytes(image.data))
    with img.open(store) as disk:
        disk.write(pattern(4, 20 * KiB), 3000)
    after = img.bytes_of(store)
    assert after.get("compatible_features") == 1 | 1 << 40, "compatible bits were changed"
    assert not after.problems(), f"refcounts not kept up to date: {after.problems()}"


@pytest.mark.clause("qcow2.features.autoclear-clear")
def test_autoclear_bits_are_cleared_before_writing(img: ImageKit) -> None:
    image = img.crafted(64 * KiB)
    image.set(autoclear_features=1 | 1 << 33)
    store = MemoryStorage(bytes(image.data))
    with img.open(store, writable=False) as disk:
        disk.read(0, 512)
    assert store.snapshot() == bytes(image.data), "a read-only open changed the header"
    with img.open(store) as disk:
        disk.write(b"w", 0)
    assert img.bytes_of(store).get("autoclear_features") == 0, "autoclear bits not cleared"


@pytest.mark.clause("qcow2.features.raw-external-data")
def test_raw_external_data_bit_alone_is_cleared(img: ImageKit) -> None:
    image = img.crafted(64 * KiB)
    image.set(autoclear_features=1 << 1)
    store = MemoryStorage(bytes(image.data))
    with img.open(store) as disk:
        disk.write(b"w", 0)
        assert disk.read(0, 1) == b"w"
    assert img.bytes_of(store).get("autoclear_features") == 0, "autoclear bit 1 not cleared"


# -- header extensions ---------------------------------------------------------------------------


@pytest.mark.clause("qcow2.extensions.layout")
def test_extension_layout(img: ImageKit) -> None:
    for compat, start in (("0.10", 72), ("1.1", None)):
        image = img.crafted(64 * KiB, cluster_size=512, compat=compat)
        first = start if start is not None else image.header_length
        image.set_extensions([(0x12345678, b"abc")], start=first)
        with img.open_bytes(image) as disk:
            disk.read(0, 512)
        # An extension whose length runs past the first cluster.
        bad = Qcow2Bytes(image.data)
        bad.put_u32(first + 4, 600)
        img.refuses(bad, CorruptImageError, f"v{bad.version}: an extension past the cluster")


@pytest.mark.clause("qcow2.extensions.at-most-once")
def test_contradicting_duplicate_extensions_are_refused(img: ImageKit) -> None:
    image = img.crafted(64 * KiB, cluster_size=4096)
    image.set_extensions([(EXT_BACKING_FORMAT, b"raw"), (EXT_BACKING_FORMAT, b"qcow2")])
    end = image.header_length + 48
    image.data[end : end + 8] = b"base.img"
    image.set(backing_file_offset=end, backing_file_size=8)
    img.refuses(image, CorruptImageError, "backing formats raw and qcow2 both given",
                backing=None)


@pytest.mark.clause("qcow2.extensions.preserved")
def test_unknown_extensions_are_preserved(img: ImageKit) -> None:
    image = img.crafted(64 * KiB, cluster_size=4096)
    exts = [(e.type, e.data) for e in image.extensions()]
    unknown = [(0x0BADF00D, b"opaque data 1"), (0x7AB1E5, bytes(range(40)))]
    image.set_extensions([*exts, *unknown])
    store = MemoryStorage(bytes(image.data))
    with img.open(store) as disk:
        disk.write(pattern(5, 1000), 0)
        disk.resize(128 * KiB)  # the header is rewritten
    after = img.bytes_of(store)
    assert after.get("size") == 128 * KiB
    kept = [(e.type, e.data) for e in after.extensions()]
    for ext in unknown:
        assert ext in kept, f"extension {ext[0]:#x} was not written back byte for byte: {kept}"


@pytest.mark.needs("backing")
@pytest.mark.clause("qcow2.extensions.backing-format", "qcow2.extensions.backing-name-placement")
def test_backing_format_and_name_placement(img: ImageKit) -> None:
    (img.tmp / "b.raw").write_bytes(pattern(6, 64 * KiB))
    path = img.file("t.qcow2", 64 * KiB, "qcow2", cluster_size=4096, backing_file="b.raw",
                    backing_fmt="raw")
    image = file_bytes(path)
    ext = image.extension(EXT_BACKING_FORMAT)
    assert ext is not None, "no backing format extension"
    length = image.u32(ext.pos + 4)
    assert length == 3 and ext.data == b"raw", f"backing format stored as {length} bytes"
    ext_end = max(e.pos + 8 + (len(e.data) + 7) // 8 * 8 for e in image.extensions()) + 8
    offset = image.get("backing_file_offset")
    assert ext_end <= offset < image.cluster_size, (
        f"backing name at {offset} is not after the extension area (ends {ext_end}) in cluster 0"
    )
    # A format name read as exactly its length: padding after it is not part of it.
    image.data[ext.pos + 8 + 3 : ext.pos + 16] = b"\xff" * 5
    with img.open_bytes(image, writable=False, backing=None) as disk:
        disk.read(0, 16)
    crafted = img.write_file("t2.qcow2", image)
    with img.open(crafted, writable=False) as disk:
        assert disk.read(0, 64) == pattern(6, 64), "a padded format name was misread"


@pytest.mark.clause("qcow2.features.external-data", "qcow2.features.extended-l2",
                    "qcow2.features.encryption")
def test_refused_features_refuse_writable_opens_too(img: ImageKit) -> None:
    for fields in ({"incompatible_features": 1 << 2}, {"incompatible_features": 1 << 4},
                   {"crypt_method": 1}):
        image = img.crafted(64 * KiB, writes=[(0, pattern(7, 512))])
        image.set(**fields)
        store = MemoryStorage(bytes(image.data))
        expect_error(PyimagoError, f"writable open with {fields}",
                     functools.partial(_open_and_close, img, store))
        assert store.snapshot() == bytes(image.data), f"{fields}: refused open changed the image"

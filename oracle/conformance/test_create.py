"""create_image and its options (specs/create.toml)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import pytest
from pyimago.oracle.conformance._qcow2 import EXT_BACKING_FORMAT
from pyimago.oracle.conformance._support import (
    ImageKit,
    KiB,
    MiB,
    expect_error,
    file_bytes,
    pattern,
    qemu_check,
)
from pyimago.oracle.crash import RecordingStorage
from pyimago.reference import InvalidRequestError, MemoryStorage, PyimagoError

pytestmark = pytest.mark.needs("qcow2")


def _refused(img: ImageKit, exc: type[Exception] = InvalidRequestError, **opts: Any) -> str:
    store = MemoryStorage()
    opts.setdefault("format", "qcow2")
    size = opts.pop("size", 64 * KiB)
    shown = ", ".join(f"{k}={v!r}" for k, v in opts.items())
    error = expect_error(exc, f"create_image(size={size!r}, {shown})",
                         functools.partial(img.impl.create_image, store, size, **opts))
    assert store.size() == 0, f"the refused create_image({shown}) wrote {store.size()} bytes"
    return str(error)


@pytest.mark.clause("create.options", "errors.bad-input-clear")
def test_unknown_options_and_values_are_refused(img: ImageKit) -> None:
    message = _refused(img, frobnicate=1)
    assert "frobnicate" in message, f"the error does not name the option: {message}"
    message = _refused(img, preallocation="sometimes")
    assert "sometimes" in message, f"the error does not name the value: {message}"
    _refused(img, format="raw", cluster_size=4096)
    path = img.tmp / "never.qcow2"
    expect_error(InvalidRequestError, "create with frobnicate=1",
                 lambda: img.impl.create_image(str(path), 64 * KiB, format="qcow2",
                                               frobnicate=1))
    assert not path.exists(), "a refused create_image created the file"
    for opts in ({"size": -512}, {"size": "1M"}, {"size": 1.5}):
        _refused(img, **opts)


@pytest.mark.clause("create.cluster-size", "qcow2.header.cluster-bits")
def test_cluster_size_powers_of_two_from_512_to_2m(img: ImageKit) -> None:
    for cs in (512, 1024, 65536, 2 * MiB):
        image = img.bytes_of(img.mem(4 * MiB, "qcow2", cluster_size=cs))
        assert image.cluster_size == cs, f"cluster_size={cs} gave {image.cluster_size}"
    assert img.bytes_of(img.mem(1 * MiB, "qcow2")).cluster_size == 65536, "default is not 64 KiB"
    for cs in (256, 1000, 4 * MiB, 0, 3 * 4096):
        _refused(img, cluster_size=cs)


@pytest.mark.clause("create.compat", "qcow2.header.version")
def test_compat_selects_the_version(img: ImageKit) -> None:
    assert img.bytes_of(img.mem(64 * KiB, "qcow2")).version == 3, "the default is not v3"
    assert img.bytes_of(img.mem(64 * KiB, "qcow2", compat="1.1")).version == 3
    assert img.bytes_of(img.mem(64 * KiB, "qcow2", compat="0.10")).version == 2
    _refused(img, compat="2.0")
    _refused(img, compat="0.10", refcount_bits=8)
    _refused(img, compat="0.10", compression_type="zstd")


@pytest.mark.clause("create.refcount-bits", "qcow2.refcount.entry-width")
def test_refcount_bits_powers_of_two_up_to_64(img: ImageKit) -> None:
    for bits in (1, 2, 4, 8, 16, 32, 64):
        store = img.mem(256 * KiB, "qcow2", cluster_size=512, refcount_bits=bits)
        image = img.bytes_of(store)
        assert image.refcount_bits == bits, f"refcount_bits={bits} gave {image.refcount_bits}"
        with img.open(store) as disk:
            disk.write(pattern(bits, 100 * KiB), 3 * KiB)
            assert disk.read(3 * KiB, 100 * KiB) == pattern(bits, 100 * KiB)
        image = img.bytes_of(store)
        assert not image.problems(), f"refcount_bits={bits}: {image.problems()}"
    for bits in (0, 3, 128):
        _refused(img, refcount_bits=bits)


@pytest.mark.clause("create.compression-type", "qcow2.features.compression-type")
def test_compression_type(img: ImageKit) -> None:
    zlib = img.bytes_of(img.mem(64 * KiB, "qcow2"))
    assert not zlib.get("incompatible_features") & 8, "zlib image has incompatible bit 3"
    assert zlib.get("header_length") <= 104 or zlib.get("compression_type") == 0
    zstd = img.bytes_of(img.mem(64 * KiB, "qcow2", compression_type="zstd"))
    assert zstd.get("incompatible_features") & 8, "zstd image lacks incompatible bit 3"
    assert zstd.header_length > 104 and zstd.get("compression_type") == 1, (
        "zstd image lacks compression_type 1"
    )
    _refused(img, compression_type="lz4")


@pytest.mark.needs("backing")
@pytest.mark.clause("create.backing")
def test_backing_file_and_format_are_recorded(img: ImageKit) -> None:
    (img.tmp / "base.raw").write_bytes(bytes(64 * KiB))
    top = img.file("top.qcow2", 64 * KiB, "qcow2", backing_file="base.raw", backing_fmt="raw")
    image = file_bytes(top)
    assert image.backing_name() == b"base.raw", f"backing name stored as {image.backing_name()!r}"
    ext = image.extension(EXT_BACKING_FORMAT)
    assert ext is not None and ext.data == b"raw", f"backing format extension: {ext}"


@pytest.mark.clause("create.preallocation", "access.resize.grow-format-allocate")
@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
def test_preallocation_modes(img: ImageKit, mode: str) -> None:
    path = img.file(f"{mode}.qcow2", 1 * MiB, "qcow2", cluster_size=64 * KiB, preallocation=mode)
    with img.open(path, writable=False) as disk:
        assert disk.read(0, 1 * MiB) == bytes(1 * MiB), f"preallocation={mode} reads non-zero"
    image = file_bytes(path)
    mapped = [image.host_offset(g) for g in range(0, 1 * MiB, 64 * KiB)]
    if mode == "off":
        assert not any(mapped), "preallocation=off maps data clusters"
    else:
        assert all(mapped), f"preallocation={mode} leaves clusters unmapped"
        assert path.stat().st_size >= max(mapped) + 64 * KiB or mode == "metadata", (
            f"preallocation={mode}: the file is shorter than its clusters"
        )
    if mode == "full":
        assert path.stat().st_blocks * 512 >= 1 * MiB, "preallocation=full did not write data"
    assert not image.problems(), image.problems()


@pytest.mark.needs("backing")
@pytest.mark.clause("create.preallocation")
def test_preallocation_with_backing_is_refused(img: ImageKit) -> None:
    (img.tmp / "base.raw").write_bytes(bytes(64 * KiB))
    for mode in ("metadata", "falloc", "full"):
        _refused(img, backing_file=str(img.tmp / "base.raw"), backing_fmt="raw",
                 preallocation=mode)


@pytest.mark.clause("create.layout", "qcow2.metadata.alignment", "qcow2.refcount.table-layout")
@pytest.mark.parametrize("opts", [
    {"cluster_size": 512},
    {"cluster_size": 65536, "compat": "0.10"},
    {"cluster_size": 4096, "refcount_bits": 1},
    {"cluster_size": 2 * MiB, "preallocation": "metadata"},
], ids=["512", "v2", "rc1", "2m-metadata"])
def test_created_images_are_consistent(img: ImageKit, opts: dict[str, Any]) -> None:
    path = img.file("layout.qcow2", 8 * MiB, "qcow2", **opts)
    image = file_bytes(path)
    cs = image.cluster_size
    assert image.get("magic") == 0x514649FB
    assert image.header_length + 8 <= cs, "the header does not fit in cluster 0"
    for field in ("l1_table_offset", "refcount_table_offset"):
        value = image.get(field)
        assert value and value % cs == 0, f"{field} = {value:#x} is not cluster-aligned"
    rt = image.get("refcount_table_offset")
    for i in range(image.get("refcount_table_clusters") * cs // 8):
        block = image.u64(rt + 8 * i)
        assert block % cs == 0, f"refcount table entry {i} = {block:#x} is not cluster-aligned"
    assert not image.problems(), image.problems()
    # Our own check above already ran; qemu-img is an extra witness where installed.
    with contextlib.suppress(pytest.skip.Exception):
        qemu_check(path)


@pytest.mark.clause("errors.hierarchy")
def test_create_errors_are_pyimago_errors(img: ImageKit) -> None:
    store = MemoryStorage()
    expect_error(PyimagoError, "create a 1000-byte qcow2 image",
                 lambda: img.impl.create_image(store, 1000, format="qcow2"))


@pytest.mark.clause("create.durable")
@pytest.mark.parametrize("opts", [
    {"format": "qcow2"},
    {"format": "qcow2", "preallocation": "metadata"},
    {"format": "qcow2", "preallocation": "full", "cluster_size": 4096},
    {"format": "raw", "preallocation": "full"},
], ids=["qcow2", "qcow2-metadata", "qcow2-full", "raw-full"])
def test_create_returns_with_everything_synced(img: ImageKit, opts: dict[str, Any]) -> None:
    store = RecordingStorage(MemoryStorage())
    img.impl.create_image(store, 256 * KiB, **opts)
    assert store.log, f"create_image({opts}) wrote nothing"
    assert store.synced == len(store.log), (
        f"create_image({opts}) returned with {len(store.log) - store.synced} of its "
        f"{len(store.log)} writes not made durable by sync()")

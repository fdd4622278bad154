"""The error contract (specs/errors.toml)."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from pyimago.oracle.conformance._impl import Impl
from pyimago.oracle.conformance._qcow2 import Qcow2Bytes
from pyimago.oracle.conformance._support import ImageKit, KiB, expect_error, pattern
from pyimago.reference import (
    CorruptImageError,
    DriverError,
    GateDeniedError,
    InvalidRequestError,
    MemoryStorage,
    PyimagoError,
    ReadOnlyError,
    UnsupportedError,
    UnsupportedFeatureError,
)


@pytest.mark.clause("errors.hierarchy")
def test_error_classes_derive_from_the_builtins(impl: Impl) -> None:
    expected: list[tuple[type[Exception], type[Exception]]] = [
        (ReadOnlyError, PermissionError),
        (GateDeniedError, PermissionError),
        (UnsupportedError, io.UnsupportedOperation),
        (UnsupportedFeatureError, UnsupportedError),
        (InvalidRequestError, ValueError),
        (CorruptImageError, ValueError),
        (DriverError, RuntimeError),
    ]
    for cls, builtin in expected:
        assert issubclass(cls, PyimagoError), f"{cls.__name__} is not a PyimagoError"
        assert issubclass(cls, builtin), f"{cls.__name__} is not a {builtin.__name__}"
    # An implementation that re-exports the error types must re-export these very classes.
    for cls, _ in expected:
        own = getattr(impl.obj, cls.__name__, cls)
        assert own is cls, f"{impl.name}.{cls.__name__} is not pyimago.reference's class"


@pytest.mark.clause("errors.bad-input-clear")
def test_bad_arguments_give_invalid_request_errors(img: ImageKit) -> None:
    disk = img.new(64 * KiB)
    with disk:
        calls: list[tuple[str, Callable[[], object], str]] = [
            ("read length", lambda: disk.read(0, "ten"), "ten"),
            ("write data offset", lambda: disk.write(b"x", None), "None"),
            ("resize size", lambda: disk.resize(-4096), "-4096"),
            ("parallelization", lambda: disk.set_read_parallelization(0), "0"),
        ]
        for what, call, named in calls:
            try:
                call()
            except InvalidRequestError as exc:
                assert named in str(exc), f"{what}: the message does not name {named}: {exc}"
            except Exception as exc:  # pragma: no cover - the failure we report
                raise AssertionError(
                    f"{what}: raised {type(exc).__name__}: {exc}, not InvalidRequestError"
                ) from exc
            else:
                raise AssertionError(f"{what}: no error")
    expect_error(InvalidRequestError, "open_image(12345)", lambda: img.impl.open_image(12345))
    error = expect_error(
        (InvalidRequestError, UnsupportedFeatureError), "open with format='vmdk'",
        lambda: img.impl.open_image(MemoryStorage(bytes(4096)), format="vmdk"),
    )
    assert "vmdk" in str(error)


def _corruptions(base: Qcow2Bytes) -> dict[str, Qcow2Bytes]:
    out: dict[str, Qcow2Bytes] = {}

    def variant(name: str) -> Qcow2Bytes:
        out[name] = Qcow2Bytes(base.data)
        return out[name]

    variant("truncated header").data[:] = base.data[:40]
    variant("huge l1_size").set(l1_size=0xFFFFFFFF)
    variant("l1 past 2^56").set(l1_table_offset=1 << 60)
    variant("unaligned l1").set(l1_table_offset=base.get("l1_table_offset") + 8)
    variant("huge refcount table").set(refcount_table_clusters=0xFFFFFFFF)
    l2 = variant("l2 offset past the file")
    l2.put_u64(l2.l1_entry_pos(0), (1 << 63) | (1 << 50))
    comp = variant("garbage compressed cluster")
    comp.set_l2_entry(0, comp.compressed_entry(comp.host_offset(0), 300))
    return out


@pytest.mark.needs("qcow2")
@pytest.mark.clause("errors.corrupt-not-stdlib", "qcow2.header.limits", "qcow2.metadata.alignment")
def test_hostile_metadata_gives_corrupt_image_error(img: ImageKit) -> None:
    base = img.crafted(64 * KiB, writes=[(0, pattern(1, 2 * KiB))])
    img.refuses_all(_corruptions(base), CorruptImageError)


@pytest.mark.needs("qcow2")
@pytest.mark.clause("errors.feature-named", "qcow2.features.encryption",
                    "qcow2.features.external-data")
def test_refusals_name_the_feature(img: ImageKit) -> None:
    # 64 KiB clusters: with 512-byte ones the L1 table would be too small for 16-byte entries.
    base = img.crafted(cluster_size=64 * 1024)
    image = Qcow2Bytes(base.data)
    image.set(crypt_method=1)
    error = img.refuses(image, UnsupportedFeatureError, "encryption")
    assert "encryption" in str(error).lower(), f"the message does not name encryption: {error}"
    assert "encryption" in str(getattr(error, "feature", "")).lower(), (
        f"the feature attribute is {getattr(error, 'feature', None)!r}, not 'encryption'"
    )
    # Extended L2 entries and external data files are read and written (issue 13); an image
    # that needs a data file but names none is refused, naming what is missing.
    no_name = Qcow2Bytes(base.data)
    no_name.set(incompatible_features=1 << 2)
    error = img.refuses(no_name, PyimagoError, "external data file without a name",
                        writable=True)
    assert "data file" in str(error).lower() or "data_file" in str(error), (
        f"the message does not name the data file: {error}"
    )
    luks = Qcow2Bytes(base.data)
    luks.set(crypt_method=2)
    img.refuses(luks, UnsupportedFeatureError, "LUKS encryption")

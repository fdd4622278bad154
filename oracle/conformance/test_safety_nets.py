"""Bounded requests (access.request.bounded), bad paths (storage.open.errors) and the backing
check of create_image (create.backing.checked)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pyimago.reference import (
    MAX_REQUEST_BYTES,
    ImageAccessError,
    ImageInUseError,
    ImageNotFoundError,
    InvalidRequestError,
    MemoryStorage,
    ProbedRawWriteError,
    PyimagoError,
    ReadOnlyError,
)

from ._impl import Impl
from ._support import ImageKit, KiB, MiB, expect_error, pattern, qemu_img


@pytest.mark.clause("access.request.bounded")
def test_the_bound_is_qemus() -> None:
    # BDRV_REQUEST_MAX_BYTES: INT_MAX >> 9 << 9.
    assert MAX_REQUEST_BYTES == 2**31 - 512


@pytest.mark.clause("access.request.bounded", "errors.bad-input-clear")
def test_oversized_requests_are_refused_before_any_allocation(img: ImageKit) -> None:
    disk = img.new(1 * MiB)
    huge = MAX_REQUEST_BYTES + 1
    # A view of an untouched anonymous map: large, yet no memory is used.
    big = mmap.mmap(-1, huge)
    view = memoryview(big)
    # (Not closed here: the caught errors' tracebacks still hold slices of the map.)
    calls: list[tuple[str, Callable[[], object], int]] = [
        ("read", lambda: disk.read(0, 1 << 40), 1 << 40),
        ("read just past the bound", lambda: disk.read(0, huge), huge),
        ("readinto", lambda: disk.readinto(view, 0), huge),
        ("readv", lambda: disk.readv([view[: huge // 2], view[huge // 2 :]], 0), huge),
        ("write", lambda: disk.write(view, 0), huge),
        ("writev", lambda: disk.writev([view[:1], view[1:]], 0), huge),
    ]
    wrong = []
    for what, call, length in calls:
        exc = expect_error(InvalidRequestError, what, call)
        if str(length) not in str(exc):
            wrong.append(f"{what}: {exc}")
    assert not wrong, f"messages that do not name the length: {wrong}"
    with disk:
        disk.write(pattern(60, 64 * KiB), 0)
        assert disk.read(0, 64 * KiB) == pattern(60, 64 * KiB), (
            "an ordinary request failed after the refusals"
        )


@pytest.mark.clause("storage.open.errors", "errors.bad-input-clear")
def test_bad_paths_give_pyimago_errors_naming_them(img: ImageKit, tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    missing = tmp_path / "missing.qcow2"
    cases: list[tuple[str, type[Exception], Callable[[], object], str]] = [
        ("open_image(12345)", InvalidRequestError, lambda: img.impl.open_image(12345), "12345"),
        ("open_image(folder)", InvalidRequestError, lambda: img.open(folder, writable=False),
         "a-folder"),
        ("open_image(folder, writable)", InvalidRequestError, lambda: img.open(folder),
         "a-folder"),
        ("open_image(missing)", ImageNotFoundError, lambda: img.open(missing), "missing.qcow2"),
        ("create_image(folder)", InvalidRequestError,
         lambda: img.create(folder, 64 * KiB, "qcow2"), "a-folder"),
        ("create_image(12345)", InvalidRequestError,
         lambda: img.impl.create_image(12345, 64 * KiB), "12345"),
        ("create_image(no such folder)", ImageNotFoundError,
         lambda: img.create(tmp_path / "nope" / "x.qcow2", 64 * KiB, "qcow2"), "nope"),
    ]
    wrong = []
    for what, exc_type, call, named in cases:
        exc = expect_error(exc_type, what, call)
        if named not in str(exc):
            wrong.append(f"{what}: {exc}")
    assert not wrong, f"messages that do not name the value: {wrong}"
    exc = expect_error(ImageNotFoundError, "missing", lambda: img.open(missing))
    assert isinstance(exc, FileNotFoundError) and exc.filename == str(missing)
    if os.geteuid() != 0:
        locked = img.file("no-access.qcow2", 64 * KiB)
        locked.chmod(0)
        exc = expect_error(ImageAccessError, "unreadable file", lambda: img.open(locked))
        assert isinstance(exc, PermissionError) and "no-access.qcow2" in str(exc)


@pytest.mark.needs("backing")
@pytest.mark.clause("storage.open.errors", "backing.resolve-relative")
def test_a_missing_backing_file_is_named_with_its_overlay(img: ImageKit) -> None:
    top = img.file("top.qcow2", 64 * KiB, "qcow2", unsafe=True, backing_file="gone.qcow2",
                   backing_fmt="qcow2")
    exc = expect_error(ImageNotFoundError, "open an overlay of a missing backing file",
                       lambda: img.open(top, writable=False))
    assert isinstance(exc, ImageNotFoundError)
    assert exc.filename == str(img.tmp / "gone.qcow2"), exc.filename
    assert "gone.qcow2" in str(exc) and "top.qcow2" in str(exc), exc


@pytest.mark.needs("backing")
@pytest.mark.clause("create.backing.checked")
def test_create_checks_the_backing_file_as_qemu_img_does(img: ImageKit) -> None:
    target = img.tmp / "new.qcow2"
    exc = expect_error(ImageNotFoundError, "create over a missing backing file",
                       lambda: img.create(target, 64 * KiB, "qcow2", backing_file="missing.qcow2",
                                          backing_fmt="qcow2"))
    assert "missing.qcow2" in str(exc), exc
    assert not target.exists(), "a refused create left a file behind"
    # qemu-img agrees: it refuses too, and creates nothing.
    qtarget = img.tmp / "qemu.qcow2"
    proc = qemu_img("create", "-q", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2",
                    qtarget, "64K", ok=(1,))
    assert "Could not open backing image" in proc.stderr and not qtarget.exists()
    # unsafe=True is qemu-img create -u: no check, but then a size is needed.
    img.create(target, 64 * KiB, "qcow2", unsafe=True, backing_file="missing.qcow2",
               backing_fmt="qcow2")
    assert "backing file: missing.qcow2" in qemu_img("info", "-U", target).stdout
    expect_error(InvalidRequestError, "unsafe create without a size",
                 lambda: img.impl.create_image(str(img.tmp / "u.qcow2"), None, unsafe=True,
                                    backing_file="missing.qcow2"))
    expect_error(InvalidRequestError, "unsafe='yes'",
                 lambda: img.create(img.tmp / "v.qcow2", 64 * KiB, "qcow2", unsafe="yes",
                                    backing_file="x"))


@pytest.mark.needs("backing")
@pytest.mark.clause("create.backing.checked", "create.backing")
def test_without_a_size_the_backing_files_size_is_taken(img: ImageKit) -> None:
    base = img.tmp / "base.raw"
    base.write_bytes(pattern(61, 100 * KiB + 3))
    img.impl.create_image(str(img.tmp / "top.qcow2"), None, backing_file="base.raw",
                          backing_fmt="raw")
    with img.open(img.tmp / "top.qcow2", writable=False) as top:
        assert top.size == 100 * KiB + 512, f"size {top.size}, backing {100 * KiB + 3}"
        assert top.read(0, 100 * KiB) == pattern(61, 100 * KiB)
    # In memory, a size-less create opens the backing file too (an absolute name).
    store = MemoryStorage()
    img.impl.create_image(store, None, backing_file=str(base), backing_fmt="raw")
    with img.open(store, writable=False, backing=None) as top:
        assert top.size == 100 * KiB + 512


@pytest.mark.clause("errors.hierarchy")
def test_safety_net_errors_derive_from_the_builtins(impl: Impl) -> None:
    expected: list[tuple[type[Exception], type[Exception]]] = [
        (ImageInUseError, BlockingIOError),
        (ImageAccessError, PermissionError),
        (ImageNotFoundError, FileNotFoundError),
        (ProbedRawWriteError, ReadOnlyError),
    ]
    for cls, builtin in expected:
        assert issubclass(cls, PyimagoError) and issubclass(cls, builtin), cls
        own = getattr(impl.obj, cls.__name__, cls)
        assert own is cls, f"{impl.name}.{cls.__name__} is not pyimago.reference's class"

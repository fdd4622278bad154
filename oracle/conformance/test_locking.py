"""QEMU-compatible image locks (specs/storage.toml, storage.lock.*), against qemu-io for real.

qemu-io holds images in the background (``qemu-io -c 'sleep N'``) while the implementation
opens them, and the other way round; /proc/locks shows who holds which lock bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pyimago.reference import (
    ImageInUseError,
    InvalidRequestError,
    MemoryStorage,
    PyimagoError,
)

from ._locks import held_lock_bytes, qemu_holding, qemu_io_run
from ._support import ImageKit, KiB, expect_error, pattern, qemu_img

pytestmark = pytest.mark.needs("qcow2")

WRITABLE = {100, 101, 103, 201, 203}
READ_ONLY = {100, 201, 203}
FORCE_SHARE = {100}


def _in_use(what: str, call: Callable[[], object]) -> ImageInUseError:
    exc = expect_error(ImageInUseError, what, call)
    assert isinstance(exc, ImageInUseError)
    assert issubclass(ImageInUseError, BlockingIOError)
    assert issubclass(ImageInUseError, PyimagoError)
    assert "in use by another process" in str(exc), f"{what}: {exc}"
    return exc


@pytest.mark.clause("storage.lock.bytes")
def test_lock_bytes_are_qemus(img: ImageKit) -> None:
    path = img.file("bytes.qcow2", 1024 * KiB)
    for flags, kwargs, expected in (
        ((), {"writable": True}, WRITABLE),
        (("-r",), {"writable": False}, READ_ONLY),
        (("-r", "-U"), {"writable": False, "force_share": True}, FORCE_SHARE),
    ):
        with qemu_holding(path, *flags) as qemu_bytes:
            assert qemu_bytes == expected, f"qemu-io {flags} locked {sorted(qemu_bytes)}"
        assert not held_lock_bytes(path), "qemu-io left locks behind"
        with img.open(path, **kwargs) as disk:
            ours = held_lock_bytes(path)
            assert ours == expected, f"open_image({kwargs}) locked {sorted(ours)}, qemu-io " \
                                     f"{flags} locks {sorted(expected)}"
            disk.read(0, 512)
        assert not held_lock_bytes(path), f"closing the image ({kwargs}) left locks behind"
    raw = img.tmp / "bytes.raw"
    raw.write_bytes(bytes(64 * KiB))
    with img.open(raw, format="raw", writable=True):
        assert held_lock_bytes(raw) == WRITABLE
    with img.open(MemoryStorage(pattern(50, 4 * KiB)), format="raw"):
        pass  # nothing to lock, nothing to fail


@pytest.mark.clause("storage.lock.conflict", "storage.lock.options")
def test_images_qemu_holds_are_refused(img: ImageKit) -> None:
    path = img.file("held.qcow2", 1024 * KiB)
    with img.open(path) as disk:
        disk.write(pattern(51, 64 * KiB), 0)
    with qemu_holding(path):  # writable
        exc = _in_use("read-only open of an image qemu-io holds writable",
                      lambda: img.open(path, writable=False))
        assert exc.filename == str(path) and '"write"' in str(exc), exc
        _in_use("writable open of an image qemu-io holds writable",
                lambda: img.open(path, writable=True))
        with img.open(path, writable=False, force_share=True) as disk:
            assert disk.read(0, 64 * KiB) == pattern(51, 64 * KiB)
        with img.open(path, writable=False, locking="off") as disk:
            assert disk.read(0, 4 * KiB) == pattern(51, 4 * KiB)
        # A refused open leaves nothing locked behind: only qemu-io's bytes are held.
        assert held_lock_bytes(path) == WRITABLE
    with qemu_holding(path, "-r"):
        _in_use("writable open of an image qemu-io holds read-only",
                lambda: img.open(path, writable=True))
        with img.open(path, writable=False) as disk:
            assert disk.read(0, 4 * KiB) == pattern(51, 4 * KiB)
    with img.open(path, writable=True) as disk:  # free again
        disk.write(b"after", 0)


@pytest.mark.clause("storage.lock.conflict")
def test_qemu_refuses_images_the_implementation_holds(img: ImageKit) -> None:
    path = img.file("ours.qcow2", 1024 * KiB)
    with img.open(path, writable=True):
        info = qemu_img("info", path, ok=(0, 1))
        assert info.returncode == 1 and "lock" in info.stderr, info.stderr
        wrote = qemu_io_run(path, "-c", "write -P 7 0 4k")
        assert "lock" in wrote.stdout + wrote.stderr and wrote.returncode != 0, wrote
        # qemu-img -U still reads it, as it reads an image a running guest holds.
        assert qemu_img("info", "-U", path).returncode == 0
    with img.open(path, writable=False):
        wrote = qemu_io_run(path, "-c", "write -P 7 0 4k")
        assert "lock" in wrote.stdout + wrote.stderr and wrote.returncode != 0, wrote
        read = qemu_io_run(path, "-r", "-c", "read 0 4k")
        assert read.returncode == 0 and "lock" not in read.stderr, read
    wrote = qemu_io_run(path, "-c", "write -P 7 0 4k")
    assert wrote.returncode == 0 and "wrote" in wrote.stdout, wrote


@pytest.mark.clause("storage.lock.conflict")
def test_two_opens_in_one_process_conflict_too(img: ImageKit) -> None:
    path = img.file("twice.qcow2", 1024 * KiB)
    with img.open(path, writable=True):
        _in_use("a second open in the same process", lambda: img.open(path, writable=False))
    with img.open(path, writable=False), img.open(path, writable=False):
        _in_use("a writer besides two readers", lambda: img.open(path, writable=True))


@pytest.mark.clause("storage.lock.conflict")
def test_create_image_does_not_clobber_a_held_image(img: ImageKit) -> None:
    path = img.file("busy.qcow2", 1024 * KiB)
    with img.open(path) as disk:
        disk.write(pattern(52, 4 * KiB), 0)
    before = path.read_bytes()
    with qemu_holding(path, "-r"):
        _in_use("create_image over an image qemu-io holds",
                lambda: img.create(path, 64 * KiB, "qcow2"))
    assert path.read_bytes() == before, "create_image changed a held image"


@pytest.mark.needs("backing")
@pytest.mark.clause("storage.lock.backing")
def test_backing_files_are_locked_for_reading(img: ImageKit) -> None:
    base = img.file("base.qcow2", 1024 * KiB)
    top = img.file("top.qcow2", 1024 * KiB, "qcow2", backing_file="base.qcow2",
                   backing_fmt="qcow2")
    with img.open(top, writable=True):
        assert held_lock_bytes(base) == READ_ONLY, sorted(held_lock_bytes(base))
        wrote = qemu_io_run(base, "-c", "write -P 7 0 4k")
        assert wrote.returncode != 0 and "lock" in wrote.stdout + wrote.stderr, wrote
        assert qemu_io_run(base, "-r", "-c", "read 0 4k").returncode == 0
    assert not held_lock_bytes(base)
    with qemu_holding(base):
        _in_use("overlay over a backing file qemu-io holds writable", lambda: img.open(top))
        with img.open(top, writable=False, force_share=True) as disk:
            disk.read(0, 4 * KiB)


@pytest.mark.clause("storage.lock.options", "errors.bad-input-clear")
def test_locking_options_are_checked_up_front(img: ImageKit) -> None:
    path = img.file("opts.qcow2", 64 * KiB)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"locking": "maybe"}, "maybe"),
        ({"locking": True}, "True"),
        ({"force_share": "yes"}, "yes"),
        ({"force_share": True, "writable": True}, "force_share"),
    ]
    for kwargs, named in cases:
        kwargs.setdefault("writable", False)

        def call(kw: dict[str, Any] = kwargs) -> object:
            return img.open(path, **kw)

        exc = expect_error(InvalidRequestError, f"open_image({kwargs})", call)
        assert named in str(exc), f"{kwargs}: the message does not name {named}: {exc}"
    assert not held_lock_bytes(path)
    for locking in ("auto", "on"):
        with img.open(path, locking=locking):
            assert held_lock_bytes(path) == WRITABLE
    with img.open(path, locking="off"):
        assert not held_lock_bytes(path)


@pytest.mark.needs("backing")
@pytest.mark.clause("storage.lock.backing", "create.backing.checked")
def test_an_overlay_of_an_image_in_use_can_be_created(img: ImageKit) -> None:
    """As qemu-img create (external snapshots): the backing file is opened shared."""
    base = img.file("running.qcow2", 1024 * KiB)
    with qemu_holding(base):
        img.impl.create_image(str(img.tmp / "snap.qcow2"), None, backing_file="running.qcow2",
                              backing_fmt="qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "running.qcow2", "-F", "qcow2",
                 img.tmp / "qsnap.qcow2")
    with img.open(img.tmp / "snap.qcow2", writable=False) as snap:
        assert snap.size == 1024 * KiB

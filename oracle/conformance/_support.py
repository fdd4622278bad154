"""Helpers of the conformance tests: images of the implementation under test, qemu-img, data.

Everything here goes through the implementation's public API (``open_image``,
``create_image``, the ``FormatAccess`` it returns) and the contract types of
:mod:`pyimago.reference`; qcow2 bytes are read and crafted by :mod:`._qcow2`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn

import pytest
from pyimago.reference import MemoryStorage

from ._impl import Impl
from ._qcow2 import Qcow2Bytes

__all__ = [
    "NOT_APPLICABLE",
    "ImageKit",
    "KiB",
    "MiB",
    "chdir_elsewhere",
    "expect_error",
    "file_bytes",
    "fsync_counter",
    "not_applicable",
    "pattern",
    "qemu_check",
    "qemu_img",
    "qemu_io",
    "require_qemu",
]

KiB: Final = 1 << 10
MiB: Final = 1 << 20

#: Prefix of the skip reason that makes a test *not applicable* (not a skip) in the report.
NOT_APPLICABLE: Final = "not applicable: "

QEMU_TIMEOUT: Final = 60.0

Access = Any
"""A FormatAccess-like object of the implementation under test."""


def not_applicable(reason: str) -> NoReturn:
    """End the test as not applicable to this implementation (or this machine)."""
    pytest.skip(NOT_APPLICABLE + reason)


def expect_error(
    exc_type: type[BaseException] | tuple[type[BaseException], ...],
    what: str,
    call: Callable[[], object],
) -> BaseException:
    """Call ``call`` and return the ``exc_type`` it raises; otherwise fail the test with
    "<what>: expected <exc_type>, got <what happened>" (the report splits it there, so a
    reader sees "expected InvalidRequestError", not "expected no exception")."""
    types = exc_type if isinstance(exc_type, tuple) else (exc_type,)
    names = " or ".join(t.__name__ for t in types)
    try:
        call()
    except types as exc:
        return exc
    except Exception as exc:
        raise AssertionError(
            f"{what}: expected {names}, got {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(f"{what}: expected {names}, got no error")


def require_qemu() -> str:
    """The path of qemu-img; the test is not applicable without it."""
    path = shutil.which("qemu-img")
    if path is None:
        not_applicable("qemu-img not installed")
    return path


def qemu_img(*args: str | Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; an unexpected exit status fails the test with its output."""
    cmd = [require_qemu(), *(str(a) for a in args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_TIMEOUT, check=False)
    if proc.returncode not in ok:
        pytest.fail(
            f"qemu-img exited {proc.returncode}: {' '.join(cmd[1:])}\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
    return proc


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    """Run qemu-io commands on an image; a failing command fails the test."""
    require_qemu()
    exe = shutil.which("qemu-io")
    if exe is None:
        not_applicable("qemu-io not installed")
    args = [exe, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    proc = subprocess.run([*args, str(path)], capture_output=True, text=True,
                          timeout=QEMU_TIMEOUT, check=False)
    assert proc.returncode == 0 and "fail" not in proc.stdout.lower(), (
        f"qemu-io {cmds}: {proc.stdout}{proc.stderr}"
    )


def qemu_check(path: Path) -> dict[str, Any]:
    """``qemu-img check``; returns its JSON report after asserting no errors and no leaks."""
    proc = qemu_img("check", "--output=json", "-f", "qcow2", path, ok=(0, 2, 3))
    report: dict[str, Any] = json.loads(proc.stdout)
    bad = {k: report[k] for k in ("corruptions", "leaks", "check-errors") if report.get(k)}
    assert proc.returncode == 0 and not bad, (
        f"qemu-img check of {path.name} reports {bad or 'exit ' + str(proc.returncode)}: "
        f"{proc.stdout}{proc.stderr}"
    )
    return report


def pattern(seed: int, length: int) -> bytes:
    """``length`` non-zero bytes that differ with ``seed`` (misplaced data is recognisable)."""
    base = bytes((i + seed * 37) % 251 + 1 for i in range(251))
    return (base * (length // 251 + 1))[:length]


class ImageKit:
    """Make and open images of the implementation under test, in memory or in ``tmp_path``."""

    def __init__(self, impl: Impl, tmp_path: Path) -> None:
        self.impl = impl
        self.tmp = tmp_path
        caps = impl.capabilities
        #: The format generic tests use: qcow2 where supported, else raw, else the default.
        self.primary: str | None = "qcow2" if caps.qcow2 else "raw" if caps.raw else None

    # -- creating -------------------------------------------------------------------------------

    def create(self, where: Path | MemoryStorage, size: int, fmt: str | None, **opts: Any) -> None:
        fmt = self.primary if fmt == "primary" else fmt
        if fmt is not None:
            opts["format"] = fmt
        self.impl.create_image(str(where) if isinstance(where, Path) else where, size, **opts)

    def mem(self, size: int = 1 * MiB, fmt: str | None = "qcow2", **opts: Any) -> MemoryStorage:
        """A new image in memory; ``fmt="primary"`` picks :attr:`primary`."""
        storage = MemoryStorage(name=f"mem.{fmt}")
        self.create(storage, size, fmt, **opts)
        return storage

    def file(
        self, name: str, size: int = 1 * MiB, fmt: str | None = "qcow2", **opts: Any
    ) -> Path:
        """A new image file in the test's temporary folder."""
        path = self.tmp / name
        self.create(path, size, fmt, **opts)
        return path

    # -- opening --------------------------------------------------------------------------------

    def open(
        self, where: Path | MemoryStorage | str, *, writable: bool = True, **kwargs: Any
    ) -> Access:
        """Open an image; a MemoryStorage gets ``backing=None`` unless a backing is given."""
        if isinstance(where, MemoryStorage):
            kwargs.setdefault("backing", None)
        target = str(where) if isinstance(where, Path) else where
        return self.impl.open_image(target, writable=writable, **kwargs)

    def new(self, size: int = 1 * MiB, fmt: str | None = "primary", **opts: Any) -> Access:
        """A new in-memory image, opened writable."""
        return self.open(self.mem(size, fmt, **opts))

    def chain(
        self,
        base_data: list[tuple[int, bytes]],
        *,
        base_size: int = 1 * MiB,
        size: int = 1 * MiB,
        base_fmt: str = "qcow2",
        cluster_size: int = 4 * KiB,
        compat: str = "1.1",
    ) -> tuple[Access, Access, MemoryStorage]:
        """An in-memory base (with ``base_data`` written) and a qcow2 overlay over it.

        Returns (overlay opened writable, base opened read-only, overlay storage).
        """
        base_store = self.mem(
            base_size,
            base_fmt,
            **({"cluster_size": cluster_size} if base_fmt == "qcow2" else {}),
        )
        with self.open(base_store) as base:
            for offset, data in base_data:
                base.write(data, offset)
        base = self.open(base_store, writable=False)
        top_store = self.mem(
            size,
            "qcow2",
            cluster_size=cluster_size,
            compat=compat,
            backing_file="base.img",
            backing_fmt=base_fmt,
        )
        top = self.open(top_store, backing=base)
        return top, base, top_store

    # -- crafting -------------------------------------------------------------------------------

    @staticmethod
    def bytes_of(storage: MemoryStorage) -> Qcow2Bytes:
        return Qcow2Bytes(storage.snapshot())

    def crafted(
        self,
        size: int = 64 * KiB,
        *,
        writes: list[tuple[int, bytes]] | None = None,
        **opts: Any,
    ) -> Qcow2Bytes:
        """The bytes of a qcow2 image made by the implementation, for editing."""
        opts.setdefault("cluster_size", 512)
        storage = self.mem(size, "qcow2", **opts)
        if writes:
            with self.open(storage) as img:
                for offset, data in writes:
                    img.write(data, offset)
        return self.bytes_of(storage)

    def open_bytes(self, image: Qcow2Bytes | bytes, *, writable: bool = False, **kwargs: Any
                   ) -> Access:
        data = image.data if isinstance(image, Qcow2Bytes) else image
        return self.open(MemoryStorage(bytes(data), name="crafted.qcow2"), writable=writable,
                         **kwargs)

    def use(self, image: Qcow2Bytes | bytes, *, writable: bool = False, **kwargs: Any) -> None:
        """Open crafted bytes, read and map the first 4 KiB, write there if writable, close."""
        with self.open_bytes(image, writable=writable, **kwargs) as disk:
            disk.read(0, 4096)
            disk.get_mapping(0, 4096)
            if writable:
                disk.write(b"\xa5" * 512, 0)

    def refuses(self, image: Qcow2Bytes | bytes, exc_type: type[BaseException], what: str,
                *, writable: bool = False, **kwargs: Any) -> BaseException:
        """Assert that using the crafted image (see :meth:`use`) raises ``exc_type``."""
        return expect_error(exc_type, what, lambda: self.use(image, writable=writable, **kwargs))

    def refuses_all(self, cases: dict[str, Qcow2Bytes], exc_type: type[BaseException], *,
                    writable: bool = False) -> None:
        """:meth:`refuses` for every case; one failure names every case that was not refused:
        "expected <exc_type>, got: <case>: <what happened>; <case>: ..."."""
        wrong: list[str] = []
        for what, image in cases.items():
            try:
                self.use(image, writable=writable)
            except exc_type:
                continue
            except Exception as exc:
                wrong.append(f"{what}: {type(exc).__name__}: {exc}")
            else:
                wrong.append(f"{what}: no error")
        if wrong:
            raise AssertionError(
                f"expected {exc_type.__name__}, got: {'; '.join(wrong)} "
                f"({len(wrong)} of {len(cases)} cases)"
            )

    def write_file(self, name: str, image: Qcow2Bytes | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(bytes(image.data if isinstance(image, Qcow2Bytes) else image))
        return path


def file_bytes(path: Path) -> Qcow2Bytes:
    return Qcow2Bytes(path.read_bytes())


def same_file(path: Path) -> bytes:
    """A file's bytes (for before/after comparisons)."""
    with open(path, "rb") as f:
        return f.read()


def chdir_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run the rest of the test in a fresh folder, so relative names cannot resolve by luck."""
    other = tmp_path / "elsewhere"
    other.mkdir(exist_ok=True)
    monkeypatch.chdir(other)
    return other


def fsync_counter(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count calls of os.fsync / os.fdatasync (the list grows by the function's name)."""
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name, None)
        if real is None:
            continue

        def spy(fd: int, _real: Any = real, _name: str = name) -> None:
            calls.append(_name)
            _real(fd)

        monkeypatch.setattr(os, name, spy)
    return calls

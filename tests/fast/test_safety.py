"""File storages of both implementations: bad paths and image locks (storage.open.errors,
storage.lock.*)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago.fast import FastFileStorage, ImageInUseError, ImageNotFoundError, InvalidRequestError
from pyimago.reference import FileStorage

STORAGES = [FileStorage, FastFileStorage]


@pytest.mark.clause("storage.open.errors")
@pytest.mark.parametrize("cls", STORAGES)
@pytest.mark.parametrize("bad", [12345, None, b"bytes.img", ""])
def test_not_a_path(cls: type, bad: object) -> None:
    with pytest.raises(InvalidRequestError, match=repr(bad).replace("'", ".")):
        cls(bad)


@pytest.mark.clause("storage.open.errors")
@pytest.mark.parametrize("cls", STORAGES)
def test_folder_and_missing(cls: type, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="folder"):
        cls(tmp_path)
    with pytest.raises(ImageNotFoundError) as info:
        cls(tmp_path / "none.img", writable=True)
    assert info.value.filename == str(tmp_path / "none.img")


@pytest.mark.clause("storage.lock.conflict", "storage.lock.options")
@pytest.mark.parametrize("cls", STORAGES)
def test_conflict_and_options(cls: type, tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(512))
    first = cls(path, writable=True)
    assert first.locked
    with pytest.raises(ImageInUseError, match="in use by another process"):
        cls(path)
    assert cls(path, force_share=True).locked
    assert not cls(path, locking="off").locked
    with pytest.raises(InvalidRequestError, match="force_share"):
        cls(path, writable=True, force_share=True)
    first.close()
    cls(path, writable=True).close()


@pytest.mark.clause("storage.lock.options")
@pytest.mark.parametrize("cls", STORAGES)
def test_without_ofd_locks_auto_goes_unlocked_and_on_refuses(
    cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyimago.fast import _lock
    from pyimago.reference import UnsupportedError, locking

    monkeypatch.setattr(locking, "_OFD_SETLK", None)
    monkeypatch.setattr(_lock, "_SET", None)
    path = tmp_path / "f.img"
    path.write_bytes(bytes(512))
    storage = cls(path, writable=True)
    assert not storage.locked
    storage.close()
    with pytest.raises(UnsupportedError, match="OFD"):
        cls(path, writable=True, locking="on")

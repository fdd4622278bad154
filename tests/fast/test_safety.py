"""FastFileStorage: bad paths and image locks (storage.open.errors, storage.lock.*)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago.fast import FastFileStorage, ImageInUseError, ImageNotFoundError, InvalidRequestError


@pytest.mark.clause("storage.open.errors")
@pytest.mark.parametrize("bad", [12345, None, b"bytes.img", ""])
def test_not_a_path(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match=repr(bad).replace("'", ".")):
        FastFileStorage(bad)  # type: ignore[arg-type]


@pytest.mark.clause("storage.open.errors")
def test_folder_and_missing(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="folder"):
        FastFileStorage(tmp_path)
    with pytest.raises(ImageNotFoundError) as info:
        FastFileStorage(tmp_path / "none.img", writable=True)
    assert info.value.filename == str(tmp_path / "none.img")


@pytest.mark.clause("storage.lock.conflict", "storage.lock.options")
def test_conflict_and_options(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(512))
    first = FastFileStorage(path, writable=True)
    assert first.locked
    with pytest.raises(ImageInUseError, match="in use by another process"):
        FastFileStorage(path)
    assert FastFileStorage(path, force_share=True).locked
    assert not FastFileStorage(path, locking="off").locked
    with pytest.raises(InvalidRequestError, match="force_share"):
        FastFileStorage(path, writable=True, force_share=True)
    first.close()
    FastFileStorage(path, writable=True).close()

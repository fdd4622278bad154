"""FileStorage: bad paths give pyimago errors naming them; locks (storage.open.errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago.reference import (
    FileStorage,
    ImageInUseError,
    ImageNotFoundError,
    InvalidRequestError,
)
from pyimago.reference.locking import Permissions, permissions_for


@pytest.mark.clause("storage.open.errors")
@pytest.mark.parametrize("bad", [12345, None, b"bytes.img", ""])
def test_not_a_path(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match=repr(bad).replace("'", ".")):
        FileStorage(bad)  # type: ignore[arg-type]


@pytest.mark.clause("storage.open.errors")
def test_folder_and_missing(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="folder"):
        FileStorage(tmp_path)
    with pytest.raises(ImageNotFoundError) as info:
        FileStorage(tmp_path / "none.img", writable=True)
    assert info.value.filename == str(tmp_path / "none.img")


@pytest.mark.clause("storage.lock.bytes", "storage.lock.conflict")
def test_permission_table_and_conflict(tmp_path: Path) -> None:
    assert permissions_for(writable=True, force_share=False).lock_bytes() == [100, 101, 103,
                                                                               201, 203]
    assert permissions_for(writable=False, force_share=False).lock_bytes() == [100, 201, 203]
    assert permissions_for(writable=False, force_share=True) == Permissions(1, 15)
    path = tmp_path / "f.img"
    path.write_bytes(bytes(512))
    first = FileStorage(path, writable=True)
    assert first.locked
    with pytest.raises(ImageInUseError, match="in use by another process"):
        FileStorage(path)
    assert FileStorage(path, force_share=True).locked
    first.close()
    FileStorage(path, writable=True).close()

"""reference.locking: the permission table (storage.lock.bytes).

Bad paths and lock conflicts are tested for FileStorage and FastFileStorage alike in
tests/fast/test_safety.py.
"""

from __future__ import annotations

import pytest
from pyimago.reference.locking import Permissions, permissions_for


@pytest.mark.clause("storage.lock.bytes")
def test_permission_table() -> None:
    assert permissions_for(writable=True, force_share=False).lock_bytes() == [100, 101, 103,
                                                                               201, 203]
    assert permissions_for(writable=False, force_share=False).lock_bytes() == [100, 201, 203]
    assert permissions_for(writable=False, force_share=True) == Permissions(1, 15)

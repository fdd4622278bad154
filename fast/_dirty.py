"""The dirty bit on a writable open: repair the refcounts first, then clear it (QEMU).

QEMU's qcow2_do_open, for an image opened read-write with incompatible bit 0 set, runs
``qcow2_co_check_locked(bs, &result, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS)`` and refuses the
open when that leaves check errors; the repair clears the dirty bit once nothing is wrong.
A corrupt image is refused before that (qcow2.features.corrupt), and read-only opens write
nothing.  pyimago.fast never postpones refcount updates itself, so it never sets the bit.
"""

from __future__ import annotations

import struct

from pyimago.reference._errors import CorruptImageError
from pyimago.reference._storage import Storage

from ._header import MAGIC, Incompat, check_features, parse_header

__all__ = ["repair_if_dirty"]


def repair_if_dirty(storage: Storage) -> bool:
    """Before a writable open of the qcow2 image in ``storage``: if it is dirty (and not
    corrupt, and nothing else stops the open), rebuild its refcounts as ``qemu-img check -r
    all`` does and clear the bit.  Returns whether a repair ran."""
    head = storage.read(0, 512)
    if head[:4] != MAGIC or len(head) < 104:
        return False
    (bits,) = struct.unpack_from(">I", head, 20)
    if not 9 <= bits <= 21:
        return False  # the open names what is wrong
    hdr = parse_header(storage.read(0, 1 << bits), storage.size())
    flags = hdr.features.incompatible
    # qcow2.features.dirty: "make sure to scan L1/L2 tables to repair refcounts before
    # accessing the image" -- but a corrupt image is not opened writable at all, and one
    # whose features we cannot honour is refused by the open as it is.
    if hdr.version < 3 or not flags & Incompat.DIRTY or flags & Incompat.CORRUPT:
        return False
    check_features(hdr.with_incompatible(0), {}, writable=False)
    from ._check import check  # (it imports the access layer, which this module precedes)

    result = check(storage, repair="all")
    if result.check_errors or result.corruptions:
        why = "; ".join(p.message for p in result.problems[:3]) or "see qemu-img check"
        raise CorruptImageError(
            f"qcow2: {storage}: could not repair the dirty image's refcounts ({why}); "
            "it may be opened read-only"
        )
    return True

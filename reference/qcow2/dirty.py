"""Opening a dirty image writable (specs/qcow2-lazy-refcounts.toml, qcow2.features.dirty).

QEMU's qcow2_do_open: "Repair image if dirty" -- a writable open of an image whose dirty bit
(incompatible bit 0) is set runs the check with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS, which
rebuilds the refcounts from the L1/L2 tables, and only a repair that leaves no corruption
clears the bit (qcow2_mark_clean, last); otherwise the open fails.  Images that the open
refuses anyway (corrupt bit, unknown or unsupported features) are left untouched for the
driver to refuse with its own reason.
"""

from __future__ import annotations

from .._errors import CorruptImageError, PyimagoError
from .._storage import Storage
from .constants import QCOW2_INCOMPAT_DIRTY, V2_HEADER_LENGTH
from .features import check_features
from .header import parse_header

__all__ = ["repair_if_dirty"]


def repair_if_dirty(storage: Storage) -> bool:
    """Repair the refcounts of a dirty v3 image about to be opened writable, and clear its
    dirty bit; whether there was anything to do."""
    header = parse_header(storage.read(0, V2_HEADER_LENGTH + 40))
    if header.version < 3 or not header.incompatible_features & QCOW2_INCOMPAT_DIRTY:
        return False
    try:
        check_features(header, {}, writable=True)
    except PyimagoError:
        return False  # refused by the open, with its reason
    from .check import check_image  # check.py opens images through the driver

    result = check_image(storage, str(storage), "all")
    if result.check_errors or result.corruptions:
        problems = "; ".join(str(p) for p in result.problems[:3])
        raise CorruptImageError(
            f"qcow2 {storage}: could not repair the dirty image ({result.corruptions} "
            f"corruption(s), {result.check_errors} check error(s) remain: {problems})"
        )
    return True

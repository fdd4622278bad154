"""What the two layers of pyimago.fast (qcow2, raw) have in common.

A layer is one image in one storage.  It is not a ``FormatDriver`` for someone else's
``FormatAccess``: pyimago.fast's own ``FormatAccess`` drives it through run-based calls
(``map_run``, ``readinto``, ``write``, ``clear``) and lets the layer do zeroing and
discarding natively, in one pass over its own metadata.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, ClassVar

from pyimago.reference._errors import ReadOnlyError
from pyimago.reference._storage import Storage

if TYPE_CHECKING:
    from ._access import FormatAccess

__all__ = ["Clear", "LayerBase"]


class Clear(enum.Enum):
    """What a clearing request leaves behind; the value names the public call."""

    #: Reads zero; every host allocation stays (qcow2 v3: zero flag, host cluster kept).
    ZERO_KEEP = "write_zeroes"
    #: Reads zero; whole clusters give their host allocation back.
    ZERO_FREE = "discard_to_zero"
    #: Contents unspecified afterwards.
    ANY = "discard_to_any"
    #: Whole clusters show the backing image again; partial ones are left as they are.
    BACKING = "discard_to_backing"


class LayerBase:
    """Storage, writability, backing and lifetime of one image layer."""

    pyimago_fast_layer: ClassVar[bool] = True
    format_name: ClassVar[str] = "?"

    def __init__(self, storage: Storage, writable: bool) -> None:
        if writable and not storage.writable:
            raise ReadOnlyError(
                f"{self.format_name} image in {storage}: the storage is read-only, "
                "so the image cannot be opened writable"
            )
        self.storage = storage
        #: Where stored guest data is read (a qcow2 image's external data file may differ).
        self.data = storage
        self.writable = writable
        self.backing: FormatAccess | None = None
        self.closed = False

    def __str__(self) -> str:
        return f"{self.format_name}:{self.storage}"

    def refuse_read_only(self, op: str) -> None:
        if not self.writable:
            raise ReadOnlyError(f"{op}: {self} is open read-only")

    def storage_dependencies(self) -> list[Storage]:
        """This layer's storage and, below it, those of the backing chain."""
        found = [self.storage]
        if self.backing is not None:
            found.extend(self.backing.driver.storage_dependencies())
        return found

    def sync(self) -> None:
        self.storage.sync()

    def detach(self) -> None:
        """Mark closed without closing the storage (its owner closes it)."""
        self.closed = True

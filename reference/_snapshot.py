"""Contract type for internal snapshots (shared by every implementation)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SnapshotInfo"]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One internal snapshot of a qcow2 image, as ``qemu-img snapshot -l`` and ``qemu-img
    info`` list it (``SnapshotInfo`` in QAPI, plus the snapshot's disk size).

    ``date_sec``/``date_nsec``: when it was taken (seconds since the Epoch, nanoseconds);
    ``vm_clock_nsec``: how long the guest had run; ``vm_state_size``: bytes of saved VM state
    (0 without); ``disk_size``: the virtual disk size of the snapshot; ``icount``: the
    record/replay instruction count, or None where the entry has no such field or it is -1.
    """

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int
    icount: int | None

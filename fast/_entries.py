"""Bits of qcow2 L1, L2 and refcount-table entries (QEMU's names in comments)."""

from __future__ import annotations

__all__ = [
    "COMPRESSED",
    "COPIED",
    "HOST_MASK",
    "L1_RESERVED",
    "L2_RESERVED",
    "REFT_OFFSET_MASK",
    "REFT_RESERVED",
    "ZERO_FLAG",
]

#: QCOW_OFLAG_COPIED: the cluster's refcount is exactly 1 (it may be written in place).
COPIED = 1 << 63
#: QCOW_OFLAG_COMPRESSED
COMPRESSED = 1 << 62
#: QCOW_OFLAG_ZERO
ZERO_FLAG = 1
#: L1E_OFFSET_MASK / L2E_OFFSET_MASK
HOST_MASK = 0x00FFFFFFFFFFFE00
#: L2E_STD_RESERVED_MASK (bits 1-8, 56-61) and L1E_RESERVED_MASK (bits 0-8, 56-62).
L2_RESERVED = 0x3F000000000001FE
L1_RESERVED = 0x7F000000000001FF
#: REFT_OFFSET_MASK (bits 9-63) and REFT_RESERVED_MASK (bits 0-8).
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED = 0x1FF

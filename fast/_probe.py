"""Which format QEMU would take a first sector for, and the check raw layers make with it.

A raw image whose format was probed (opened without ``format=``) must not be written into a
shape another driver claims: QEMU refuses such a block-0 write with EPERM (clause
``raw.probed.block0``).  The recognisers mirror QEMU's ``*_probe`` functions; raw itself
scores lowest, so any recogniser that matches means "another format".
"""

from __future__ import annotations

import re
import struct
from typing import Final

from pyimago.reference._errors import ProbedRawWriteError

__all__ = ["SECTOR", "claimed_by", "refuse_block0_change"]

#: BLOCK_PROBE_BUF_SIZE in QEMU's block.c.
SECTOR: Final = 512

_CLOOP: Final = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)
# vmdk_probe's text descriptor: comment lines and space-only lines may come first, then the
# first other line must be "version=1", "=2" or "=3".
_VMDK_TEXT: Final = re.compile(rb"(?:#[^\n]*(?:\n|\Z)| +\r?\n)*version=[123]\r?\n")
_MAGICS: Final = (
    (b"QED\0", "qed"),
    (b"conectix", "vpc"),
    (b"vhdxfile", "vhdx"),
    (b"COWD", "vmdk"),
    (b"KDMV", "vmdk"),
)


def claimed_by(sector: bytes) -> str | None:
    """The non-raw format QEMU's probing assigns to these first bytes, or None (raw)."""
    buf = sector[:SECTOR].ljust(SECTOR, b"\0")
    magic, version = struct.unpack_from(">II", buf)
    if magic == 0x514649FB and version >= 1:
        return "qcow" if version == 1 else "qcow2"
    for prefix, name in _MAGICS:
        if buf.startswith(prefix):
            return name
    if struct.unpack_from("<I", buf, 0x40)[0] == 0xBEDA107F:
        return "vdi"
    if _VMDK_TEXT.match(buf):
        return "vmdk"
    if (buf.startswith(b"Bochs Virtual HD Image\0") and buf[32:40] == b"Redolog\0"
            and buf[48:56] == b"Growing\0" and buf[64:68] in (b"\0\0\2\0", b"\0\0\1\0")):
        return "bochs"
    if buf.startswith(_CLOOP):
        return "cloop"
    if buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") and buf[16:20] == b"\2\0\0\0":
        return "parallels"
    if buf.startswith(b"LUKS\xba\xbe\0\1"):
        return "luks"
    return None


def refuse_block0_change(current: bytes, offset: int, new: bytes | None, length: int,
                         where: object) -> None:
    """Raise ProbedRawWriteError if changing ``[offset, offset+length)`` of the sector
    ``current`` to ``new`` (zeroes if None) makes it probe as another format."""
    end = min(SECTOR, offset + length)
    if offset >= end:
        return
    head = bytearray(current[:SECTOR].ljust(SECTOR, b"\0"))
    head[offset:end] = new[: end - offset] if new is not None else bytes(end - offset)
    other = claimed_by(bytes(head))
    if other is not None:
        raise ProbedRawWriteError(
            f"{where}: block 0 would then probe as {other}; writes that change the format of "
            "an image opened without format= are refused (format='raw' allows them)",
            probed_as=other,
        )

"""Format probing as QEMU does it, and the block-0 guard of probed raw images.

QEMU picks the format of an image opened without one by asking every format driver to score
the first 512 bytes (``bdrv_probe_all``); raw scores 1, the lowest, so an image is raw only if
no other driver claims it.  A guest that can write those bytes could make its "raw" disk probe
as, say, qcow2 naming a host file as its backing file.  QEMU's raw driver therefore refuses, on
an image whose format was probed, a write to block 0 after which the sector would probe as
another format (``raw_co_pwritev``: ``drv = bdrv_probe_all(buf, 512, NULL); if (drv !=
bs->drv) { ret = -EPERM; ...}``).  Clause ``raw.probed.block0`` in specs/raw.toml.

The probe functions below follow QEMU's drivers (block/*.c, ``*_probe``) one by one; only the
score matters here, and every score above raw's 1 means "another format".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

from ._errors import ProbedRawWriteError
from ._prealloc import PreallocateMode
from ._storage import Buffer, Storage, WritableBuffer

__all__ = [
    "PROBE_BYTES",
    "ProbedRawGuard",
    "probe_sector",
]

#: QEMU's ``BLOCK_PROBE_BUF_SIZE``: how many leading bytes probing looks at.
PROBE_BYTES: Final = 512


def _be32(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at : at + 4], "big")


def _le32(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at : at + 4], "little")


def _cstr(buf: bytes, at: int, size: int) -> bytes:
    """A NUL-terminated C string field (as ``strcmp`` sees it; unterminated = no match)."""
    field = buf[at : at + size]
    end = field.find(b"\0")
    return field[:end] if end >= 0 else field + b"?"


def _qcow2(buf: bytes) -> bool:
    # block/qcow2.c qcow2_probe: magic QFI\xfb and version >= 2.
    return _be32(buf, 0) == 0x514649FB and _be32(buf, 4) >= 2


def _qcow(buf: bytes) -> bool:
    # block/qcow.c qcow_probe: magic QFI\xfb and version == 1.
    return _be32(buf, 0) == 0x514649FB and _be32(buf, 4) == 1


def _qed(buf: bytes) -> bool:
    # block/qed.c bdrv_qed_probe: little-endian magic "QED\0".
    return buf[:4] == b"QED\0"


def _vdi(buf: bytes) -> bool:
    # block/vdi.c vdi_probe: signature 0xbeda107f after the 64-byte text field.
    return _le32(buf, 64) == 0xBEDA107F


def _vpc(buf: bytes) -> bool:
    # block/vpc.c vpc_probe: footer cookie "conectix" (a copy of it starts dynamic images).
    return buf[:8] == b"conectix"


def _vhdx(buf: bytes) -> bool:
    # block/vhdx.c vhdx_probe: file identifier signature "vhdxfile".
    return buf[:8] == b"vhdxfile"


def _vmdk(buf: bytes) -> bool:
    # block/vmdk.c vmdk_probe: sparse magics "COWD"/"KDMV", or a text descriptor whose first
    # line that is neither a comment nor blank is "version=1|2|3".
    if buf[:4] in (b"COWD", b"KDMV"):
        return True
    p, end = 0, len(buf)
    while p < end:
        if buf[p : p + 1] == b"#":
            nl = buf.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if buf[p : p + 1] == b" ":
            while p < end and buf[p : p + 1] == b" ":
                p += 1
            if buf[p : p + 1] == b"\r":
                p += 1
            if p == end or buf[p : p + 1] != b"\n":
                return False
            p += 1
            continue
        return any(buf.startswith(b"version=%d%s" % (v, eol), p)
                   for v in (1, 2, 3) for eol in (b"\n", b"\r\n"))
    return False


def _bochs(buf: bytes) -> bool:
    # block/bochs.c bochs_probe: three C strings and a version.
    return (
        _cstr(buf, 0, 32) == b"Bochs Virtual HD Image"
        and _cstr(buf, 32, 16) == b"Redolog"
        and _cstr(buf, 48, 16) == b"Growing"
        and _le32(buf, 64) in (0x00020000, 0x00010000)
    )


_CLOOP_MAGIC: Final = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


def _cloop(buf: bytes) -> bool:
    # block/cloop.c cloop_probe: the V2.0 shell-script preamble (score 2).
    return buf[: len(_CLOOP_MAGIC)] == _CLOOP_MAGIC


def _parallels(buf: bytes) -> bool:
    # block/parallels.c parallels_probe: one of two magics and version 2.
    return buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") and _le32(buf, 16) == 2


def _luks(buf: bytes) -> bool:
    # crypto/block-luks.c qcrypto_block_luks_has_format: magic and version 1.
    return buf[:6] == b"LUKS\xba\xbe" and int.from_bytes(buf[6:8], "big") == 1


#: QEMU's probing drivers, as data: (format name, does this sector claim it).  ``dmg``
#: probes by file name only and is left out: renaming is not a write to block 0.
PROBES: Final[tuple[tuple[str, Callable[[bytes], bool]], ...]] = (
    ("qcow2", _qcow2),
    ("qcow", _qcow),
    ("qed", _qed),
    ("vdi", _vdi),
    ("vpc", _vpc),
    ("vhdx", _vhdx),
    ("vmdk", _vmdk),
    ("bochs", _bochs),
    ("cloop", _cloop),
    ("parallels", _parallels),
    ("luks", _luks),
)


def probe_sector(sector: bytes) -> str:
    """The format QEMU would probe ``sector`` (an image's first bytes) as; "raw" if none."""
    buf = bytes(sector[:PROBE_BYTES]).ljust(PROBE_BYTES, b"\0")
    for name, claims in PROBES:
        if claims(buf):
            return name
    return "raw"


class ProbedRawGuard:
    """A raw image's storage seen through the block-0 guard (clause ``raw.probed.block0``).

    Every call passes through to ``storage``; a write, zeroing or discard that touches the
    first 512 bytes is first applied to a copy of that sector and refused with
    :class:`ProbedRawWriteError` if the copy would probe as another format.
    """

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        # Check and change of block 0 happen as one step: two writers could otherwise each
        # pass the check with half of a header.
        self._block0 = threading.Lock()

    def __str__(self) -> str:
        return str(self._storage)

    @property
    def inner(self) -> Storage:
        """The storage behind the guard."""
        return self._storage

    @property
    def name(self) -> str:
        return self._storage.name

    @property
    def writable(self) -> bool:
        return self._storage.writable

    @property
    def req_align(self) -> int:
        return self._storage.req_align

    @property
    def mem_align(self) -> int:
        return self._storage.mem_align

    def check(self, offset: int, data: bytes | None, length: int) -> None:
        """Refuse the change of ``[offset, offset+length)`` (to ``data``, or to zeroes when
        ``data`` is None) if block 0 would then probe as another format."""
        if offset >= PROBE_BYTES or length == 0:
            return
        sector = bytearray(self._storage.read(0, PROBE_BYTES))
        end = min(PROBE_BYTES, offset + length)
        sector[offset:end] = data[: end - offset] if data is not None else bytes(end - offset)
        found = probe_sector(bytes(sector))
        if found != "raw":
            # raw.probed.block0: "if (drv != bs->drv) { ret = -EPERM;"
            raise ProbedRawWriteError(
                f"{self._storage}: refusing to change block 0 of a raw image opened without "
                f"format=: the first sector would then probe as {found} (open it with "
                "format='raw' to allow this)",
                probed_as=found,
            )

    def size(self) -> int:
        return self._storage.size()

    def readinto(self, buf: WritableBuffer, offset: int) -> None:
        self._storage.readinto(buf, offset)

    def read(self, offset: int, length: int) -> bytes:
        return self._storage.read(offset, length)

    def write(self, data: Buffer, offset: int) -> None:
        view = memoryview(data).cast("B")
        if offset >= PROBE_BYTES:
            self._storage.write(view, offset)
            return
        # Check the very bytes that are then written (the caller could change its buffer).
        head = bytes(view[: PROBE_BYTES - offset])
        with self._block0:
            self.check(offset, head, len(view))
            self._storage.write(head, offset)
        if len(view) > len(head):
            self._storage.write(view[len(head) :], offset + len(head))

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._block0:
            self.check(offset, None, length)
            self._storage.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        # A discarded range may read as zeroes afterwards: judge the zeroed sector.
        with self._block0:
            self.check(offset, None, length)
            self._storage.discard(offset, length)

    def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        self._storage.resize(new_size, prealloc)

    def flush(self) -> None:
        self._storage.flush()

    def sync(self) -> None:
        self._storage.sync()

    def invalidate_cache(self) -> None:
        self._storage.invalidate_cache()

    def close(self) -> None:
        self._storage.close()

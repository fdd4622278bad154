"""QEMU-compatible image locking: open-file-description byte-range locks on the image file.

QEMU's file driver (block/file-posix.c) says which *permissions* an open holds and which it
lets others hold by taking shared (read) OFD locks on single bytes of the image file: byte
``100 + bit`` for each permission it holds, byte ``200 + bit`` for each permission it does
*not* share with others.  Before an open goes ahead it tests, for each permission it wants,
whether someone locked the matching "unshare" byte, and for each permission it does not
share, whether someone locked the matching "permission" byte.  pyimago takes the same bytes,
so pyimago and qemu-img/qemu-io/QEMU refuse each other's conflicting opens.

Measured with qemu-io 7.2 (``qemu-io -c 'sleep N'`` in the background, ``/proc/locks``): a
writable qcow2 open locks 100, 101, 103, 201, 203; a read-only one (and every backing file)
100, 201, 203; a read-only open with force-share (``-U``) only 100.  Clauses ``storage.lock.*``
in specs/storage.toml.
"""

from __future__ import annotations

import errno
import fcntl
import struct
from dataclasses import dataclass
from typing import Final

from ._errors import ImageInUseError, InvalidRequestError, UnsupportedError

__all__ = [
    "LOCKING_MODES",
    "LOCK_PERM_BASE",
    "LOCK_SHARED_BASE",
    "PERM_CONSISTENT_READ",
    "PERM_NAMES",
    "PERM_RESIZE",
    "PERM_WRITE",
    "PERM_WRITE_UNCHANGED",
    "Permissions",
    "check_locking_options",
    "lock_image",
    "permissions_for",
]

# QEMU's BlockPermission bits (include/block/block-common.h, BLK_PERM_*).
PERM_CONSISTENT_READ: Final = 1 << 0
PERM_WRITE: Final = 1 << 1
PERM_WRITE_UNCHANGED: Final = 1 << 2
PERM_RESIZE: Final = 1 << 3
PERM_ALL: Final = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
#: The names QEMU's messages use (bdrv_perm_names).
PERM_NAMES: Final = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}

# block/file-posix.c: RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE.
LOCK_PERM_BASE: Final = 100
LOCK_SHARED_BASE: Final = 200

LOCKING_MODES: Final = ("auto", "on", "off")

_OFD_SETLK: Final = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_GETLK: Final = getattr(fcntl, "F_OFD_GETLK", None)
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK: Final = struct.Struct("hhqqi4x")
#: Errors meaning "this file system has no OFD locks" (locking="auto" then goes without).
_NO_LOCKS: Final = (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)


@dataclass(frozen=True, slots=True)
class Permissions:
    """What an open holds (``perm``) and what it lets others hold (``shared``)."""

    perm: int
    shared: int

    def lock_bytes(self) -> list[int]:
        """The bytes an open with these permissions locks, in ascending order."""
        held = [LOCK_PERM_BASE + bit for bit in range(4) if self.perm >> bit & 1]
        unshared = [LOCK_SHARED_BASE + bit for bit in range(4) if not self.shared >> bit & 1]
        return held + unshared


def permissions_for(*, writable: bool, force_share: bool) -> Permissions:
    """The permissions QEMU's qcow2 driver takes on its image file for such an open.

    Any reader needs a consistent read and shares neither write nor resize (another
    writer would change metadata under it); a writer also holds write and resize.
    force-share (read-only only) shares everything.
    """
    if force_share:
        return Permissions(PERM_CONSISTENT_READ, PERM_ALL)
    shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
    if writable:
        return Permissions(PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared)
    return Permissions(PERM_CONSISTENT_READ, shared)


def check_locking_options(locking: object, force_share: object, writable: bool) -> str:
    """Validate ``locking=`` and ``force_share=`` up front; return the locking mode."""
    if locking not in LOCKING_MODES:
        raise InvalidRequestError(f"locking must be 'auto', 'on' or 'off', not {locking!r}")
    if not isinstance(force_share, bool):
        raise InvalidRequestError(f"force_share must be a bool, not {force_share!r}")
    if force_share and writable:
        # storage.lock.options: force-share is for read-only opens only (qemu-img -U)
        raise InvalidRequestError(
            "force_share=True can only be used with read-only opens (writable=False)"
        )
    assert isinstance(locking, str)
    return locking


def _fcntl_lock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One fcntl call on one byte; returns the l_type the kernel reports back."""
    # OFD locks must be requested with l_pid = 0.
    packed = _FLOCK.pack(kind, 0, byte, 1, 0)
    result = fcntl.fcntl(fd, cmd, packed)
    assert isinstance(result, bytes)
    return int(_FLOCK.unpack(result)[0])


def _conflict(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte``."""
    assert _OFD_GETLK is not None
    # A write lock conflicts with any other lock: F_OFD_GETLK reports F_UNLCK if none.
    return _fcntl_lock(fd, _OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def lock_image(
    fd: int, path: str, *, writable: bool, locking: str, force_share: bool = False
) -> bool:
    """Take QEMU's lock bytes on ``fd`` for an open of ``path``, then test for conflicts.

    Returns whether locks were taken.  Raises :class:`ImageInUseError` if another process
    holds the image in a conflicting way (the caller closes ``fd``, which drops our locks).
    """
    mode = check_locking_options(locking, force_share, writable)
    if mode == "off":
        return False
    if _OFD_SETLK is None or _OFD_GETLK is None:
        if mode == "on":
            raise UnsupportedError("locking='on': this system has no OFD locks (F_OFD_SETLK)")
        return False
    perms = permissions_for(writable=writable, force_share=force_share)
    try:
        # QEMU's order (raw_handle_perm_lock): apply our bytes first, then check, so two
        # racing opens cannot both miss each other.
        for byte in perms.lock_bytes():
            _fcntl_lock(fd, _OFD_SETLK, fcntl.F_RDLCK, byte)
    except OSError as exc:
        if exc.errno in _NO_LOCKS and mode == "auto":
            return False
        raise UnsupportedError(f"locking={mode!r}: cannot lock {path}: {exc.strerror}") from exc
    # raw_check_lock_bytes: what we want must not be unshared by anyone ...
    for bit, name in PERM_NAMES.items():
        if perms.perm & bit and _conflict(fd, LOCK_SHARED_BASE + bit.bit_length() - 1):
            raise _in_use(path, f'failed to get "{name}" lock')
    # ... and what we do not share must not be held by anyone.
    for bit, name in PERM_NAMES.items():
        if not perms.shared & bit and _conflict(fd, LOCK_PERM_BASE + bit.bit_length() - 1):
            raise _in_use(path, f'failed to get shared "{name}" lock')
    return True


def _in_use(path: str, what: str) -> ImageInUseError:
    return ImageInUseError(
        f"{path} is in use by another process ({what}); to use it anyway, open it "
        "read-only with force_share=True (as qemu-img -U) or with locking='off'",
        filename=path,
    )

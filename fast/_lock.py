"""Image locks as QEMU's file-posix driver takes them (clauses ``storage.lock.*``).

One shared OFD lock per byte: ``100 + b`` for each permission bit ``b`` the open uses,
``200 + b`` for each one it refuses to share.  Bits (QEMU's BLK_PERM_*): 0 consistent read,
1 write, 2 write unchanged, 3 resize.  A writable open uses {0, 1, 3} and refuses {1, 3}; a
read-only open uses {0} and refuses {1, 3}; force-share uses {0} and refuses nothing.
"""

from __future__ import annotations

import errno
import fcntl
import struct
from typing import Final, NoReturn

from pyimago.reference._errors import ImageInUseError, InvalidRequestError, UnsupportedError

__all__ = ["lock_fd", "validate"]

_NAMES: Final = ("consistent read", "write", "write unchanged", "resize")
#: (bits used, bits not shared) per kind of open.
_WRITABLE: Final = ((0, 1, 3), (1, 3))
_READ_ONLY: Final = ((0,), (1, 3))
_FORCE_SHARE: Final = ((0,), ())

_SET: Final = getattr(fcntl, "F_OFD_SETLK", None)
_GET: Final = getattr(fcntl, "F_OFD_GETLK", None)
_FLOCK: Final = struct.Struct("@hhqqi4x")


def validate(locking: object, force_share: object, writable: object) -> None:
    """Refuse bad ``locking``/``force_share`` values before anything is opened."""
    if locking not in ("auto", "on", "off"):
        raise InvalidRequestError(f"locking={locking!r}: expected 'auto', 'on' or 'off'")
    if type(force_share) is not bool:
        raise InvalidRequestError(f"force_share={force_share!r}: expected a bool")
    if force_share and writable:
        raise InvalidRequestError("force_share=True needs a read-only open (writable=False)")


def _held_elsewhere(fd: int, byte: int) -> bool:
    assert _GET is not None
    got = fcntl.fcntl(fd, _GET, _FLOCK.pack(fcntl.F_WRLCK, 0, byte, 1, 0))
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)


def lock_fd(fd: int, path: str, writable: bool, locking: str, force_share: bool) -> bool:
    """Lock ``fd``'s file for this kind of open; ImageInUseError on a conflict.

    Returns whether locks are held (False with locking="off", or "auto" where the file
    system has no OFD locks).
    """
    if locking == "off":
        return False
    if _SET is None or _GET is None:
        if locking == "on":
            raise UnsupportedError(f"{path}: locking='on' needs OFD locks, which this OS lacks")
        return False
    uses, refuses = _FORCE_SHARE if force_share else _WRITABLE if writable else _READ_ONLY
    try:
        for byte in [100 + b for b in uses] + [200 + b for b in refuses]:
            fcntl.fcntl(fd, _SET, _FLOCK.pack(fcntl.F_RDLCK, 0, byte, 1, 0))
    except OSError as exc:
        if locking == "auto" and exc.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise UnsupportedError(f"{path}: cannot take image locks: {exc}") from exc
    # As QEMU checks: first what we use against others' refusals, then our refusals against
    # what others use.
    for bit in uses:
        if _held_elsewhere(fd, 200 + bit):
            _busy(path, f'"{_NAMES[bit]}" lock')
    for bit in refuses:
        if _held_elsewhere(fd, 100 + bit):
            _busy(path, f'shared "{_NAMES[bit]}" lock')
    return True


def _busy(path: str, lock: str) -> NoReturn:
    raise ImageInUseError(
        f"{path} is in use by another process: failed to get {lock} (read-only with "
        "force_share=True, as qemu-img -U, or locking='off' to open it anyway)",
        filename=path,
    )

"""pyimago.reference: a plain, obviously correct implementation of imago's FormatAccess.

It is the oracle other implementations are checked against: clarity over speed.
"""

from __future__ import annotations

from ._check import CheckProblem, CheckResult, ProblemKind, RepairMode
from ._driver import FormatDriver
from ._errors import (
    CorruptImageError,
    DriverError,
    GateDeniedError,
    ImageAccessError,
    ImageInUseError,
    ImageNotFoundError,
    InvalidRequestError,
    ProbedRawWriteError,
    PyimagoError,
    ReadOnlyError,
    UnsupportedError,
    UnsupportedFeatureError,
)
from ._info import ImageInfo, Qcow2Info, SnapshotInfo
from ._mapping import (
    EofMapping,
    IndirectMapping,
    Mapping,
    RawMapping,
    ShallowMapping,
    SpecialMapping,
    ZeroMapping,
)
from ._open import AUTO, create_image, open_image, probe_format
from ._prealloc import PreallocateMode
from ._storage import Buffer, FileStorage, MemoryStorage, Storage, WritableBuffer
from ._stream import ImageStream
from .access import MAX_REQUEST_BYTES, FormatAccess
from .backing import (
    DenyImplicitOpenGate,
    FolderImplicitOpenGate,
    ImplicitOpenGate,
    PermissiveImplicitOpenGate,
)
from .qcow2.check import check
from .qcow2.driver import Qcow2Driver
from .raw import RawDriver

__all__ = [
    "AUTO",
    "MAX_REQUEST_BYTES",
    "Buffer",
    "CheckProblem",
    "CheckResult",
    "CorruptImageError",
    "DenyImplicitOpenGate",
    "DriverError",
    "EofMapping",
    "FileStorage",
    "FolderImplicitOpenGate",
    "FormatAccess",
    "FormatDriver",
    "GateDeniedError",
    "ImageAccessError",
    "ImageInUseError",
    "ImageInfo",
    "ImageNotFoundError",
    "ImageStream",
    "ImplicitOpenGate",
    "IndirectMapping",
    "InvalidRequestError",
    "Mapping",
    "MemoryStorage",
    "PermissiveImplicitOpenGate",
    "PreallocateMode",
    "ProbedRawWriteError",
    "ProblemKind",
    "PyimagoError",
    "Qcow2Driver",
    "Qcow2Info",
    "RawDriver",
    "RawMapping",
    "ReadOnlyError",
    "RepairMode",
    "ShallowMapping",
    "SnapshotInfo",
    "SpecialMapping",
    "Storage",
    "UnsupportedError",
    "UnsupportedFeatureError",
    "WritableBuffer",
    "ZeroMapping",
    "check",
    "create_image",
    "open_image",
    "probe_format",
]

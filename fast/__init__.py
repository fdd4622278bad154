"""pyimago.fast: an independent, optimised implementation of the pyimago API.

Same public API and contract as :mod:`pyimago.reference` (``open_image``, ``create_image``,
``FormatAccess``; the error, mapping and preallocation types are the reference's), with its
own qcow2 and raw code: metadata caches of decoded arrays, coalesced mapping runs,
contiguous allocation, mmap-backed file reads and thread-pool parallel requests.

It exports every name of :mod:`pyimago.reference` but the reference's two drivers
(``Qcow2Driver``, ``RawDriver``): the contract types, gates and ``AUTO`` are the reference's
very objects; ``FileStorage`` is :class:`FastFileStorage`; ``open_image``, ``create_image``,
``probe_format`` and ``check`` (its own, as ``qemu-img check [-r]``) take the reference's
parameters under the same names (and a few more).
"""

from __future__ import annotations

from pyimago.reference._check import CheckProblem, CheckResult, ProblemKind, RepairMode
from pyimago.reference._driver import FormatDriver
from pyimago.reference._errors import (
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
from pyimago.reference._info import ImageInfo, Qcow2Info
from pyimago.reference._mapping import (
    EofMapping,
    IndirectMapping,
    Mapping,
    RawMapping,
    ShallowMapping,
    SpecialMapping,
    ZeroMapping,
)
from pyimago.reference._prealloc import PreallocateMode
from pyimago.reference._snapshot import SnapshotInfo
from pyimago.reference._storage import Buffer, MemoryStorage, Storage, WritableBuffer
from pyimago.reference._stream import ImageStream
from pyimago.reference.backing import (
    DenyImplicitOpenGate,
    FolderImplicitOpenGate,
    ImplicitOpenGate,
    PermissiveImplicitOpenGate,
)

from ._access import MAX_REQUEST_BYTES, FormatAccess
from ._check import check
from ._create import create_image
from ._open import AUTO, open_image, probe_format
from ._qcow2 import DEFAULT_CACHE_BYTES
from ._storage import FastFileStorage

#: Files as pyimago.fast opens them (the name pyimago.reference gives its own).
FileStorage = FastFileStorage

__all__ = [
    "AUTO",
    "DEFAULT_CACHE_BYTES",
    "MAX_REQUEST_BYTES",
    "Buffer",
    "CheckProblem",
    "CheckResult",
    "CorruptImageError",
    "DenyImplicitOpenGate",
    "DriverError",
    "EofMapping",
    "FastFileStorage",
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
    "Qcow2Info",
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

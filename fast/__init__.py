"""pyimago.fast: an independent, optimised implementation of the pyimago API.

Same public API and contract as :mod:`pyimago.reference` (``open_image``, ``create_image``,
``FormatAccess``; the error, mapping and preallocation types are the reference's), with its
own qcow2 and raw code: metadata caches of decoded arrays, coalesced mapping runs,
contiguous allocation, mmap-backed file reads and thread-pool parallel requests.
"""

from __future__ import annotations

from pyimago.reference._errors import (
    CorruptImageError,
    DriverError,
    GateDeniedError,
    InvalidRequestError,
    PyimagoError,
    ReadOnlyError,
    UnsupportedError,
    UnsupportedFeatureError,
)
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
from pyimago.reference._storage import MemoryStorage, Storage

from ._access import FormatAccess
from ._check import check
from ._create import create_image
from ._open import open_image
from ._qcow2 import DEFAULT_CACHE_BYTES
from ._storage import FastFileStorage

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "CorruptImageError",
    "DriverError",
    "EofMapping",
    "FastFileStorage",
    "FormatAccess",
    "GateDeniedError",
    "IndirectMapping",
    "InvalidRequestError",
    "Mapping",
    "MemoryStorage",
    "PreallocateMode",
    "PyimagoError",
    "RawMapping",
    "ReadOnlyError",
    "ShallowMapping",
    "SpecialMapping",
    "Storage",
    "UnsupportedError",
    "UnsupportedFeatureError",
    "ZeroMapping",
    "check",
    "create_image",
    "open_image",
]

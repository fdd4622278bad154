"""External data files (qcow2.txt, incompatible bit 2 and the data file name extension).

"If this bit is set, an external data file is used. Guest clusters are then stored in the
external data file. For such images, clusters in the external data file are not refcounted.
The offset field in the Standard Cluster Descriptor must match the guest offset and neither
compressed clusters nor internal snapshots are supported."
"""

from __future__ import annotations

from .._errors import CorruptImageError
from .constants import QCOW2_EXT_MAGIC_DATA_FILE
from .extensions import HeaderExtension

__all__ = ["data_file_name"]


def data_file_name(exts: list[HeaderExtension]) -> str | None:
    """The data file name the header extension records, if any.

    qcow2.txt: "External data file name string. This is used as a hint for the location of
    the external data file; if it's missing, the user has to specify the data file."
    """
    for ext in exts:
        if ext.type == QCOW2_EXT_MAGIC_DATA_FILE:
            if not ext.data:
                return None  # an empty hint is no hint
            if b"\0" in ext.data:
                raise CorruptImageError(
                    f"qcow2 data file name extension holds a NUL byte: {ext.data!r}"
                )
            return ext.data.decode("utf-8", "surrogateescape")
    return None

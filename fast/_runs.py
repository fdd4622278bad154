"""Run kinds: what a layer's ``map_run`` says a stretch of the disk is.

Small ints, compared on the hot path, never looked up; the data kinds come first so that
``kind <= K_DATA_RO`` means "stored as plain bytes".
"""

from __future__ import annotations

__all__ = ["K_COMP", "K_DATA", "K_DATA_RO", "K_EOF", "K_UNALLOC", "K_ZERO"]

#: Plain data this layer may write in place.
K_DATA = 0
#: Plain data shared with a snapshot (or in a read-only image's shared cluster).
K_DATA_RO = 1
#: Marked zero (qcow2 zero flag, with or without a host cluster).
K_ZERO = 2
#: Not in this layer: the backing shows through (or zeroes, without one).
K_UNALLOC = 3
#: A compressed cluster.
K_COMP = 4
#: Past the disk end.
K_EOF = 5

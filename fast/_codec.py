"""Bulk codecs for qcow2 tables: big-endian 64-bit tables and refcount blocks.

Tables are decoded once into ``array`` objects (native byte order) so lookups are plain
indexing; sub-byte refcounts (1, 2, 4 bits, packed LSB-first within a byte as QEMU does)
are unpacked to one byte per entry with big-integer bit operations instead of a Python loop.
"""

from __future__ import annotations

import sys
from array import array

__all__ = [
    "clear_top_bit",
    "decode_refblock",
    "decode_u64_table",
    "encode_refblock",
    "encode_u64_table",
    "refblock_typecode",
]

_SWAP = sys.byteorder == "little"


def _code_for(size: int) -> str:
    for code in ("B", "H", "I", "L", "Q"):
        if array(code).itemsize == size:
            return code
    raise AssertionError(f"no array typecode of {size} bytes")


_U64 = _code_for(8)
_CODES = {8: "B", 16: _code_for(2), 32: _code_for(4), 64: _U64}


def decode_u64_table(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian u64 entries as a native array (L1, L2 and refcount tables)."""
    arr = array(_U64)
    arr.frombytes(data)
    if _SWAP:
        arr.byteswap()
    return arr


#: Byte ``i`` with its top bit cleared: a 64-bit word's top bit is bit 7 of its most
#: significant byte.
_CLEAR_TOP = bytes(i & 0x7F for i in range(256))
#: Where a native u64's most significant byte lies.
_TOP_BYTE = 7 if _SWAP else 0


def clear_top_bit(arr: array[int], step: int = 1) -> bool:
    """Clear bit 63 of every ``step``-th entry of a native u64 array, in place, in C (a
    2 MiB L2 table has 262,144 entries); whether any was set."""
    raw = memoryview(arr).cast("B")
    tops = raw[_TOP_BYTE :: 8 * step]
    cleared = bytes(tops).translate(_CLEAR_TOP)
    if cleared == tops:
        return False
    tops[:] = cleared
    return True


def encode_u64_table(arr: array[int]) -> bytes:
    """The big-endian bytes of a native u64 array."""
    if not _SWAP:
        return arr.tobytes()
    out = array(_U64, arr)
    out.byteswap()
    return out.tobytes()


def refblock_typecode(bits: int) -> str:
    """The array typecode decoded refcount blocks of ``bits``-bit entries use."""
    return _CODES.get(bits, "B")


def decode_refblock(data: bytes | bytearray | memoryview, bits: int) -> array[int]:
    """Decode a refcount block of ``bits``-bit entries into one array element per cluster."""
    if bits >= 8:
        arr = array(_CODES[bits])
        arr.frombytes(data)
        if _SWAP and bits > 8:
            arr.byteswap()
        return arr
    per = 8 // bits
    n = len(data)
    value = int.from_bytes(data, "little")
    field_mask = int.from_bytes(bytes([(1 << bits) - 1]) * n, "little")
    out = bytearray(n * per)
    for k in range(per):
        # Field k of every byte, shifted down into the low bits of each byte.
        out[k::per] = ((value >> (k * bits)) & field_mask).to_bytes(n, "little")
    return array("B", out)


def encode_refblock(arr: array[int], bits: int) -> bytes:
    """Inverse of :func:`decode_refblock` (entries must already fit in ``bits``)."""
    if bits >= 8:
        if _SWAP and bits > 8:
            out = array(arr.typecode, arr)
            out.byteswap()
            return out.tobytes()
        return arr.tobytes()
    per = 8 // bits
    raw = arr.tobytes()
    n = len(raw) // per
    acc = 0
    for k in range(per):
        acc |= int.from_bytes(raw[k::per], "little") << (k * bits)
    return acc.to_bytes(n, "little")

"""Mutants of the chunkmap sample driver (examples/chunkmap.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import chunkmap
from chunkmap import ChunkMapDriver
from pyimago.oracle import DriverTarget
from pyimago.reference import FormatAccess, PreallocateMode


class FlushDoesNotPersist(ChunkMapDriver):
    """flush writes nothing back: the cached map is lost on close."""

    def flush(self) -> None:
        self._storage.flush()


class NoCopyOnWrite(ChunkMapDriver):
    """A partial write to an unallocated chunk starts from zeroes, not the backing's data."""

    def _chunk_content(self, index: int, entry: int) -> bytes:
        return bytes(self._chunk)


class ResizeIgnoresPrealloc(ChunkMapDriver):
    """A grow ignores the preallocation mode: the backing shows in the new area."""

    def resize_grow(self, new_size: int, prealloc: PreallocateMode) -> None:
        super().resize_grow(new_size, PreallocateMode.NONE)


class DiscardToBackingZeroes(ChunkMapDriver):
    """discard_to_backing marks chunks as zeroes: the backing never shows again."""

    def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        return self.discard_to_zero(offset, length)


def chunkmap_mutant_target(name: str, driver: type[ChunkMapDriver]) -> DriverTarget:
    """chunkmap's own target, with every chunkmap driver of the chain turned into ``driver``."""

    def open_mutant(location: Any, **kwargs: Any) -> FormatAccess:
        opened = chunkmap.open_image(location, **kwargs)
        layer: Any = opened
        while isinstance(layer, FormatAccess) and type(layer.driver) is ChunkMapDriver:
            layer.driver.__class__ = driver
            layer = layer.driver.backing
        return opened

    return dataclasses.replace(chunkmap.target(), name=f"mutant:{name}", open_image=open_mutant)

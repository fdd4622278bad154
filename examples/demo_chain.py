"""Demo: create a qcow2 chain, write through it, read it back and print its mappings."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from pyimago.reference import PreallocateMode, create_image, open_image


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pyimago-demo-") as tmp:
        folder = Path(tmp)
        create_image(folder / "base.raw", 4 << 20, format="raw")
        with open_image(folder / "base.raw", writable=True) as base:
            base.write(b"B" * (1 << 20), 0)
        create_image(folder / "mid.qcow2", 4 << 20, cluster_size=65536,
                     backing_file="base.raw", backing_fmt="raw")
        create_image(folder / "top.qcow2", 8 << 20, cluster_size=4096,
                     backing_file="mid.qcow2", backing_fmt="qcow2")
        with open_image(folder / "top.qcow2", writable=True) as top:
            top.write(b"T" * 10000, 500_000)
            top.write_zeroes(0, 65536)
            top.resize(12 << 20, PreallocateMode.ZERO)
            print(f"{top}: {top.size} bytes")
            print(f"read(499_990, 20) = {top.read(499_990, 20)!r}")
            offset = 0
            while offset < top.size:
                mapping, length = top.get_mapping(offset, top.size - offset)
                print(f"  0x{offset:08x} +0x{length:08x}  {mapping}")
                offset += length
    return 0


if __name__ == "__main__":
    sys.exit(main())

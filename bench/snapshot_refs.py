"""What pyimago.fast's snapshot operations spend on counting references (a quick script).

A 1 GiB qcow2 image (64 KiB clusters by default) with every cluster written and two
snapshots (a quarter of the clusters copied on write between them): the memory the reference
tally of the active L1 table keeps, per guest cluster, its time, and the best of five
create / apply / delete snapshot operations.  The image lives in a temporary folder.

    .venv/bin/python bench/snapshot_refs.py [cluster_size]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

from pyimago import fast
from pyimago.fast import _snapshot_write
from pyimago.fast._qcow2 import Qcow2Layer

GiB = 1 << 30


def main(cluster_size: int) -> None:
    folder = tempfile.mkdtemp(prefix="pyimago-snapshot-refs-")
    try:
        path = os.path.join(folder, "a.qcow2")
        fast.create_image(path, GiB, cluster_size=cluster_size)
        chunk = b"\x5a" * 4096
        with fast.open_image(path, writable=True) as img:
            for off in range(0, GiB, cluster_size):
                img.write(chunk, off)
            img.create_snapshot("s1")
            for off in range(0, GiB, 4 * cluster_size):
                img.write(chunk, off)
            img.create_snapshot("s2")
        clusters = GiB // cluster_size
        with fast.open_image(path, writable=True) as img:
            layer = img.driver
            assert isinstance(layer, Qcow2Layer)
            tables = _snapshot_write._tables(layer, layer._l1)
            tracemalloc.start()
            tally = _snapshot_write._references(layer, layer._l1, tables)
            kept, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            del tally
            start = time.perf_counter()
            for _ in range(5):
                _snapshot_write._references(layer, layer._l1, tables)
            walk = (time.perf_counter() - start) / 5
            print(f"{clusters} clusters of {cluster_size} bytes: the tally keeps {kept} bytes "
                  f"({kept / clusters:.1f} per cluster, peak {peak}); walk {walk * 1e3:.1f} ms")
            best: dict[str, float] = {}
            for i in range(5):
                for op, key in (("create_snapshot", f"x{i}"), ("apply_snapshot", "s1"),
                                ("delete_snapshot", f"x{i}")):
                    start = time.perf_counter()
                    getattr(img, op)(key)
                    took = time.perf_counter() - start
                    best[op] = min(best.get(op, took), took)
            print("best of 5: " + ", ".join(f"{op} {t * 1e3:.1f} ms" for op, t in best.items()))
        check = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True,
                               check=False)
        print(f"qemu-img check: exit {check.returncode}")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 65536)

"""Power cuts while pyimago.fast writes images with extended L2 entries or a data file.

The write-back order (specs/crash.toml) must cover the subcluster bitmaps: every cut state
after any single storage write passes ``qemu-img check`` (leaks at most), and every 512-byte
sector reads either its durable value or one a later operation gave it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyimago import fast
from pyimago.fast import MemoryStorage
from pyimago.oracle.crash import RecordingStorage
from pyimago_tests_qemu import every_cut

pytestmark = pytest.mark.usefixtures("needs_qemu")

KiB = 1024


def _sectors_ok(content: bytes, old: bytes, new: bytes, what: str) -> None:
    for s in range(0, len(content), 512):
        assert content[s : s + 512] in (old[s : s + 512], new[s : s + 512]), (what, s)


def _every_cut(
    rec: RecordingStorage, tmp_path: Path, old: bytes, new: bytes,
    backing: fast.FormatAccess | None = None, data: MemoryStorage | None = None,
) -> int:
    data_bytes = bytes(data.read(0, data.size())) if data is not None else None
    for k, state in every_cut(rec, data_file=data_bytes):
        kwargs: dict[str, object] = {"backing": backing}
        if data is not None:
            kwargs["data_file"] = MemoryStorage(data_bytes or b"")
        with fast.open_image(MemoryStorage(state), format="qcow2", **kwargs) as img:
            _sectors_ok(bytes(img.read(0, img.size)), old, new, f"cut after mutation {k}")
    return rec.mutations


@pytest.mark.clause("crash.order.data-before-entry", "crash.order.refcount-before-reference",
                    "crash.power-cut", "qcow2.extended-l2.write")
def test_extended_l2_cow_and_zeroing_survive_every_cut(tmp_path: Path) -> None:
    size = 256 * KiB
    base_store = MemoryStorage()
    fast.create_image(base_store, size, format="raw")
    with fast.open_image(base_store, writable=True, format="raw") as b:
        b.write(b"\xab" * size, 0)
    backing = fast.open_image(base_store, format="raw")
    store = MemoryStorage()
    fast.create_image(store, size, extended_l2=True, cluster_size=16 * KiB,
                      backing_file="base", backing_fmt="raw")
    with fast.open_image(store, writable=True, format="qcow2", backing=backing) as img:
        img.write(b"\x01" * 5000, 1000)
        img.write_zeroes(40 * KiB, 20 * KiB)
        old = bytes(img.read(0, size))
    rec = RecordingStorage(store)
    img = fast.open_image(rec, writable=True, format="qcow2", backing=backing)
    img.write(b"\x02" * 700, 3000)  # in place, a partial unallocated subcluster copied
    img.write(b"\x03" * 3000, 41 * KiB + 100)  # into zero subclusters kept in place
    img.write(b"\x04" * 20000, 100 * KiB + 77)  # new clusters, copy-on-write from the backing
    img.discard_to_backing(16 * KiB, 16 * KiB)
    img.discard_to_zero(1536, 1024)  # whole subcluster 3 of cluster 0 (512-byte subclusters)
    new = bytes(img.read(0, size))
    img.flush()
    assert _every_cut(rec, tmp_path, old, new, backing) >= 5
    img.close()


@pytest.mark.clause("crash.order.data-before-entry", "crash.power-cut", "qcow2.data-file.write")
@pytest.mark.parametrize("raw", [False, True])
def test_data_file_writes_survive_every_cut_of_the_image_file(tmp_path: Path, raw: bool) -> None:
    """The data file is written before the image file's tables that map it, so any cut of
    the image file (the data file complete) reads old or new sectors."""
    size = 64 * KiB
    dpath = str(tmp_path / "unused.data")
    fast.create_image(tmp_path / "img.qcow2", size, data_file=dpath, data_file_raw=raw,
                      cluster_size=4096)
    store = MemoryStorage((tmp_path / "img.qcow2").read_bytes())
    data = MemoryStorage(Path(dpath).read_bytes())
    with fast.open_image(store, writable=True, format="qcow2", data_file=data) as img:
        img.write(b"\x05" * 9000, 0)
        old = bytes(img.read(0, size))
    rec = RecordingStorage(store)
    img = fast.open_image(rec, writable=True, format="qcow2", data_file=data)
    img.write(b"\x06" * 5000, 6000)
    img.write_zeroes(20 * KiB, 8 * KiB)
    img.discard_to_zero(0, 4096)
    new = bytes(img.read(0, size))
    img.flush()
    assert _every_cut(rec, tmp_path, old, new, data=data) >= 1
    img.close()

"""Fixtures for the image-tool tests: qemu-img, the QEMU-made corpus and the peer images.

Tests that need qemu-img skip with a loud reason where it is missing, except under
``CI=true``, where its absence fails them (CI must not go green without the peer).
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyimago_tests_qemu as _qemu  # tests/fixtures/qemu.py, registered by tests/conftest.py
import pytest

# The qemu-img helpers the tool tests import from here (one copy, in tests/fixtures/qemu.py).
assert_qemu_check_clean = _qemu.assert_qemu_check_clean
qemu_img = _qemu.qemu_img
qemu_json = _qemu.qemu_json

PEER_IMAGES = _qemu.peer_images_folder()
IMPLS = ("fast", "reference")
#: qemu-img create -o sets of the qcow2 features of issue 13 (for create and info tests; an
#: external data file is named img.data, beside an image named img.qcow2).
QCOW2_FEATURES = [
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k,preallocation=metadata",
    "lazy_refcounts=on,refcount_bits=1",
    "data_file=img.data",
    "data_file=img.data,data_file_raw=on",
    "data_file=img.data,extended_l2=on,compression_type=zstd",
    "compat=0.10",
]


def require_qemu() -> None:
    """Skip (or fail under CI=true) when qemu-img / qemu-io are missing."""
    _qemu.require_qemu("pyimago.tools")


@pytest.fixture(scope="session")
def qemu_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Every image of the QEMU-made corpus (built once per worker), as ImageSpecs."""
    require_qemu()
    folder = tmp_path_factory.mktemp("tools-corpus")
    return list(_qemu.corpus_builder()(folder))


def peer_image_files() -> list[Path]:
    """The peer images as stored (``.gz`` ones still compressed); empty when absent."""
    if not (PEER_IMAGES / "MANIFEST.md").is_file():
        return []
    found = [p for p in sorted(PEER_IMAGES.rglob("*")) if p.is_file() and p.name != "MANIFEST.md"]
    return [p for p in found if not p.name.startswith("data-file.bin")]


@pytest.fixture(scope="session")
def peer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the peer images, decompressed (skips when the folder is absent)."""
    if not peer_image_files():
        pytest.skip(f"peer images not found at {PEER_IMAGES} (see its MANIFEST.md)")
    out = tmp_path_factory.mktemp("peer-images")
    for src in sorted(PEER_IMAGES.rglob("*")):
        if not src.is_file() or src.name == "MANIFEST.md":
            continue
        dest = out / src.relative_to(PEER_IMAGES)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as fin, open(dest.with_suffix(""), "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(src, dest)
    return out


def peer_names() -> list[str]:
    """Relative names of the peer images, decompressed names (for parametrizing)."""
    names = []
    for p in peer_image_files():
        rel = p.relative_to(PEER_IMAGES)
        names.append(str(rel.with_suffix("") if rel.suffix == ".gz" else rel))
    return names or ["(absent)"]


def _locked(image: Path) -> bool:
    """Whether a writable QEMU open holds its lock bytes on ``image``: 100, 101, 103, 201,
    203 (see reference/locking.py), five OFD locks."""
    inode = f":{image.stat().st_ino}"
    held: set[int] = set()
    with open("/proc/locks", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            # "5: OFDLCK ADVISORY READ -1 fe:00:2794959 100 101" (adjacent bytes merge)
            if "OFDLCK" in fields and len(fields) >= 3 and fields[-3].endswith(inode):
                held.update(range(int(fields[-2]), int(fields[-1]) + 1))
    return held >= {100, 101, 103, 201, 203}


@contextmanager
def held_by_qemu_io(image: Path) -> Iterator[None]:
    """``image`` held open read-write by a qemu-io process (interactive, waiting on its
    stdin) until the block ends: its image locks are QEMU's own."""
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if holder.poll() is not None:
                err = holder.stderr.read() if holder.stderr else b""
                pytest.fail(f"qemu-io exited {holder.returncode} before it locked {image}: "
                            f"{err!r}")
            # Watched in /proc/locks: a probe that opens the image (qemu-img info) would
            # itself hold a lock that makes qemu-io's writable open fail.
            if _locked(image):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"qemu-io did not lock {image}")
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(timeout=30)

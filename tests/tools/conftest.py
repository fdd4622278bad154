"""Fixtures for the image-tool tests: qemu-img, the QEMU-made corpus and the peer images.

Tests that need qemu-img skip with a loud reason where it is missing, except under
``CI=true``, where its absence fails them (CI must not go green without the peer).
"""

from __future__ import annotations

import gzip
import shutil
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

"""Fixtures for the image-tool tests: qemu-img, the QEMU-made corpus and the peer images.

Tests that need qemu-img skip with a loud reason where it is missing, except under
``CI=true``, where its absence fails them (CI must not go green without the peer).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import runpy
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parent.parent
_CORPUS_SCRIPT = _ROOT / "fixtures" / "make_qemu_images.py"
PEER_IMAGES = Path(os.environ.get("PYIMAGO_PEER_IMAGES", "/work/shared/peer-images"))
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
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if not missing:
        return
    reason = f"QEMU INTEROP NOT TESTED for pyimago.tools: {', '.join(missing)} missing"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason}; CI=true requires them", pytrace=False)
    pytest.skip(reason)


def qemu_img(*args: object, ok: Sequence[int] = (0,), cwd: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; the test fails on an exit status outside ``ok``."""
    cmd = ["qemu-img", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          cwd=cwd)
    if proc.returncode not in ok:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc


def qemu_json(*args: object, cwd: Path | None = None) -> Any:
    return json.loads(qemu_img(*args, "--output=json", cwd=cwd).stdout)


def assert_qemu_check_clean(path: Path | str, fmt: str = "qcow2") -> None:
    """``qemu-img check``: no corruption, no leak, no check error."""
    proc = qemu_img("check", "--output=json", "-f", fmt, path, ok=(0, 1, 2, 3))
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    assert proc.returncode == 0, f"qemu-img check {path}: {report} {proc.stderr}"


@functools.cache
def _corpus_builder() -> Any:
    return runpy.run_path(str(_CORPUS_SCRIPT), run_name="pyimago_tools_tests_corpus")[
        "build_corpus"
    ]


@pytest.fixture(scope="session")
def qemu_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Every image of the QEMU-made corpus (built once per worker), as ImageSpecs."""
    require_qemu()
    folder = tmp_path_factory.mktemp("tools-corpus")
    return list(_corpus_builder()(folder))


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

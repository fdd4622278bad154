"""Fixtures for the pyimago.fast tests: QEMU tools and the QEMU-made image corpus.

Tests needing qemu-img skip with a loud reason where it is missing, except under
``CI=true``, where its absence fails them (CI must not go green without interop).
"""

from __future__ import annotations

import functools
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_CORPUS_SCRIPT = Path(__file__).resolve().parent.parent / "fixtures" / "make_qemu_images.py"
_CORPUS_MODULE = "pyimago_fast_tests_make_qemu_images"


def require_qemu() -> None:
    """Skip (or fail under CI=true) when qemu-img / qemu-io are missing."""
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if not missing:
        return
    reason = f"QEMU INTEROP NOT TESTED for pyimago.fast: {', '.join(missing)} missing"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason}; CI=true requires them", pytrace=False)
    pytest.skip(reason)


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; the test fails on a non-zero exit."""
    cmd = ["qemu-img", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_qemu_check_clean(path: Path | str) -> None:
    """``qemu-img check``: no errors and no leaks."""
    proc = subprocess.run(
        ["qemu-img", "check", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"qemu-img check {path}:\n{proc.stdout}\n{proc.stderr}"
    assert "No errors were found" in proc.stdout, proc.stdout
    assert "leaked" not in proc.stdout, proc.stdout


def qemu_raw_bytes(path: Path | str, tmp: Path) -> bytes:
    """The guest bytes as QEMU sees them (``qemu-img convert -O raw``)."""
    out = tmp / (Path(path).name + ".qemu.raw")
    qemu_img("convert", "-O", "raw", path, out)
    return out.read_bytes()


@functools.cache
def _corpus_builder() -> Any:
    """``build_corpus`` of tests/fixtures/make_qemu_images.py (run once per worker)."""
    return runpy.run_path(str(_CORPUS_SCRIPT), run_name=_CORPUS_MODULE)["build_corpus"]


@functools.cache
def damaged_fixtures() -> dict[str, Any]:
    """The names of tests/fixtures/damaged.py (QEMU's damaged-image cases)."""
    return vars(sys.modules["pyimago_tests_damaged"])  # registered by tests/conftest.py


@pytest.fixture(scope="session")
def qemu_corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    """Every image of the QEMU-made corpus (built once per worker)."""
    require_qemu()
    folder = tmp_path_factory.mktemp("fast-corpus")
    yield list(_corpus_builder()(folder))

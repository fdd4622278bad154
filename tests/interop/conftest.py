"""Fixtures and helpers for the QEMU interop tests.

Every test here runs the real ``qemu-img`` / ``qemu-io``.  Where they are missing the tests
skip with a loud reason -- except under ``CI=true``, where their absence is a failure: CI must
never go green without having checked interop.

The corpus of QEMU-written images (``tests/fixtures/make_qemu_images.py``) is built once per
session (once per pytest-xdist worker: each builds its own copy in its own temporary folder,
which takes a couple of seconds).  Tests that take the ``corpus_image`` fixture are
parametrized over every corpus image by name, with the image's spec clauses as marks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyimago_tests_qemu as _qemu  # tests/fixtures/qemu.py, registered by tests/conftest.py
import pytest

__all__ = [
    "QEMU_TIMEOUT",
    "Corpus",
    "QemuTools",
    "qemu_compare",
    "qemu_convert_raw",
    "qemu_convert_raw_file",
    "qemu_img",
    "qemu_img_check",
    "qemu_info",
    "qemu_io",
    "qemu_map",
    "require_qemu",
]

_corpus = _qemu.corpus_module()


# -- availability and running the tools (one copy, in tests/fixtures/qemu.py) ------------------

QEMU_TIMEOUT = _qemu.QEMU_TIMEOUT
qemu_compare = _qemu.qemu_compare
qemu_convert_raw = _qemu.qemu_convert_raw
qemu_convert_raw_file = _qemu.qemu_convert_raw_file
qemu_img = _qemu.qemu_img
qemu_img_check = _qemu.qemu_check
qemu_info = _qemu.qemu_info
qemu_io = _qemu.qemu_io
qemu_map = _qemu.qemu_map


def require_qemu() -> None:
    """Skip (outside CI) or fail (``CI=true``) when qemu-img / qemu-io are missing."""
    _qemu.require_qemu("the interop tests")


def pytest_report_header(config: pytest.Config) -> str:
    missing = [tool for tool in ("qemu-img", "qemu-io") if shutil.which(tool) is None]
    if not missing:
        return f"qemu interop: {shutil.which('qemu-img')}, {shutil.which('qemu-io')}"
    ci = os.environ.get("CI", "").strip().lower() == "true"
    return f"qemu interop: {', '.join(missing)} MISSING -- interop tests will " + (
        "FAIL (CI=true)" if ci else "SKIP")


@dataclass(frozen=True, slots=True)
class QemuTools:
    """The helpers above, handed to tests through the ``qemu`` fixture."""

    def img(self, *args: str | Path, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
        return qemu_img(*args, ok=ok)

    def io(self, path: Path, cmds: Sequence[str], fmt: str = "qcow2") -> str:
        return qemu_io(path, cmds, fmt)

    def check(self, path: Path, fmt: str = "qcow2") -> dict[str, Any]:
        return qemu_img_check(path, fmt)

    def convert_raw(self, path: Path, fmt: str | None = None) -> bytes:
        return qemu_convert_raw(path, fmt)

    def convert_raw_file(self, path: Path, out: Path, fmt: str | None = None) -> Path:
        return qemu_convert_raw_file(path, out, fmt)

    def map(self, path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
        return qemu_map(path, fmt)

    def info(self, path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
        return qemu_info(path, fmt)

    def compare(self, image: Path, expected_raw: Path, fmt: str = "qcow2") -> None:
        qemu_compare(image, expected_raw, fmt)


@dataclass(frozen=True, slots=True)
class Corpus:
    """The built corpus: images by name, and the ones this QEMU could not make (and why)."""

    images: dict[str, Any]
    skipped: dict[str, str]
    folder: Path


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qemu() -> QemuTools:
    """qemu-img / qemu-io helpers (skips or fails the test when QEMU is missing)."""
    require_qemu()
    return QemuTools()


@pytest.fixture(scope="session")
def qemu_corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """Every corpus image, built once per session (per xdist worker)."""
    require_qemu()
    folder = tmp_path_factory.mktemp("qemu-corpus")
    skipped: dict[str, str] = {}
    specs = _corpus.build_corpus(folder, skipped)
    yield Corpus({s.name: s for s in specs}, skipped, folder)


@pytest.fixture
def corpus_image(request: pytest.FixtureRequest, qemu_corpus: Corpus) -> Any:
    """One corpus image (an ``ImageSpec``), chosen by the test's parameter."""
    name: str = request.param
    if name in qemu_corpus.skipped:
        pytest.skip(f"{name}: {qemu_corpus.skipped[name]}")
    return qemu_corpus.images[name]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "corpus_image" not in metafunc.fixturenames:
        return
    params = [
        pytest.param(
            r.name,
            id=r.name,
            marks=[pytest.mark.clause(*r.clauses)] if r.clauses else [],
        )
        for r in _corpus.RECIPES
    ]
    metafunc.parametrize("corpus_image", params, indirect=True)

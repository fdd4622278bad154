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

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

__all__ = [
    "QEMU_TIMEOUT",
    "Corpus",
    "QemuTools",
    "corpus_module",
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

#: Seconds one qemu-img / qemu-io call may take.
QEMU_TIMEOUT = 60.0

_CORPUS_SCRIPT = Path(__file__).resolve().parent.parent / "fixtures" / "make_qemu_images.py"
_CORPUS_MODULE = "pyimago_tests_make_qemu_images"


def corpus_module() -> ModuleType:
    """``tests/fixtures/make_qemu_images.py``, loaded by path.

    ``tests/`` is not a package and pytest runs with ``--import-mode=importlib``, so the
    module is loaded from its file and registered under a private name.
    """
    mod = sys.modules.get(_CORPUS_MODULE)
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(_CORPUS_MODULE, _CORPUS_SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body is processed
    sys.modules[_CORPUS_MODULE] = mod
    spec.loader.exec_module(mod)
    return mod


_corpus = corpus_module()

_MAPCHECK = "pyimago_tests_interop_mapcheck"
if _MAPCHECK not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _MAPCHECK, Path(__file__).with_name("_mapcheck.py")
    )
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_MAPCHECK] = _module
    _spec.loader.exec_module(_module)


# -- availability --------------------------------------------------------------------------------


def _missing_tools() -> list[str]:
    return [tool for tool in ("qemu-img", "qemu-io") if shutil.which(tool) is None]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require_qemu() -> None:
    """Skip (outside CI) or fail (``CI=true``) when qemu-img / qemu-io are missing."""
    missing = _missing_tools()
    if not missing:
        return
    reason = (
        f"QEMU INTEROP NOT TESTED: {' and '.join(missing)} not found on PATH "
        "(install Debian's qemu-utils)"
    )
    if _in_ci():
        pytest.fail(f"{reason}; CI=true requires them", pytrace=False)
    pytest.skip(reason)


def pytest_report_header(config: pytest.Config) -> str:
    missing = _missing_tools()
    if not missing:
        return f"qemu interop: {shutil.which('qemu-img')}, {shutil.which('qemu-io')}"
    what = "FAIL (CI=true)" if _in_ci() else "SKIP"
    return f"qemu interop: {', '.join(missing)} MISSING -- interop tests will {what}"


# -- running the tools ---------------------------------------------------------------------------


def _run(
    args: Sequence[str | Path], *, ok: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    cmd = [str(a) for a in args]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=QEMU_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {QEMU_TIMEOUT}s: {' '.join(cmd)}")
    if proc.returncode not in ok:
        pytest.fail(
            f"exit {proc.returncode}: {' '.join(cmd)}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc


def qemu_img(*args: str | Path, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img ARGS`` with a timeout; fail the test on an exit status not in ``ok``."""
    return _run(["qemu-img", *args], ok=ok)


def qemu_io(path: Path, cmds: Sequence[str], fmt: str = "qcow2") -> str:
    """Run qemu-io commands on ``path`` in one process; fail the test if any command fails."""
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    args.append(path)
    out = _run(args).stdout
    # qemu-io reports failed commands on stdout and may still exit 0.
    bad = [ln for ln in out.splitlines() if "fail" in ln.lower() or "error" in ln.lower()]
    if bad:
        pytest.fail(f"qemu-io on {path}: {'; '.join(bad)}")
    return out


def qemu_img_check(path: Path, fmt: str = "qcow2") -> dict[str, Any]:
    """``qemu-img check --output=json``; asserts no corruptions, no leaks, no check errors."""
    # 2: corruptions, 3: leaks -- still a report on stdout, which we assert on for a clear message
    proc = qemu_img("check", "--output=json", "-f", fmt, path, ok=(0, 2, 3))
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"qemu-img check {path}: no JSON report\n{proc.stdout}\n{proc.stderr}")
    problems = {
        k: report.get(k, 0)
        for k in ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed")
        if report.get(k, 0)
    }
    assert not problems and proc.returncode == 0, (
        f"qemu-img check {path}: {problems}, exit {proc.returncode}\n"
        f"{json.dumps(report, indent=1)}\n{proc.stderr}"
    )
    return report


def qemu_convert_raw_file(path: Path, out: Path, fmt: str | None = None) -> Path:
    """``qemu-img convert -O raw`` into ``out`` (sparse where the image has holes)."""
    args: list[str | Path] = ["convert", "-O", "raw"]
    if fmt is not None:
        args += ["-f", fmt]
    qemu_img(*args, path, out)
    return out


def qemu_convert_raw(path: Path, fmt: str | None = None) -> bytes:
    """The guest-visible content of ``path`` as QEMU sees it."""
    with tempfile.TemporaryDirectory(prefix="pyimago-convert-") as tmp:
        out = qemu_convert_raw_file(path, Path(tmp) / "out.raw", fmt)
        return out.read_bytes()


def qemu_map(path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``: start, length, depth, present, zero, data[, offset]."""
    args: list[str | Path] = ["map", "--output=json"]
    if fmt is not None:
        args += ["-f", fmt]
    entries: list[dict[str, Any]] = json.loads(qemu_img(*args, path).stdout)
    return entries


def qemu_info(path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain --output=json``: one dict per layer, top first."""
    args: list[str | Path] = ["info", "--backing-chain", "--output=json"]
    if fmt is not None:
        args += ["-f", fmt]
    chain: list[dict[str, Any]] = json.loads(qemu_img(*args, path).stdout)
    return chain


def qemu_compare(image: Path, expected_raw: Path, fmt: str = "qcow2") -> None:
    """Assert ``qemu-img compare`` finds ``image`` identical to the raw file ``expected_raw``."""
    proc = qemu_img("compare", "-f", fmt, "-F", "raw", image, expected_raw, ok=(0, 1))
    assert proc.returncode == 0, (
        f"qemu-img compare {image} {expected_raw}: {proc.stdout.strip()} {proc.stderr.strip()}"
    )


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

"""Running CrossHair over pyimago's pure helpers (see ``_crosshair`` for the harnesses)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CONTRACT_MODULES",
    "CROSSHAIR_MISSING",
    "HARNESS_MODULE",
    "CrossHairResult",
    "run_crosshair",
]

#: The skip reason of a CrossHair check on a machine without crosshair-tool.
CROSSHAIR_MISSING = "CrossHair not installed (pip install crosshair-tool): check not run"

#: Modules whose PEP 316 contracts CrossHair checks, with the clauses they cover.
CONTRACT_MODULES: dict[str, tuple[str, ...]] = {
    "pyimago.reference.qcow2.tables": ("qcow2.l1.index", "qcow2.l2.index"),
    "pyimago.reference.qcow2.refcounts": ("qcow2.refcount.entry-width",),
}
HARNESS_MODULE = "pyimago.oracle.conformance._crosshair"


@dataclass(frozen=True, slots=True)
class CrossHairResult:
    """What one ``crosshair check`` found: its exit status, output and duration."""

    command: tuple[str, ...]
    returncode: int
    output: str
    seconds: float


def _package_tree(root: Path) -> None:
    # CrossHair walks a module's parent packages on disk; an editable install maps
    # pyimago.* onto folders of other names, so lay the packages out as installed.
    pkg = root / "pyimago"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""pyimago (CrossHair view)."""\n')
    for sub in ("reference", "fast", "oracle", "specs"):
        spec = importlib.util.find_spec(f"pyimago.{sub}")
        assert spec is not None and spec.submodule_search_locations
        (pkg / sub).symlink_to(next(iter(spec.submodule_search_locations)))


def run_crosshair(
    kind: str, modules: list[str], *, per_condition: float, timeout: float
) -> CrossHairResult:
    """Run ``crosshair check --analysis_kind=KIND`` over ``modules`` in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="pyimago-crosshair-") as tmp:
        _package_tree(Path(tmp))
        command = (
            sys.executable, "-m", "crosshair", "check", f"--analysis_kind={kind}",
            f"--per_condition_timeout={per_condition}", *modules,
        )
        env = {**os.environ, "PYTHONPATH": tmp}
        started = time.monotonic()
        try:
            proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                                  timeout=timeout, check=False)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code = -1
            output = f"crosshair did not finish within {timeout} s: {exc}"
        return CrossHairResult(command, code, output, time.monotonic() - started)

"""Set-up of the campaign tests: a deliberately broken driver importable by name, and a real
redis-server for the shared-database tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MUTANTS = ROOT / "tests" / "fuzz" / "mutants"

#: The mutant the campaign tests fuzz: a chunkmap whose flush does not persist its map
#: (caught within a few examples, no qemu-img needed).
MUTANT = "chunkmap-flush-does-not-persist"

BROKEN_MODULE = f'''
"""{MUTANT}, from the kill-rate test's mutants, as a module:attribute target."""
import importlib.util
import sys

sys.path.insert(0, {str(EXAMPLES)!r})
_NAME = "pyimago_tests_fuzz_mutants"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _NAME, {str(MUTANTS / "__init__.py")!r}, submodule_search_locations=[{str(MUTANTS)!r}]
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)

target = sys.modules[_NAME].MUTANTS[{MUTANT!r}].target
'''


@pytest.fixture
def broken_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``broken_driver:target`` importable from ``tmp_path`` (the current folder)."""
    (tmp_path / "broken_driver.py").write_text(BROKEN_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "broken_driver:target"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 (a free port), stopped at the end: its URL."""
    server = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        redis = None
    missing = []
    if server is None:
        missing.append("redis-server is not installed (Debian package redis-server; "
                       "./scripts/bootstrap installs it as root)")
    if redis is None:
        missing.append("the redis client is not installed (pip install 'pyimago[campaign]')")
    if missing:
        message = "; ".join(missing)
        if _truthy(os.environ.get("CI")):
            pytest.fail(f"{message}: the shared-database tests must run in CI")
        warnings.warn(f"SKIPPING the redis campaign tests: {message}", stacklevel=1)
        pytest.skip(f"SKIPPED LOUDLY: {message}")
    assert server is not None and redis is not None
    folder = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=20)

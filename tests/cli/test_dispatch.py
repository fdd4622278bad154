"""The ``pyimago`` dispatcher: help and version without extras, the table of subcommands,
the one-line message of a command whose extra is missing, and the installed console script."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pyimago
import pytest
from pyimago import cli

ROOT = Path(__file__).resolve().parents[2]

#: Distribution name -> import name, where they differ.
_IMPORT_NAMES = {"crosshair-tool": "crosshair"}


def test_version_is_the_distribution_s() -> None:
    from importlib import metadata

    assert pyimago.__version__ == metadata.version("pyimago")


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert re.search(rf"^  {command.name} +{re.escape(command.help)}", text, re.M), text
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"pyimago {pyimago.__version__}\n"


def test_every_entry_is_a_function_of_argv() -> None:
    for command in cli.COMMANDS:
        module, _, name = command.entry.partition(":")
        function = getattr(importlib.import_module(module), name)
        assert callable(function), command
        assert command.extra is None or command.extra in cli.EXTRAS


def test_extras_match_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra, modules in cli.EXTRAS.items():
        names = [re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]
                 for req in project["optional-dependencies"][extra]]
        assert sorted(_IMPORT_NAMES.get(n, n) for n in names) == sorted(modules)


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c.extra is not None],
                         ids=lambda c: c.name)
def test_missing_extra_is_one_line(
    command: cli.Command, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert command.extra is not None
    monkeypatch.setitem(cli.EXTRAS, command.extra, ("pyimago_no_such_module_here",))
    assert cli.main([command.name, "--help"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"pyimago {command.name}: needs the {command.extra!r} extra: pip install "
                   f"'pyimago[{command.extra}]' (missing: pyimago_no_such_module_here)\n")
    assert cli.main(["--help"]) == 0  # help still works, and says what is missing
    assert f"needs: pip install 'pyimago[{command.extra}]'" in capsys.readouterr().out


def test_internal_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def crash(argv: list[str]) -> int:
        raise KeyError("a bug of ours")

    monkeypatch.setattr(cli, "_entry", lambda command: crash)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and cli.DEBUG_ENV in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        cli.main(["run"])


def _script() -> str:
    found = shutil.which("pyimago", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.skip("the pyimago console script is not installed next to this Python")
    return found


def test_console_script_help_imports_nothing_heavy() -> None:
    # Neither --help nor --version may import an extra's module (they must work without).
    code = ("import sys; from pyimago.cli import main; main(['--help']); main(['--version']);"
            "heavy = {'hypothesis', 'pytest', 'rich'} & set(sys.modules); print(sorted(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip().endswith("[]"), proc.stdout


def test_console_script_bad_call() -> None:
    proc = subprocess.run([_script(), "run", "--examples", "0"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'0'" in proc.stderr and proc.stdout == ""
    proc = subprocess.run([_script(), "--version"], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout == f"pyimago {pyimago.__version__}\n"


def test_python_dash_m_oracle_is_the_same_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "pyimago.oracle", "--version"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout == f"pyimago {pyimago.__version__}\n"


USER_FILE = '''
import pyimago
from pyimago.fast import open_image as fast_open
from pyimago.reference import MemoryStorage, create_image, open_image

version: str = pyimago.__version__
storage = MemoryStorage()
create_image(storage, 1 << 20, format="qcow2")
with open_image(storage) as img:
    data: bytes = img.read(0, 512)
with fast_open(storage) as fimg:
    more: bytes = fimg.read(0, 512)
'''


def test_mypy_sees_the_package_in_this_environment(tmp_path: Path) -> None:
    # The README's environment (.venv, an editable install): a user's mypy must find pyimago
    # and its types (scripts/bootstrap's link tree; the wheel is checked by smoke-wheel).
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(USER_FILE)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

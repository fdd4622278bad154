"""Progress bars: rich on a terminal, nothing at all otherwise."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from pyimago.tools._cli import check_main, commit_main, rebase_main
from pyimago.tools._progress import progress

from .conftest import assert_qemu_check_clean, qemu_img


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.clause("tools.convert.content")
def test_progress_draws_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress(True, 100, "convert") as bar:
        bar.advance(100)
    assert pipe.getvalue() == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress(False, 100, "convert") as bar:
        bar.advance(100)
    assert terminal.getvalue() == ""
    with progress(True, 100, "convert") as bar:
        bar.advance(50)
        bar.advance(50)
    assert "convert" in terminal.getvalue()


@pytest.mark.qemu
@pytest.mark.clause("tools.commit.backing", "tools.rebase.backing", "tools.check.verdict")
def test_p_draws_on_a_terminal_for_commit_rebase_and_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich")
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             cwd=tmp_path)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 3M", "top.qcow2"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=60)
    monkeypatch.chdir(tmp_path)
    top = "top.qcow2"
    calls = [(commit_main, ["-p", "-d", top], "commit"),
             (rebase_main, ["-p", "-b", "", top], "rebase"),
             (check_main, ["-p", top], "check")]
    for main, argv, word in calls:
        # Not a terminal (pytest's capture): -p prints nothing more.
        assert main(argv) == 0
        assert capsys.readouterr().err == ""
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(argv) == 0
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
        assert word in terminal.getvalue(), word
    assert_qemu_check_clean(tmp_path / top)

"""Progress bars: rich on a terminal, nothing at all otherwise."""

from __future__ import annotations

import io
import sys

import pytest
from pyimago.tools._progress import progress


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

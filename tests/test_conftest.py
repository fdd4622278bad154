"""The project conftest's test order: the long tests start first, longest first."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _conftest(request: pytest.FixtureRequest) -> ModuleType:
    plugin = request.config.pluginmanager.get_plugin(str(Path(__file__).parent / "conftest.py"))
    assert isinstance(plugin, ModuleType)
    return plugin


class _Item:
    def __init__(self, name: str, *markers: Any) -> None:
        self.name, self._markers = name, markers

    def iter_markers(self, name: str) -> Any:
        return iter(self._markers if name == "slow" else ())


def test_long_tests_are_sorted_first_longest_first(request: pytest.FixtureRequest) -> None:
    conftest = _conftest(request)
    items: list[Any] = [
        _Item("short-1"),
        _Item("plain-slow", pytest.mark.slow.mark),
        _Item("short-2"),
        _Item("costly", pytest.mark.slow(cost=200).mark),
        _Item("cheap-slow", pytest.mark.slow(cost=2).mark),
        _Item("dearer-param", pytest.mark.slow(cost=2).mark, pytest.mark.slow(cost=50).mark),
    ]
    conftest.pytest_collection_modifyitems(items)
    assert [i.name for i in items] == ["costly", "dearer-param", "plain-slow", "cheap-slow",
                                     "short-1", "short-2"]


def test_this_session_runs_the_long_tests_first(request: pytest.FixtureRequest) -> None:
    cost = _conftest(request).schedule_cost
    costs = [cost(item) for item in request.session.items]
    assert costs == sorted(costs, reverse=True)

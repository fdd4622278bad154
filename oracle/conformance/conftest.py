"""Fixtures of the conformance suite: the implementation under test and its images.

``impl``: the implementation ``$PYIMAGO_CONFORMANCE_IMPL`` names (``reference`` by default).
``img``: an :class:`~pyimago.oracle.conformance._support.ImageKit` over it and ``tmp_path``.
``@pytest.mark.needs("qcow2", "backing", ...)``: the test is *not applicable* to an
implementation whose capabilities lack one of these.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pyimago.oracle.conformance._impl import (
    CAPABILITIES,
    IMPL_ENV,
    LOAD_ERROR_ENV,
    Impl,
    ImplError,
    impl_from_env,
)
from pyimago.oracle.conformance._support import ImageKit, not_applicable


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too, so --strict-markers passes wherever the suite is run from.
    config.addinivalue_line("markers", "clause(*ids): the spec clauses (specs/) this test checks")
    config.addinivalue_line(
        "markers", f"needs(*capabilities): implementation capabilities ({', '.join(CAPABILITIES)})"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # An implementation that does not load is one error, not a failure of every test: say
    # why (in the file the caller named) and stop before anything runs.  (Collection is the
    # first hook this conftest sees when the suite is named with --pyargs.)
    try:
        impl_from_env()
    except ImplError as exc:
        where = os.environ.get(LOAD_ERROR_ENV)
        if where:
            Path(where).write_text(str(exc), encoding="utf-8")
        pytest.exit(f"pyimago conformance: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_report_header(config: pytest.Config) -> str:
    try:
        impl = impl_from_env()
    except Exception as exc:
        return f"pyimago conformance: cannot load the implementation: {exc}"
    return f"pyimago conformance: {impl.name} ({IMPL_ENV}={impl.spec}), {impl.capabilities}"


@pytest.fixture(scope="session")
def impl() -> Impl:
    """The implementation under test."""
    return impl_from_env()


@pytest.fixture(autouse=True)
def _capabilities(request: pytest.FixtureRequest, impl: Impl) -> None:
    needed = [str(a) for mark in request.node.iter_markers("needs") for a in mark.args]
    missing = impl.capabilities.missing(needed)
    if missing:
        not_applicable(f"{impl.name} does not support {', '.join(missing)}")


@pytest.fixture
def img(impl: Impl, tmp_path: Path) -> ImageKit:
    """Images of the implementation under test."""
    return ImageKit(impl, tmp_path)

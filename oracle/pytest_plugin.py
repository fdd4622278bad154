"""pytest plugin: a driver's own test suite gets pyimago's whole conformance run in one line.

Installed with pyimago (a ``pytest11`` entry point), so nothing needs enabling::

    import pytest
    import my_driver

    def test_conforms(pyimago_conformance):           # the fixture
        stats = pyimago_conformance(my_driver.target())
        assert stats.op_count("discard_to_backing") > 0

    @pytest.mark.pyimago_target("my_driver:target")    # or the marker (runs before the body)
    def test_conforms_too():
        pass

Options: ``--pyimago-profile {ci,dev,deep}`` (default: ``$HYPOTHESIS_PROFILE``, ``ci`` on CI,
else ``dev``), ``--pyimago-examples N`` and ``--pyimago-database URL`` (an example database
shared by every run: a directory or ``redis://host:port/N``; its saved failures are replayed
first, new ones saved there); given on the command line, they win over what the test passes.
What each run exercised is printed in the test's output and in a "pyimago conformance"
section of the terminal summary.

The plugin is loaded by every pytest run in an environment where pyimago is installed, so it
imports nothing of the oracle (nor Hypothesis) until a test asks for a run, and does nothing
at all for suites that never do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from .fuzz import ConformanceStats, TargetLike

__all__ = [
    "pyimago_conformance",
    "pytest_addoption",
    "pytest_configure",
    "pytest_pyfunc_call",
]

MARKER: Final = "pyimago_target"
_PROPERTY: Final = "pyimago_conformance"
_PROFILES: Final = ("ci", "dev", "deep")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyimago", "pyimago driver conformance")
    group.addoption(
        "--pyimago-profile",
        choices=_PROFILES,
        default=None,
        help="Hypothesis profile of pyimago conformance runs (default: $HYPOTHESIS_PROFILE, "
             "ci on CI, else dev)",
    )
    group.addoption(
        "--pyimago-examples",
        type=int,
        default=None,
        metavar="N",
        help="examples (chains) per pyimago conformance run",
    )
    group.addoption(
        "--pyimago-database",
        default=None,
        metavar="URL",
        help="example database shared by pyimago conformance runs: a directory or "
             "redis://host:port/N (the 'campaign' extra)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(target, **options): run pyimago's driver conformance on target (a "
        "DriverTarget or 'module:attribute') before the test body; options as for "
        "pyimago.oracle.run_driver_conformance",
    )
    config.pluginmanager.register(_Summary(), "pyimago-conformance-summary")


def _run(item: pytest.Item, target: TargetLike, options: dict[str, Any]) -> ConformanceStats:
    from .fuzz import run_driver_conformance
    from .replay import DEFAULT_FAILURES_DIR

    config = item.config
    profile = config.getoption("pyimago_profile", None)
    examples = config.getoption("pyimago_examples", None)
    if profile is not None:
        options["profile"] = profile
        options.pop("settings", None)
    if examples is not None:
        options["max_examples"] = examples
    database = config.getoption("pyimago_database", None)
    if database is not None:
        options["database"] = database
    options.setdefault("failures_dir", str(config.rootpath / DEFAULT_FAILURES_DIR))
    stats = run_driver_conformance(target, **options)
    summary = stats.summary()
    print(summary)
    item.user_properties.append((_PROPERTY, summary))
    return stats


@pytest.fixture
def pyimago_conformance(request: pytest.FixtureRequest) -> Callable[..., ConformanceStats]:
    """``pyimago_conformance(target, **options)``: run the conformance, return its stats."""

    def run(target: TargetLike, **options: Any) -> ConformanceStats:
        return _run(request.node, target, options)

    return run


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    marker = pyfuncitem.get_closest_marker(MARKER)
    if marker is None:
        return
    if len(marker.args) != 1:
        raise pytest.UsageError(f"@pytest.mark.{MARKER} takes one target, got {marker.args!r}")
    failure = None
    try:
        _run(pyfuncitem, marker.args[0], dict(marker.kwargs))
    except Exception as exc:
        from ._cli_support import format_failure

        failure = format_failure(exc)
    if failure is not None:
        # The failure as the oracle reports it (Hypothesis's shrunk program, the oracle's log,
        # the replay file: the exception's notes), once, without the oracle's own frames;
        # raised outside the except block so that no "during handling" chain repeats it.
        pytest.fail(failure, pytrace=False)
    # Returning None lets pytest call the test body as usual.


class _Summary:
    """Collects the stats of conformance runs from test reports (which reach the
    controlling process under xdist too, user properties included) for the terminal."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.runs += [
                (report.nodeid, str(value))
                for name, value in report.user_properties
                if name == _PROPERTY
            ]

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.runs:
            return
        terminalreporter.section("pyimago conformance")
        for nodeid, text in self.runs:
            terminalreporter.write_line(nodeid)
            for line in text.splitlines()[1:]:
                terminalreporter.write_line(line)

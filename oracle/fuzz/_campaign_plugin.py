"""pytest plugin of ``pyimago fuzz --workers``: the campaign's option and its worker items.

Loaded by the campaign's pytest run (``-p pyimago.oracle.fuzz._campaign_plugin``), never by
a project's own test runs.  The campaign travels as JSON on the command line, so xdist hands
it to every worker, local or remote, with the rest of the options.
"""

from __future__ import annotations

import pytest

__all__ = ["pytest_addoption", "pytest_configure", "pytest_generate_tests"]

OPTION = "--pyimago-campaign"
FIXTURE = "pyimago_campaign_worker"
#: The user property a worker's final report travels in, to pytest's controlling process.
REPORT_PROPERTY = "pyimago_campaign_report"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("pyimago").addoption(
        OPTION, default=None, metavar="JSON",
        help="the campaign every worker runs (written by pyimago fuzz --workers)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption(OPTION, None) is not None and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Collector(config), "pyimago-campaign-collector")


class _Collector:
    """In pytest's controlling process: each worker's final report, from its test report
    (xdist brings those back from every worker, local or remote), into the campaign folder."""

    def __init__(self, config: pytest.Config) -> None:
        from ._campaign import CampaignSpec

        self.spec = CampaignSpec.from_json(config.getoption(OPTION))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        from ._campaign import WorkerReport, write_worker_report

        for name, value in report.user_properties:
            if name == REPORT_PROPERTY and isinstance(value, dict):
                write_worker_report(self.spec, WorkerReport.from_json(value), final=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if FIXTURE not in metafunc.fixturenames:
        return
    from ._campaign import CampaignSpec

    text = metafunc.config.getoption(OPTION)
    if text is None:
        raise pytest.UsageError(f"{OPTION} is required to run campaign workers")
    spec = CampaignSpec.from_json(text)
    # Every process collects the same items (xdist checks): they follow from the spec alone.
    metafunc.parametrize(
        FIXTURE,
        range(spec.workers),
        ids=[f"worker{w}-seed{spec.seed_of(w)}" for w in range(spec.workers)],
    )

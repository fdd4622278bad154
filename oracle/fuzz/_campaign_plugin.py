"""pytest plugin of ``pyimago fuzz --workers``: the campaign's option and its worker items.

Loaded by the campaign's pytest run (``-p pyimago.oracle.fuzz._campaign_plugin``), never by
a project's own test runs.  The campaign travels as JSON on the command line, so xdist hands
it to every worker, local or remote, with the rest of the options.
"""

from __future__ import annotations

import pytest

__all__ = ["pytest_addoption", "pytest_generate_tests"]

OPTION = "--pyimago-campaign"
FIXTURE = "pyimago_campaign_worker"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("pyimago").addoption(
        OPTION, default=None, metavar="JSON",
        help="the campaign every worker runs (written by pyimago fuzz --workers)",
    )


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

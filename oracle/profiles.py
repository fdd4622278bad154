"""Hypothesis profiles for the oracle (and the rest of the test suite).

``ci``
    Derandomised (the same examples on every run, so CI is reproducible), bounded so that the
    oracle's own test module stays well inside CI's time on two cores; no example database.
``dev``
    The default on a workstation: random, a moderate budget, the example database on so a
    failure found once is tried first next time.
``deep``
    Long campaigns: many examples and long programs, the example database kept.

The example database of ``dev`` and ``deep`` lives in ``.pyimago-failures/hypothesis`` (next
to the replay files), not in a ``.hypothesis`` folder of whatever folder a user runs from.

``load_profile_from_env`` picks ``$HYPOTHESIS_PROFILE``, else ``ci`` when ``$CI`` is true,
else ``dev``.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from ._constants import pin_local_constants

__all__ = [
    "CI_MAX_EXAMPLES",
    "CI_STEP_COUNT",
    "EXAMPLE_DATABASE_DIR",
    "PROFILES",
    "load_profile_from_env",
    "oracle_settings",
    "register_profiles",
]

#: Examples and steps per example of the ``ci`` profile.
CI_MAX_EXAMPLES = 100
CI_STEP_COUNT = 30

PROFILES = ("ci", "dev", "deep")

#: Where the dev and deep profiles keep Hypothesis's example database (relative to the
#: folder the run starts in, like the replay files' .pyimago-failures).
EXAMPLE_DATABASE_DIR = os.path.join(".pyimago-failures", "hypothesis")

# The machines build images in @initialize and check the whole disk after every step: that
# is slow by Hypothesis's standards and large by its data standards, on purpose.  Only the
# oracle's own runs (oracle_settings) turn these health checks off, not the profiles.
_SUPPRESS = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)

# Hypothesis's explain phase re-runs a failing example many times under coverage to say which
# lines only failing runs reach; for a machine that rebuilds disk images each time that can
# take minutes.  Only the long-campaign profile keeps it.
_NO_EXPLAIN = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)


def register_profiles() -> None:
    """Register the ``ci``, ``dev`` and ``deep`` profiles (idempotent), and pin Hypothesis's
    local-constants pool so a derandomised stream depends on neither test order nor target
    (see ``_constants``)."""
    pin_local_constants()
    settings.register_profile(
        "ci",
        derandomize=True,
        max_examples=CI_MAX_EXAMPLES,
        stateful_step_count=CI_STEP_COUNT,
        deadline=None,
        database=None,
        print_blob=True,
        phases=_NO_EXPLAIN,
    )
    settings.register_profile(
        "dev",
        max_examples=100,
        stateful_step_count=40,
        deadline=None,
        phases=_NO_EXPLAIN,
        database=DirectoryBasedExampleDatabase(EXAMPLE_DATABASE_DIR),
    )
    settings.register_profile(
        "deep",
        max_examples=5000,
        stateful_step_count=100,
        deadline=None,
        database=DirectoryBasedExampleDatabase(EXAMPLE_DATABASE_DIR),
    )


def oracle_settings(parent: settings | None = None, **overrides: Any) -> settings:
    """Settings for running a machine: ``parent`` (default: the loaded profile) with the
    health checks a disk-image machine trips by design turned off, plus ``overrides``."""
    base = parent if parent is not None else settings()
    return settings(
        base,
        suppress_health_check=(*base.suppress_health_check, *_SUPPRESS),
        **overrides,
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def load_profile_from_env() -> str:
    """Load the profile the environment asks for and return its name."""
    register_profiles()
    name = os.environ.get("HYPOTHESIS_PROFILE") or (
        "ci" if _truthy(os.environ.get("CI")) else "dev"
    )
    settings.load_profile(name)
    return name

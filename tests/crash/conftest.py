"""Power-cut campaigns against both implementations (``pyimago.oracle.crash_campaign``).

Each test runs a few random sequences and judges the image after a cut at every storage
mutation; ``python -m pyimago.oracle.crash_campaign --sequences 100`` is the long run.
"""

from __future__ import annotations

import os
import shutil

import pytest
from pyimago.oracle.crash_campaign import CampaignStats, qemu_judge, run_campaign
from pyimago.oracle.targets import resolve_target

#: Sequences per test: enough to meet every kind of layer, cheap enough for every CI run.
SEQUENCES = int(os.environ.get("PYIMAGO_CRASH_SEQUENCES", "40"))


def campaign(impl: str, *, seed: int) -> CampaignStats:
    """Run ``SEQUENCES`` sequences against ``impl`` with qemu-img as the judge; fail with the
    first failures' stories."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        reason = "POWER-CUT CAMPAIGN NOT RUN: qemu-img missing"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)
    stats = run_campaign(resolve_target(impl), sequences=SEQUENCES, seed=seed,
                         judge=qemu_judge(qemu_img), max_cuts=60)
    assert stats.cuts > SEQUENCES, stats.summary()
    if not stats.clean:
        pytest.fail(stats.summary() + "\n\n" + "\n\n".join(stats.failures[:3]), pytrace=False)
    return stats

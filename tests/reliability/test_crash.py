"""Crash safety: SIGKILL the daemon at random moments during a copy-up/create/rename/delete
workload, remount the same upper + workdir, and check that nothing is half done or lost.

The full run is ``scripts/crash-loop`` (hundreds of kills); CI runs ~20 (see crashlib). The
lower layer has hard links, so copy-ups through the hard-link index are killed too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.crashlib import CrashLoop

KILLS = int(os.environ.get("UNIONFS_CRASH_KILLS", "20"))


@pytest.mark.root
@pytest.mark.timeout(240)
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    crash = CrashLoop(tmp_path / "crash", seed=20261122)
    figures = crash.run(KILLS, per_upper=7)
    print(figures.summary())
    assert not figures.failures, "\n".join(figures.failures[:10])
    assert figures.kills == KILLS
    assert figures.data_lost == 0
    assert figures.operations > KILLS  # the workload really ran between the kills

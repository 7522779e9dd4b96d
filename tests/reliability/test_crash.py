"""Crash safety: SIGKILL the daemon at random moments during a copy-up/create/rename/delete
workload, remount the same upper + workdir, and check that nothing is half done or lost.

The full run is ``scripts/crash-loop`` (hundreds of kills); CI runs ~20 (see crashlib).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.crashlib import CrashLoop

KILLS = int(os.environ.get("UNIONFS_CRASH_KILLS", "20"))


@pytest.mark.root
@pytest.mark.timeout(240)
@pytest.mark.xfail(
    strict=False,
    reason="OPEN BUG (issue 5 stays open): after SIGKILL + remount, some runs find completed "
    "operations missing: modes set by chmod on renamed (metadata-only copied) or hard-linked "
    "files differ, and a written-and-closed new file can be missing. Seen in a fresh-clone CI "
    "run and under load; 1,100 kills of scripts/crash-loop without hard links lost nothing. "
    "Runs and reports every time; see README 'Reliability' (open bugs).",
)
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    crash = CrashLoop(tmp_path / "crash", seed=20261122)
    figures = crash.run(KILLS, per_upper=7)
    print(figures.summary())
    assert not figures.failures, "\n".join(figures.failures[:10])
    assert figures.kills == KILLS
    assert figures.data_lost == 0
    assert figures.operations > KILLS  # the workload really ran between the kills

"""Fixtures of the differential tests: the system under test and a scratch area per example.

Environment knobs: UNIONFS_DIFF_SUT (unionfs | fuse-overlayfs | kernel, see backends.py),
UNIONFS_DIFF_EXAMPLES (hypothesis examples per test), UNIONFS_DIFF_STEPS (state machine steps),
UNIONFS_DIFF_RANDOM=1 (new random examples instead of the fixed derandomized ones),
UNIONFS_DIFF_SHRINK=1 (shrink a failure to a minimal example; slow).

Hypothesis runs many examples inside one test function, so per-example directories come from
`example_dir()` (under pytest's tmp dir, removed afterwards) rather than from `tmp_path`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.differential.backends import Backend, system_under_test
from tests.differential.layers import remove_tree

_PHASES = tuple(Phase)
if not os.environ.get("UNIONFS_DIFF_SHRINK"):
    # Shrinking re-mounts hundreds of times (minutes); by default a failure is reported as found,
    # with its full transcript (the differing step is marked "!!!"). UNIONFS_DIFF_SHRINK=1 shrinks.
    _PHASES = tuple(phase for phase in Phase if phase is not Phase.shrink)

settings.register_profile(
    "differential",
    deadline=None,
    # Reproducible by default (the same examples on every run, so known failures stay known);
    # UNIONFS_DIFF_RANDOM=1 explores new examples.
    derandomize=not os.environ.get("UNIONFS_DIFF_RANDOM"),
    phases=_PHASES,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    print_blob=True,
)


def examples(default: int) -> int:
    """Number of hypothesis examples: `UNIONFS_DIFF_EXAMPLES` overrides the bounded default."""
    return int(os.environ.get("UNIONFS_DIFF_EXAMPLES", default))


@pytest.fixture(scope="session")
def sut() -> Backend:
    backend = system_under_test()
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return backend


class Workspace:
    def __init__(self, base: Path) -> None:
        self.base = base
        self._counter = itertools.count()

    @contextlib.contextmanager
    def example_dir(self) -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(prefix=f"ex{next(self._counter)}-", dir=self.base))
        try:
            yield path
        finally:
            remove_tree(path)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)

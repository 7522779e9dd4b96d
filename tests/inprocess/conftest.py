"""The in-process tier: ``Operations`` driven without a kernel (tests/inprocess/driver.py).

``make_union(lower_spec, ..., upper_spec=None, **config)`` writes the lower layers (base first,
the spec format of ``tests.support.write_layer``), an upper and a work directory, and opens the
union with the mount's own factory; ``union`` is one over a small standard tree; ``remount``
closes a union and opens the same layers again. After every
test the union is closed and ``unionfs check`` runs on its upper (with the work directory and
the lowers): a test whose writes leave anything check reports fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.inprocess.driver import Driver
from tests.support import LayerSpec, write_layer
from unionfs.check import check_upper, format_report
from unionfs.config import MountConfig

MakeUnion = Callable[..., Driver]
Remount = Callable[[Driver], Driver]

STANDARD: LayerSpec = {
    "file": "lower file\n",
    "dir/inner": "inner\n",
    "dir/sub/deep": "deep\n",
    "empty/.keep": "",
}


@pytest.fixture
def opened_unions() -> list[tuple[Driver, Path, Path, list[Path]]]:
    """Every union a test opened: (driver, upper, workdir, lowers)."""
    return []


@pytest.fixture
def remount(opened_unions: list[tuple[Driver, Path, Path, list[Path]]]) -> Remount:
    """``remount(union)``: close the union and open its layers again (a new mount of them)."""

    def again(driver: Driver) -> Driver:
        driver.close()
        fresh = Driver(driver.config)
        for _old, upper, work, lowers in opened_unions:
            if str(upper) == driver.config.upper:
                opened_unions.append((fresh, upper, work, lowers))
                break
        return fresh

    return again


@pytest.fixture
def make_union(
    tmp_path: Path, opened_unions: list[tuple[Driver, Path, Path, list[Path]]]
) -> Iterator[MakeUnion]:
    opened = opened_unions
    counter = itertools.count()

    def make(*specs: LayerSpec, upper_spec: LayerSpec | None = None, **options: Any) -> Driver:
        base = tmp_path / f"union{next(counter)}"
        lowers = [write_layer(base / f"lower{i}", spec) for i, spec in enumerate(specs)]
        upper = write_layer(base / "upper", upper_spec or {})
        work = base / "work"
        work.mkdir()
        config = MountConfig(
            lowers=[str(path) for path in lowers],
            mountpoint=str(base / "mnt"),
            upper=str(upper),
            workdir=str(work),
            **options,
        )
        driver = Driver(config)
        opened.append((driver, upper, work, lowers))
        return driver

    yield make
    problems = []
    for driver, _upper, _work, _lowers in opened:
        driver.close()
    checked = set()
    for driver, upper, work, lowers in opened:
        if driver.config.writable and upper not in checked:
            checked.add(upper)
            report = check_upper(upper, work, lowers, repair=False)
            if not report.ok:
                problems.append(format_report(report))
    assert not problems, "unionfs check after the test:\n" + "\n".join(problems)


@pytest.fixture
def union(make_union: MakeUnion) -> Driver:
    return make_union(STANDARD)

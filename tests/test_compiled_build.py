"""The suite runs on the build of the hot modules scripts/test says it does (compiled or pure),
and a compiled build never runs against sources other than the ones it was compiled from.

``scripts/test`` sets ``UNIONFS_EXPECT_BUILD``: ``compiled`` on .venv (scripts/setup compiled the
hot modules with mypyc), ``pure`` on .venv-stock or with ``UNIONFS_COMPILE=0``. Without it (a bare
``pytest``) there is nothing to check against, and those tests say so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import unionfs
from tests.support import TmpLayers
from tests.support.mounts import unionfs_mounted
from unionfs import compiled

PROBE = (
    "import json, unionfs; from unionfs import compiled; "
    "print(json.dumps([compiled.build, compiled.running(), compiled.reason, unionfs.__path__]))"
)


@pytest.fixture
def expected() -> str:
    value = os.environ.get("UNIONFS_EXPECT_BUILD")
    if value is None:
        pytest.skip("UNIONFS_EXPECT_BUILD is unset (scripts/test sets it)")
    assert value in ("compiled", "pure"), value
    return value


def probe(
    environment: dict[str, str] | None = None, package: Path | None = None
) -> tuple[str, dict[str, str], str]:
    """Which build a fresh interpreter runs; with ``package``, of that copy of the package."""
    shown = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=None if package is None else package.parent,
    ).stdout
    build, modules, reason, path = json.loads(shown)
    if package is not None:
        assert path[-1] == str(package)
    return build, modules, reason


def test_this_process_runs_the_expected_build(expected: str) -> None:
    assert compiled.build == expected, compiled.reason
    assert set(compiled.running().values()) == {expected}


def test_the_daemon_runs_the_expected_build(
    expected: str, tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({"f": "x"})
    with unionfs_mounted(
        layers, mountpoint, upper=tmp_path / "up", workdir=tmp_path / "work"
    ) as mnt:
        document = json.loads(os.getxattr(mnt, "user.unionfs.status"))
        assert (mnt / "f").read_text() == "x"
    assert document["build"] == expected
    assert set(document["modules"].values()) == {expected}
    assert set(document["modules"]) == set(compiled.MODULES)


def test_unionfs_compile_0_forces_pure_python() -> None:
    build, modules, reason = probe(dict(os.environ, UNIONFS_COMPILE="0"))
    assert build == "pure" and set(modules.values()) == {"pure"}
    assert reason == "UNIONFS_COMPILE=0"


def test_an_edited_source_runs_pure_until_rebuilt(expected: str, tmp_path: Path) -> None:
    """A copy of the package finds the same venv's build; once one source differs by a byte
    (a module that is not itself compiled, even), the build no longer matches and pure
    Python runs."""
    package = Path(unionfs.__path__[-1])
    copy = tmp_path / "unionfs"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    environment = dict(os.environ, PYTHONPATH=str(tmp_path))
    environment.pop("UNIONFS_COMPILE", None)
    build, modules, _ = probe(environment, copy)
    assert build == expected and set(modules.values()) == {expected}
    with open(copy / "cli.py", "a") as source:
        source.write("\n# edited\n")
    build, modules, reason = probe(environment, copy)
    assert build == "pure" and set(modules.values()) == {"pure"}
    assert "no compiled build of these sources" in reason or "no compiled build in" in reason


def test_the_source_key_covers_every_source_and_the_interpreter(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = compiled.source_key(str(tmp_path))
    (tmp_path / "notes.txt").write_text("not a source")
    assert compiled.source_key(str(tmp_path)) == first
    (tmp_path / "b.py").write_text("y = 3\n")
    assert compiled.source_key(str(tmp_path)) != first
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "c.py").write_text("")
    assert compiled.source_key(str(tmp_path)) != first

"""The suite runs on the pyfuse3 build scripts/test says it does (patched or stock).

``scripts/test`` sets ``UNIONFS_EXPECT_PYFUSE3`` to ``patched`` (.venv) or ``stock``
(``--stock``, .venv-stock); CI runs both. Without it (a bare ``pytest``) there is nothing to
check against, and the test says so.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyfuse3
import pytest

from unionfs import fusefeatures

PATCHED_VERSION = "3.5.0+unionfs.1"
STOCK_VERSION = "3.5.0"
PATCH_FEATURES = {
    "sync_handlers",
    "main_lean",
    "fileinfo_flags",
    "opendir_fileinfo",
    "dir_inode_arguments",
    "init_flags",
    "fallocate",
    "lseek",
}


@pytest.fixture
def expected() -> str:
    value = os.environ.get("UNIONFS_EXPECT_PYFUSE3")
    if value is None:
        pytest.skip("UNIONFS_EXPECT_PYFUSE3 is unset (scripts/test sets it)")
    assert value in ("patched", "stock"), value
    return value


def test_the_installed_pyfuse3_is_the_expected_build(expected: str) -> None:
    if expected == "patched":
        assert pyfuse3.__version__ == PATCHED_VERSION
        assert fusefeatures.PATCHED
        assert set(fusefeatures.LIBRARY_FEATURES) == PATCH_FEATURES
    else:
        assert pyfuse3.__version__ == STOCK_VERSION
        assert not fusefeatures.PATCHED
        assert not hasattr(pyfuse3, "UNIONFS_FEATURES")
        assert not hasattr(pyfuse3, "main_lean")


def test_every_patched_feature_is_in_use_unless_turned_off(expected: str) -> None:
    """The daemon the tests mount runs with this interpreter (sys.executable) and so this
    pyfuse3; on the patched build everything it adds is used."""
    if fusefeatures.DISABLE_VARIABLE in os.environ:
        pytest.skip(f"{fusefeatures.DISABLE_VARIABLE} turns features off")
    if expected == "patched":
        assert set(fusefeatures.FEATURES) == PATCH_FEATURES | {"no_opendir"}
    else:
        assert not fusefeatures.FEATURES
    described = subprocess.run(
        [sys.executable, "-c", "from unionfs import fusefeatures; print(fusefeatures.describe())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert described == fusefeatures.describe()
    assert ("patched" if expected == "patched" else "stock") in described


def test_features_can_be_turned_off_for_measuring(expected: str) -> None:
    probe = "from unionfs import fusefeatures; print(','.join(sorted(fusefeatures.FEATURES)))"
    environment = dict(os.environ, UNIONFS_PYFUSE3_DISABLE="main_lean,no_opendir")
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    features = set(shown.split(",")) - {""}
    assert not features & {"main_lean", "no_opendir"}
    if expected == "patched":
        assert "fallocate" in features
    environment["UNIONFS_PYFUSE3_DISABLE"] = "all"
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert shown == ""

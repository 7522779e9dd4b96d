"""Minimal reproductions of bugs the reliability runs found (each names the run that found it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers
from tests.support.mounts import unionfs_mounted

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("how", ["rmdir", "rename"])
def test_recreated_directory_removed_again_keeps_lower_hidden(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path, how: str
) -> None:
    """Found by the crash loop (model mismatch: a removed lower dir came back).

    rmdir e; mkdir e (an opaque upper dir over the lower e); then rmdir e or rename it away:
    the lower e must stay hidden (a whiteout is needed), as on kernel overlayfs.
    """
    (lower,) = tmp_layers({"e": DIR, "e/inner": "lower"})
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir):
        (mountpoint / "e" / "inner").unlink()
        os.rmdir(mountpoint / "e")
        os.mkdir(mountpoint / "e")
        if how == "rmdir":
            os.rmdir(mountpoint / "e")
            assert sorted(os.listdir(mountpoint)) == []
        else:
            os.rename(mountpoint / "e", mountpoint / "x")
            assert sorted(os.listdir(mountpoint)) == ["x"]
            assert os.listdir(mountpoint / "x") == []
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir):
        assert sorted(os.listdir(mountpoint)) == ([] if how == "rmdir" else ["x"])

"""Import -> mount with an upper -> change -> diff_upper -> import the diff on top -> same tree.

Runs on unionfs (the product) and on kernel overlayfs (the oracle; root only, ``redirect_dir=on``
so a renamed lower directory is recorded as an ``overlay.redirect`` that ``diff_upper`` must
expand from the lower layers).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.containers.oci_build import LayerTar, write_oci_layout
from tests.support.mounts import overlay_available, overlay_mounted, unionfs_mounted
from tests.support.tree import assert_same_tree, snapshot
from unionfs import oci

pytestmark = pytest.mark.timeout(120)

Mounter = Callable[..., AbstractContextManager[Path]]


def base_image(root: Path) -> Path:
    base = (
        LayerTar()
        .dir("etc")
        .file("etc/motd", b"hello\n")
        .file("etc/conf", b"k=v\n", mode=0o640)
        .dir("old")
        .file("old/a", b"a")
        .dir("old/sub")
        .file("old/sub/b", b"b")
        .dir("tree")
        .file("tree/leaf", b"leaf")
        .dir("tree/branch")
        .file("tree/branch/twig", b"twig")
        .file("gone", b"gone")
        .dir("doomed")
        .file("doomed/x", b"x")
        .file("a", b"rename me")
        .file("bin-tool", b"tool", mode=0o755)
        .hardlink("bin-tool-link", "bin-tool")
        .symlink("motd-link", "etc/motd")
        .bytes()
    )
    top = (
        LayerTar()
        .whiteout("old/.wh.a")
        .file("tree/added", b"added")
        .file("etc/motd", b"hello again\n")
        .bytes()
    )
    return write_oci_layout(root, [base, top])


def change(merged: Path) -> None:
    (merged / "new.txt").write_text("new\n")
    os.link(merged / "new.txt", merged / "new-link")
    with (merged / "etc" / "motd").open("a") as f:
        f.write("appended\n")
    (merged / "gone").unlink()
    subprocess.run(["rm", "-r", str(merged / "old")], check=True)
    (merged / "old").mkdir()
    (merged / "old" / "fresh").write_text("fresh")
    os.rename(merged / "a", merged / "a2")
    os.rename(merged / "tree", merged / "tree2")
    os.chmod(merged / "etc" / "conf", 0o600)
    os.setxattr(merged / "etc" / "conf", "user.note", b"changed")
    (merged / "deep" / "a" / "b").mkdir(parents=True)
    (merged / "deep" / "a" / "b" / "f").write_text("deep")
    os.symlink("../new.txt", merged / "deep" / "link")
    subprocess.run(["rm", "-r", str(merged / "doomed")], check=True)


@contextlib.contextmanager
def _unionfs(
    layers: list[Path], mnt: Path, *, upper: Path | None = None, workdir: Path | None = None
) -> Iterator[Path]:
    with unionfs_mounted(layers, mnt, upper=upper, workdir=workdir) as m:
        yield m


BACKENDS = ["unionfs", "overlay"]


@pytest.fixture(params=BACKENDS)
def mounter(request: pytest.FixtureRequest, tmp_path: Path) -> Mounter:
    if request.param == "overlay":
        reason = overlay_available(tmp_path / "probe")
        if reason is not None:
            pytest.skip(reason)
        return overlay_mounted
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("/dev/fuse not usable")
    return _unionfs


def test_import_mount_change_diff_import_gives_same_tree(tmp_path: Path, mounter: Mounter) -> None:
    dest = tmp_path / "dest"
    layers = oci.import_image(base_image(tmp_path / "img"), dest, progress=False).layer_dirs
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with mounter(layers, mnt, upper=upper, workdir=work) as merged:
        change(merged)
        expected = snapshot(merged)
    assert "old/a" not in expected and "tree2/branch/twig" in expected  # sanity of the script
    diff = oci.diff_upper(upper, tmp_path / "diff.tar", progress=False, lowers=layers)
    assert diff.whiteouts >= 3 and diff.opaque_dirs >= 1
    if mounter is overlay_mounted:
        assert diff.redirects == 1, "kernel overlayfs records the dir rename as a redirect"
    stacked = oci.import_image(tmp_path / "diff.tar", dest, progress=False).layer_dirs
    assert stacked[:-1] == layers and len(stacked) == 3
    check = tmp_path / "check"
    check.mkdir()
    with mounter(stacked, check) as merged:
        actual = snapshot(merged)
    assert_same_tree(expected, actual, names=("changed mount", "re-imported stack"))

"""status / which / mount --image / the fuse-overlayfs -o form / uid mapping, through mounts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers, write_layer
from tests.support.mounts import fuse_mounted, unionfs_mounted


def unionfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unionfs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_and_which(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers({"base": "b", "d/x": "1"}, {"top": "t", "d/y": "2"})
    with unionfs_mounted(
        layers, mountpoint, upper=tmp_path / "up", workdir=tmp_path / "work"
    ) as mnt:
        (mnt / "base").write_text("changed")
        (mnt / "top").unlink()
        result = unionfs("status", str(mnt))
        assert result.returncode == 0, result.stderr
        assert str(layers[0]) in result.stdout and str(tmp_path / "up") in result.stdout
        assert "copy-ups 1" in result.stdout and "whiteouts 1" in result.stdout
        assert str(mnt) in unionfs("status").stdout
        assert unionfs("which", str(mnt / "base")).stdout.startswith(str(tmp_path / "up"))
        assert unionfs("which", str(mnt / "d/y")).stdout.startswith(str(layers[1] / "d/y"))
        merged = unionfs("which", str(mnt / "d")).stdout
        assert str(layers[0]) in merged and str(layers[1]) in merged
        document = json.loads(os.getxattr(mnt, "user.unionfs.status"))
        assert document["lowers"] == [str(layer) for layer in layers]
        assert "user.unionfs.status" not in os.listxattr(mnt)
    gone = unionfs("status", str(mountpoint))
    assert gone.returncode == 4 and "not mounted" in gone.stderr


def test_which_outside_a_mount(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    result = unionfs("which", str(tmp_path / "f"))
    assert result.returncode == 1 and "not inside a unionfs mount" in result.stderr
    assert "Traceback" not in result.stderr


def test_fuse_overlayfs_form(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    base, top = tmp_layers({"f": "base", "g": "g"}, {"f": "top"})
    (tmp_path / "up").mkdir()
    (tmp_path / "work").mkdir()
    argv = [
        sys.executable,
        "-m",
        "unionfs",
        "-o",
        f"lowerdir={top}:{base},upperdir={tmp_path / 'up'},workdir={tmp_path / 'work'},"
        'context="system_u:object_r:container_file_t:s0:c1,c2",noacl,fsync=0',
        str(mountpoint),
    ]
    with fuse_mounted(argv, mountpoint, marker="unionfs") as mnt:
        assert (mnt / "f").read_text() == "top"
        (mnt / "g").write_text("written")
        assert os.statvfs(mnt).f_namemax > 0
        statfs = subprocess.run(
            ["stat", "-f", "-c", "%t", str(mnt)], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert statfs == "65735546"  # FUSE_SUPER_MAGIC, what containers/storage checks
    assert (tmp_path / "up/g").read_text() == "written"


@pytest.mark.root
def test_uid_mapping_through_mount(shared_tmp: Path) -> None:
    """fuse-overlayfs's direction: uidmapping=ON_DISK:SHOWN:COUNT; chown and new files map back."""
    tmp_path = shared_tmp  # uid 1000 below must reach the mount
    layers = [write_layer(tmp_path / "layer", {"owned": "x", "other": "y", "dir": DIR})]
    os.chown(layers[0] / "other", 7, 7)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    options = ["uidmapping=0:1000:1", "gidmapping=0:2000:1"]
    with unionfs_mounted(
        layers, mountpoint, upper=tmp_path / "up", workdir=tmp_path / "work", options=options
    ) as mnt:
        st = (mnt / "owned").stat()
        assert (st.st_uid, st.st_gid) == (1000, 2000)  # 0:0 on disk
        other = (mnt / "other").stat()
        overflow = int(Path("/proc/sys/kernel/overflowuid").read_text())
        assert other.st_uid == overflow  # 7 on disk is in no range
        os.chown(mnt / "other", 1000, 2000)
        stored = (tmp_path / "up/other").stat()
        assert (stored.st_uid, stored.st_gid) == (0, 0)
        # A process running as the shown owner (uid 1000) may write its directory (allow_other
        # is on for root's mounts): the new file is stored as 0 on disk.
        made = subprocess.run(
            [
                "setpriv",
                "--reuid",
                "1000",
                "--regid",
                "2000",
                "--clear-groups",
                "sh",
                "-c",
                f"echo n > {mnt}/dir/new",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        assert (mnt / "dir/new").stat().st_uid == 1000
        new = (tmp_path / "up/dir/new").stat()
        assert (new.st_uid, new.st_gid) == (0, 0)
        (mnt / "by-root").write_text("r")  # root (uid 0) is in no range: the overflow id
        assert (tmp_path / "up/by-root").stat().st_uid == overflow


def test_status_numbers_lowers_base_first(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({"a": "1"}, {"b": "2"}, {"c": "3"})
    with unionfs_mounted(layers, mountpoint) as mnt:
        result = unionfs("status", str(mnt))
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  lower")]
    assert lines == [
        f"lower 0: {layers[0]}  (base)",
        f"lower 1: {layers[1]}",
        f"lower 2: {layers[2]}  (top)",
    ], result.stdout


def test_unwritable_log_is_a_one_line_error(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    result = unionfs(
        "mount",
        "--log",
        str(tmp_path / "missing-dir" / "log"),
        str(tmp_layers({"f": "1"})[0]),
        str(mountpoint),
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot write log" in result.stderr
    assert "Traceback" not in result.stderr

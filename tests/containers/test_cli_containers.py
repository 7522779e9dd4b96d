"""The container commands through the real CLI: import, run --image, mount --image, diff, status.

import IMAGE DEST -> run --image DEST -- CMD -> mount --image DEST --upper U MNT -> change ->
diff MNT -o layer.tar (a live mount) -> umount -> import layer.tar DEST -> run sees the change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.containers.oci_build import LayerTar, write_oci_layout
from tests.containers.podman_rig import make_busybox_rootfs
from tests.support.mounts import unionfs_mounted

pytestmark = pytest.mark.timeout(120)


def unionfs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unionfs", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def image(tmp_path: Path) -> Path:
    if shutil.which("busybox") is None or shutil.which("bwrap") is None:
        pytest.skip("busybox and bwrap needed (scripts/containers-setup)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("/dev/fuse not usable")
    rootfs = tmp_path / "rootfs"
    make_busybox_rootfs(rootfs)
    base = tmp_path / "base.tar"
    subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(base), "."], check=True)
    top = (
        LayerTar()
        .whiteout("data/.wh.gone")
        .dir("data/dir")
        .whiteout("data/dir/.wh..wh..opq")
        .file("data/dir/new", b"new\n")
        .bytes()
    )
    return write_oci_layout(
        tmp_path / "img", [base.read_bytes(), top], runtime_config={"Cmd": ["ls", "/data"]}
    )


def test_import_run_mount_diff_import_cycle(tmp_path: Path, image: Path) -> None:
    dest = tmp_path / "dest"
    imported = unionfs("import", str(image), str(dest), cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert "manifest" in imported.stdout and imported.stdout.count("sha256:") == 2

    default = unionfs("run", "--image", str(dest), cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert default.stdout.split() == ["dir", "keep"], "the image's Cmd runs by default"

    ran = unionfs("run", "--image", str(dest), "--", "sh", "-c", "ls /data/dir; exit 5",
                  cwd=tmp_path)  # fmt: skip
    assert ran.returncode == 5 and ran.stdout.split() == ["new"], ran.stderr

    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    mnt.mkdir()
    with unionfs_mounted([], mnt, upper=upper, workdir=work, extra_args=["--image", str(dest)]):
        assert sorted(os.listdir(mnt / "data")) == ["dir", "keep"]
        (mnt / "data" / "keep").write_text("changed\n")
        os.rename(mnt / "data" / "dir", mnt / "data" / "dir2")
        (mnt / "data" / "keep2").write_text("two\n")
        status = unionfs("status", str(mnt), cwd=tmp_path)
        assert status.returncode == 0 and str(upper) in status.stdout, status.stdout
        diff = unionfs("diff", str(mnt), "-o", str(tmp_path / "layer.tar"), cwd=tmp_path)
        assert diff.returncode == 0, diff.stderr
    assert diff.stdout.startswith("digest sha256:") and "diff_id sha256:" in diff.stdout
    with tarfile.open(tmp_path / "layer.tar") as tar:
        names = {m.name.rstrip("/") for m in tar.getmembers()}
    assert {"data/.wh.dir", "data/dir2/.wh..wh..opq", "data/dir2/new", "data/keep"} <= names

    stacked = unionfs("import", str(tmp_path / "layer.tar"), str(dest), cwd=tmp_path)
    assert stacked.returncode == 0, stacked.stderr
    assert "(3 layers)" in stacked.stdout
    after = unionfs("run", "--image", str(dest), "--", "sh", "-c",
                    "ls /data /data/dir2; cat /data/keep", cwd=tmp_path)  # fmt: skip
    assert after.returncode == 0, after.stderr
    assert after.stdout.split() == ["/data:", "dir2", "keep", "keep2", "/data/dir2:", "new",
                                    "changed"]  # fmt: skip


def test_import_errors_exit_3_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 64)
    result = unionfs("import", str(bad), str(tmp_path / "dest"), cwd=tmp_path)
    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_import_hostile_layer_warns_and_stays_inside(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    layer = tmp_path / "evil.tar"
    layer.write_bytes(
        LayerTar().symlink("link", str(canary)).file("link/pwned", b"x")
        .file("../canary/pwned2", b"x").file("ok", b"ok").bytes()
    )  # fmt: skip
    result = unionfs("import", str(layer), str(tmp_path / "dest"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(canary.iterdir()) == []
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2, result.stderr

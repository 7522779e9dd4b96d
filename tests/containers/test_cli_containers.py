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
import tempfile
from pathlib import Path

import pytest

from tests.containers.oci_build import LayerTar, write_oci_layout
from tests.containers.podman_rig import (
    REPO,
    TEST_USER,
    ensure_test_user,
    make_busybox_rootfs,
    mounts_under,
    unionfs_python,
)
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


# ----------------------------------------------------------------------------------- run


def test_run_help_shows_the_command_after_double_dash(tmp_path: Path) -> None:
    result = unionfs("run", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "-- COMMAND [ARG...]" in result.stdout
    assert "127" in result.stdout and "--workdir" in result.stdout


def test_run_without_double_dash_says_where_it_goes(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    for args in (["run", str(layer), "sh", "-c", "ls"], ["run", str(layer), "ls"],
                 ["run", str(layer)]):  # fmt: skip
        result = unionfs(*args, cwd=tmp_path)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "put -- before the command" in result.stderr


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    if shutil.which("busybox") is None or shutil.which("bwrap") is None:
        pytest.skip("busybox and bwrap needed (scripts/containers-setup)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("/dev/fuse not usable")
    root = tmp_path / "rootfs"
    make_busybox_rootfs(root)
    (root / "opt").mkdir()
    (root / "opt" / "bb").symlink_to("/bin/busybox")  # absolute: resolved inside the tree
    (root / "usr" / "local" / "bin").mkdir(parents=True)
    (root / "usr" / "local" / "bin" / "true").symlink_to("/opt/bb")
    (root / "bin" / "plain").write_text("not executable\n")
    return root


def test_run_exit_127_for_a_missing_command_126_for_one_not_executable(
    tmp_path: Path, rootfs: Path
) -> None:
    for command, code in ((["no-such-command"], 127), (["/bin/no-such"], 127),
                          (["/etc/motd"], 126), (["plain"], 126),
                          (["/usr/local/bin/true"], 0)):  # fmt: skip
        result = unionfs("run", str(rootfs), "--", *command, cwd=tmp_path)
        assert result.returncode == code, (command, result)
        if code >= 126:
            assert result.stderr.count("\n") == 1 and command[0] in result.stderr


def test_run_with_workdir(tmp_path: Path, rootfs: Path) -> None:
    upper, work = tmp_path / "upper", tmp_path / "work"
    result = unionfs("run", "--upper", str(upper), "--workdir", str(work), str(rootfs), "--",
                     "sh", "-c", "echo kept > /data/kept", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (upper / "data" / "kept").read_text() == "kept\n" and (work / "work").is_dir()
    assert not (tmp_path / ".upper.unionfs-work").exists()
    alone = unionfs("run", "--workdir", str(work), str(rootfs), "--", "true", cwd=tmp_path)
    assert alone.returncode == 2 and "--upper" in alone.stderr


@pytest.mark.root
def test_run_warns_an_ordinary_user_about_files_of_others(tmp_path: Path) -> None:
    """Root's image run by an ordinary user: every file shows as nobody inside; say so."""
    if shutil.which("busybox") is None or shutil.which("bwrap") is None:
        pytest.skip("busybox and bwrap needed (scripts/containers-setup)")
    uid, _gid = ensure_test_user()
    home = Path(tempfile.mkdtemp(prefix="run-warn-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        make_busybox_rootfs(home / "base")  # owned by root
        result = subprocess.run(
            ["runuser", "-u", TEST_USER, "--", "env", f"PYTHONPATH={REPO}", f"TMPDIR={home}",
             unionfs_python(), "-m", "unionfs", "run", str(home / "base"), "--", "ls", "-ln",
             "/etc/motd"],
            capture_output=True, text=True, timeout=90, check=False, cwd="/",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "warning: the layers' files belong to uid 0" in result.stderr, result.stderr
        assert result.stdout.split()[2] == "65534", result.stdout  # nobody, as warned
    finally:
        for entry in mounts_under(home):
            subprocess.run(["fusermount3", "-uz", entry], check=False)
        shutil.rmtree(home, ignore_errors=True)
    assert uid != 0


# -------------------------------------------------------------------------------- import


def _two_layer_image(tmp_path: Path, name: str = "img", marker: bytes = b"1") -> Path:
    base = LayerTar().file("etc/motd", b"hello\n").file("big", bytes(range(256)) * 4096).bytes()
    top = LayerTar().file("top", marker).bytes()
    return write_oci_layout(tmp_path / name, [base, top], compression=["none", "none"])


def test_import_of_a_truncated_tarball_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    layout = _two_layer_image(tmp_path)
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    data = archive.read_bytes()
    for fraction in (0.2, 0.5, 0.8):
        truncated = tmp_path / f"cut-{fraction}.tar"
        truncated.write_bytes(data[: int(len(data) * fraction)])
        dest = tmp_path / f"dest-{fraction}"
        result = unionfs("import", str(truncated), str(dest), cwd=tmp_path)
        assert result.returncode == 3, result
        assert result.stderr.count("\n") == 1 and "truncated or corrupt" in result.stderr
        assert "Traceback" not in result.stderr and not dest.exists()


def test_failed_import_removes_the_layers_it_unpacked(tmp_path: Path) -> None:
    """The second layer is corrupt: the first, already unpacked, goes too; dest is as it was."""
    layout = _two_layer_image(tmp_path)
    blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    top_blob = next(p for p in blobs if b"top" in p.read_bytes() and p.stat().st_size > 1000)
    top_blob.write_bytes(top_blob.read_bytes().replace(b"top", b"TOP"))
    for dest in (tmp_path / "new-dest", tmp_path / "empty-dest"):
        if dest.name == "empty-dest":
            dest.mkdir()
        result = unionfs("import", str(layout), str(dest), cwd=tmp_path)
        assert result.returncode == 3 and "layer 2/2" in result.stderr, result  # 1/2 was fine
        if dest.name == "empty-dest":
            assert list(dest.iterdir()) == []
        else:
            assert not dest.exists()


def test_repeated_import_is_idempotent_and_another_image_refused(tmp_path: Path) -> None:
    image, dest = _two_layer_image(tmp_path), tmp_path / "dest"
    first = unionfs("import", str(image), str(dest), cwd=tmp_path)
    assert first.returncode == 0 and "(2 layers)" in first.stdout, first.stderr
    before = sorted(p.name for p in (dest / "layers").iterdir())
    again = unionfs("import", str(image), str(dest), cwd=tmp_path)
    assert again.returncode == 0 and "nothing imported" in again.stdout, again
    assert "(2 layers)" in again.stdout
    assert sorted(p.name for p in (dest / "layers").iterdir()) == before
    other = _two_layer_image(tmp_path, "other", marker=b"2")  # same base, another top
    refused = unionfs("import", str(other), str(dest), cwd=tmp_path)
    assert refused.returncode == 3 and "another image" in refused.stderr, refused
    assert refused.stderr.count("\n") == 1
    assert sorted(p.name for p in (dest / "layers").iterdir()) == before
    layer = tmp_path / "layer.tar"
    layer.write_bytes(LayerTar().file("added", b"a").bytes())
    stacked = unionfs("import", str(layer), str(dest), cwd=tmp_path)
    assert stacked.returncode == 0 and "(3 layers)" in stacked.stdout
    twice = unionfs("import", str(layer), str(dest), cwd=tmp_path)
    assert twice.returncode == 0 and "(3 layers)" in twice.stdout and "nothing" in twice.stdout


# ---------------------------------------------------------------------------------- diff


def test_diff_with_a_missing_lower_is_one_line(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_text("x")
    result = unionfs("diff", str(upper), "-o", str(tmp_path / "out.tar"), "--lower",
                     str(tmp_path / "missing"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr

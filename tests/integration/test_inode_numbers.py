"""Inode numbers through real mounts (issue 11): stable across copy-up, rename, link and
remounts, xino-style: the real inode numbers when all layers are on one filesystem, equal
to what kernel overlayfs (index=on) shows; composed numbers, unique, across filesystems.
Before the fix every remount numbered everything anew (st_ino was assigned per mount)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers
from tests.support.mounts import overlay_mounted, unionfs_mounted

NAMES = ["a", "hard1", "hard2", "d", "d/x", "moved", "moved/f", "renamed", "c", "w", "sub/n",
         "new", "newdir", "meta"]  # fmt: skip


def base_layer(tmp_layers: TmpLayers) -> Path:
    (base,) = tmp_layers(
        {
            "a": "a",
            "hard1": "h",
            "d/x": "x",
            "r/f": "f",
            "mf": "m",
            "c": "c",
            "w": "w",
            "sub": DIR,
            "meta": "m" * 3000,
        }
    )
    os.link(base / "hard1", base / "hard2")
    return base


def change_everything(mnt: Path) -> None:
    """Copy-ups (data and metadata only), renames of files and directories, a hard link
    copied up through one name, new files and directories."""
    with open(mnt / "w", "a") as handle:
        handle.write("more")
    os.chmod(mnt / "c", 0o600)
    os.rename(mnt / "r", mnt / "moved")
    with open(mnt / "mf", "a") as handle:
        handle.write("more")
    os.rename(mnt / "mf", mnt / "renamed")  # data copied up, then renamed
    os.rename(mnt / "meta", mnt / "sub/meta")  # metadata only, renamed
    os.rename(mnt / "sub/meta", mnt / "meta")
    with open(mnt / "hard1", "a") as handle:
        handle.write("!")
    (mnt / "sub/n").write_text("n")
    (mnt / "new").write_text("new")
    (mnt / "newdir").mkdir()


def numbers(mnt: Path) -> dict[str, int]:
    return {name: (mnt / name).lstat().st_ino for name in NAMES}


@contextlib.contextmanager
def mounted(base: Path, tmp_path: Path, mountpoint: Path) -> Iterator[Path]:
    with unionfs_mounted(
        [base], mountpoint, upper=tmp_path / "upper", workdir=tmp_path / "work"
    ) as mnt:
        yield mnt


def test_inode_numbers_survive_remounts(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    base = base_layer(tmp_layers)
    with mounted(base, tmp_path, mountpoint) as mnt:
        before_changes = {name: (mnt / name).lstat().st_ino for name in ("a", "c", "w", "d")}
        change_everything(mnt)
        first = numbers(mnt)
    assert {name: first[name] for name in before_changes} == before_changes
    assert first["hard1"] == first["hard2"]
    assert len(set(first.values())) == len(NAMES) - 1, "two objects share a number"
    with mounted(base, tmp_path, mountpoint) as mnt:
        second = numbers(mnt)
    assert second == first
    # All layers on one filesystem: the real numbers, the lower one for what came from below.
    assert first["a"] == (base / "a").stat().st_ino
    assert first["w"] == (base / "w").stat().st_ino  # data copied up
    assert first["moved"] == (base / "r").stat().st_ino  # renamed directory
    assert first["meta"] == (base / "meta").stat().st_ino  # metadata only, renamed twice
    assert first["new"] == (tmp_path / "upper/new").stat().st_ino


@pytest.mark.root
@pytest.mark.usefixtures("require_overlay")
@pytest.mark.parametrize("writer", ["unionfs", "kernel"])
def test_inode_numbers_equal_the_kernels(
    writer: str, tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """The same upper shows the same st_ino through kernel overlayfs (index=on, all layers
    on one filesystem) and through us, whichever of the two wrote it."""
    base = base_layer(tmp_layers)
    upper, work = tmp_path / "upper", tmp_path / "work"
    kernel = tmp_path / "kernel"
    for directory in (upper, work, kernel):
        directory.mkdir()
    options = ("metacopy=on", "redirect_dir=on", "index=on")

    def by_kernel() -> contextlib.AbstractContextManager[Path]:
        return overlay_mounted([base], kernel, upper=upper, workdir=work, options=options)

    first_mount = by_kernel() if writer == "kernel" else mounted(base, tmp_path, mountpoint)
    with first_mount as mnt:
        change_everything(mnt)
        live = numbers(mnt)
    with mounted(base, tmp_path, mountpoint) as mnt:
        ours = numbers(mnt)
    with by_kernel() as mnt:
        theirs = numbers(mnt)
    assert ours == live
    assert ours == theirs


def test_tar_listed_incremental_sees_no_change_after_a_remount(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """GNU tar's incremental dump keys files by inode number: after a remount nothing is new."""
    if shutil.which("tar") is None:
        pytest.skip("no tar")
    base = base_layer(tmp_layers)
    snapshot = tmp_path / "snapshot"
    with mounted(base, tmp_path, mountpoint) as mnt:
        change_everything(mnt)
        subprocess.run(
            ["tar", "-C", str(mnt), "--listed-incremental", str(snapshot), "--no-check-device",
             "-cf", str(tmp_path / "level0.tar"), "."],
            check=True, timeout=60,
        )  # fmt: skip
    with mounted(base, tmp_path, mountpoint) as mnt:
        subprocess.run(
            ["tar", "-C", str(mnt), "--listed-incremental", str(snapshot), "--no-check-device",
             "-cf", str(tmp_path / "level1.tar"), "."],
            check=True, timeout=60,
        )  # fmt: skip
    with tarfile.open(tmp_path / "level1.tar") as archive:
        # (directories are listed in GNU "dumpdir" members; files only when new or changed)
        files = [m.name for m in archive.getmembers() if m.isreg() or m.issym() or m.islnk()]
    assert files == [], f"tar saw these as new after a remount: {files}"


@pytest.mark.root
def test_layers_on_two_filesystems_get_composed_numbers(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """Upper on a tmpfs, lower on the test filesystem: numbers carry the filesystem's index in
    the top bit (the upper's filesystem is 0), never collide, and survive a remount."""
    base = base_layer(tmp_layers)
    fs = tmp_path / "tmpfs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(fs)], check=True)
    try:
        upper, work = fs / "upper", fs / "work"
        with unionfs_mounted([base], mountpoint, upper=upper, workdir=work) as mnt:
            change_everything(mnt)
            first = numbers(mnt)
            assert first["new"] == (upper / "new").stat().st_ino  # upper filesystem: index 0
            assert first["a"] == (1 << 63) | (base / "a").stat().st_ino
            assert first["w"] == (1 << 63) | (base / "w").stat().st_ino  # copied up
            assert len(set(first.values())) == len(NAMES) - 1
        with unionfs_mounted([base], mountpoint, upper=upper, workdir=work) as mnt:
            assert numbers(mnt) == first
    finally:
        if subprocess.run(["umount", str(fs)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(fs)], check=False)


CHILD = """
import json, sys
from pathlib import Path
from tests.integration.test_inode_numbers import change_everything, numbers
mnt = Path(sys.argv[1])
if sys.argv[2] == "change":
    change_everything(mnt)
print(json.dumps(numbers(mnt)))
"""


@pytest.mark.root
def test_unprivileged_mount_keeps_the_numbers_too(
    ordinary_user: pwd.struct_passwd, tmp_layers: TmpLayers
) -> None:
    """An ordinary user's mount (no open_by_handle_at, user.overlay.* xattrs): the same
    numbers after a remount, a file renamed after its data was copied up included (its
    origin is found again by the redirect left on it)."""
    from tests.reliability.test_permissions import run_as, user_mount

    if stat.S_IMODE(os.stat("/dev/fuse").st_mode) & 0o006 != 0o006:
        pytest.skip("/dev/fuse is not usable by ordinary users (scripts/test makes it 0666)")
    base = base_layer(tmp_layers)
    shared = Path(tempfile.mkdtemp(prefix="unionfs-ino-", dir="/tmp"))
    try:
        os.chmod(shared, 0o755)
        lower = shared / "lower"
        shutil.copytree(base, lower, symlinks=True)
        for directory in (shared / "mnt", shared / "upper", shared / "work"):
            directory.mkdir()
        subprocess.run(["chown", "-R", f"{ordinary_user.pw_uid}:{ordinary_user.pw_gid}",
                        str(shared)], check=True)  # fmt: skip
        seen = []
        for action in ("change", "look"):
            with user_mount(
                ordinary_user, [lower], shared / "mnt", upper=shared / "upper",
                workdir=shared / "work",
            ):  # fmt: skip
                child = run_as(ordinary_user, CHILD, str(shared / "mnt"), action)
                seen.append(json.loads(child.stdout))
        assert seen[1] == seen[0]
        assert seen[0]["renamed"] == (lower / "mf").stat().st_ino
    finally:
        shutil.rmtree(shared, ignore_errors=True)

"""The merged read view through real mounts (issue 2): every rule, both whiteout formats."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import DIR, OPAQUE, WHITEOUT, Symlink, TmpLayers
from tests.support.mounts import unionfs_mounted


def tree(root: Path) -> dict[str, str]:
    """relative path -> type letter + content/target, walked with lstat only."""
    found: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory, name)
            relative = str(path.relative_to(root))
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                found[relative] = "l:" + os.readlink(path)
            elif stat.S_ISDIR(mode):
                found[relative] = "d"
            elif stat.S_ISREG(mode):
                found[relative] = "f:" + path.read_text()
            else:
                found[relative] = "s"
    return found


STACK_BASE = {
    "etc/a": "base-a",
    "etc/gone": "x",
    "opt/old/x": "old",
    "keep/k": "k",
    "shadow_dir/inner": "i",
    "shadow_file": "file",
}


def top_layer(form: str) -> dict[str, object]:
    common: dict[str, object] = {
        "etc/a": "new-a",
        "opt/old/y": "new-y",
        "shadow_dir": "now a file",
        "shadow_file/z": "z",
    }
    if form == "overlay":
        return {**common, "etc/gone": WHITEOUT, "opt/old": OPAQUE}
    return {**common, "etc/.wh.gone": "", "opt/old/.wh..wh..opq": ""}


EXPECTED = {
    "etc": "d",
    "etc/a": "f:new-a",
    "opt": "d",
    "opt/old": "d",
    "opt/old/y": "f:new-y",
    "keep": "d",
    "keep/k": "f:k",
    "shadow_dir": "f:now a file",
    "shadow_file": "d",
    "shadow_file/z": "f:z",
}


@pytest.mark.parametrize("form", ["overlay", "oci"])
def test_merged_view_both_formats(form: str, tmp_layers: TmpLayers, mountpoint: Path) -> None:
    if form == "overlay" and os.geteuid() != 0:
        pytest.skip("overlay-format layers need mknod of 0/0 and trusted xattrs")
    layers = tmp_layers(STACK_BASE, top_layer(form))
    with unionfs_mounted(layers, mountpoint) as mnt:
        assert tree(mnt) == EXPECTED
        assert not any(name.startswith(".wh.") for name in os.listdir(mnt / "etc"))
        with pytest.raises(FileNotFoundError):
            (mnt / "etc/gone").lstat()
        with pytest.raises(FileNotFoundError):
            (mnt / "opt/old/x").lstat()


def test_mount_shows_as_unionfs(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    with unionfs_mounted(tmp_layers({"f": "1"}), mountpoint) as mnt:
        line = next(
            entry
            for entry in Path("/proc/mounts").read_text().splitlines()
            if entry.split()[1] == str(mnt)
        )
        source, _, fstype = line.split()[:3]
        assert (source, fstype) == ("unionfs", "fuse.unionfs-py")
        assert os.statvfs(mnt).f_namemax >= 255


@pytest.mark.parametrize("count", [1, 2, 10, 100])
def test_many_layers(count: int, tmp_layers: TmpLayers, mountpoint: Path) -> None:
    specs = [{f"shared/f{index}": str(index), "same": str(index)} for index in range(count)]
    with unionfs_mounted(tmp_layers(*specs), mountpoint) as mnt:
        assert sorted(os.listdir(mnt / "shared")) == sorted(f"f{i}" for i in range(count))
        assert (mnt / "same").read_text() == str(count - 1)


def test_big_directory_merged_from_three_layers(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({}, {}, {})
    for index in range(10_000):
        (layers[index % 3] / f"entry{index:05d}").write_text("")
    for index in range(0, 300, 3):  # the same names in two layers must show once
        (layers[1] / f"entry{index:05d}").write_text("dup")
    with unionfs_mounted(layers, mountpoint) as mnt:
        names = os.listdir(mnt)
        assert len(names) == 10_000 and len(set(names)) == 10_000
        assert (mnt / "entry00000").read_text() == "dup"


@pytest.mark.root
def test_special_files_symlinks_hard_links(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers(
        {
            "link": Symlink("target/../x"),
            "abs": Symlink("/etc/passwd"),
            "up": Symlink("../../.."),
            "loop": Symlink("loop"),
            "h1": "same",
        }
    )
    base = layers[0]
    os.mkfifo(base / "fifo")
    os.mknod(base / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(base / "block", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    os.link(base / "h1", base / "h2")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(base / "sock"))
    with unionfs_mounted(layers, mountpoint) as mnt:
        assert stat.S_ISFIFO((mnt / "fifo").lstat().st_mode)
        assert stat.S_ISSOCK((mnt / "sock").lstat().st_mode)
        null = (mnt / "null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_ISBLK((mnt / "block").lstat().st_mode)
        assert os.readlink(mnt / "link") == "target/../x"
        assert os.readlink(mnt / "abs") == "/etc/passwd"
        assert os.readlink(mnt / "up") == "../../.."
        with pytest.raises(OSError) as loop:
            (mnt / "loop").stat()
        assert loop.value.errno == errno.ELOOP
        one, two = (mnt / "h1").lstat(), (mnt / "h2").lstat()
        assert one.st_ino == two.st_ino and one.st_nlink == 2


def test_inode_numbers_stable_and_unique(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    specs = [
        {f"d{layer}/f{i}": "x" for i in range(50)} | {"common/x": str(layer)} for layer in range(3)
    ]
    with unionfs_mounted(tmp_layers(*specs), mountpoint) as mnt:
        first = {str(p): p.lstat().st_ino for p in mnt.rglob("*")}
        assert len(set(first.values())) == len(first)  # no two files share an inode
        if os.geteuid() == 0:
            Path("/proc/sys/vm/drop_caches").write_text("2")  # forget dentries and inodes
        again = {str(p): p.lstat().st_ino for p in mnt.rglob("*")}
        assert again == first


def test_statfs_reports_top_layer(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({"f": "1"})
    with unionfs_mounted(layers, mountpoint) as mnt:
        ours, real = os.statvfs(mnt), os.statvfs(layers[0])
        assert (ours.f_blocks, ours.f_bsize) == (real.f_blocks, real.f_bsize)


@pytest.mark.root
def test_xattrs_private_ones_hidden(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({"f": "1", "d": DIR})
    os.setxattr(layers[0] / "f", "user.color", b"blue")
    os.setxattr(layers[0] / "f", "trusted.overlay.origin", b"secret")
    os.setxattr(layers[0] / "d", "user.overlay.redirect", b"/nowhere")
    with unionfs_mounted(layers, mountpoint) as mnt:
        assert os.listxattr(mnt / "f") == ["user.color"]
        assert os.getxattr(mnt / "f", "user.color") == b"blue"
        with pytest.raises(OSError) as hidden:
            os.getxattr(mnt / "f", "trusted.overlay.origin")
        assert hidden.value.errno == errno.ENODATA
        assert os.listxattr(mnt / "d") == []


def test_read_only_mount_refuses_writes(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({"f": "1", "d/x": "2"})
    with unionfs_mounted(layers, mountpoint) as mnt:
        attempts: list[Callable[[], object]] = [
            lambda: (mnt / "f").write_text("x"),
            lambda: (mnt / "new").write_text("x"),
            lambda: (mnt / "f").unlink(),
            lambda: (mnt / "d2").mkdir(),
            lambda: os.rename(mnt / "f", mnt / "g"),
            lambda: os.chmod(mnt / "f", 0o600),
            lambda: os.symlink("x", mnt / "s"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as refused:
                attempt()
            assert refused.value.errno == errno.EROFS
    assert (layers[0] / "f").read_text() == "1"


def test_metadata_of_lower_files_shown_as_is(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({"f": "content"})
    os.chmod(layers[0] / "f", 0o640)
    os.utime(layers[0] / "f", ns=(1_000_000_000, 2_000_000_000))
    with unionfs_mounted(layers, mountpoint) as mnt:
        st = (mnt / "f").lstat()
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 2_000_000_000
        assert st.st_size == len("content")


def test_dot_and_dotdot_and_readdir(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    with unionfs_mounted(tmp_layers({"d/f": "1"}, {"d/g": "2"}), mountpoint) as mnt:
        fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = sorted(os.fsdecode(n) for n in _getdents_names(fd))
        finally:
            os.close(fd)
        assert names == [".", "..", "f", "g"]
        assert (mnt / "d" / "..").samefile(mnt)


def _getdents_names(fd: int) -> list[bytes]:
    """Names the kernel returns for a directory, including . and .. (via /proc + ls -a)."""
    import subprocess

    output = subprocess.run(
        ["ls", "-a1", f"/proc/self/fd/{fd}/"], capture_output=True, check=True, pass_fds=(fd,)
    ).stdout
    return [line for line in output.split(b"\n") if line]


def test_readdir_stable_under_concurrent_changes(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layers = tmp_layers({f"d/lower{i:03d}": "" for i in range(300)})
    with unionfs_mounted(
        layers, mountpoint, upper=tmp_path / "up", workdir=tmp_path / "work"
    ) as mnt:
        stop = threading.Event()
        churned: list[int] = []
        failures: list[BaseException] = []

        def churn() -> None:
            index = 0
            try:
                while not stop.is_set():
                    path = mnt / "d" / f"new{index % 50}"
                    path.write_text("")
                    path.unlink()
                    index += 1
            except BaseException as error:  # reported by the test, not lost with the thread
                failures.append(error)
            churned.append(index)

        worker = threading.Thread(target=churn)
        worker.start()
        try:
            for _ in range(20):
                with os.scandir(mnt / "d") as entries:
                    seen = [entry.name for entry in entries]
                assert len(seen) == len(set(seen)), "an entry was reported twice"
                assert {f"lower{i:03d}" for i in range(300)} <= set(seen)
        finally:
            stop.set()
            worker.join()
        assert not failures, f"the churn thread failed: {failures[0]!r}"
        assert churned and churned[0] > 0, "no change happened while listing"

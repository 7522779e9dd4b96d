"""The writable layer through real mounts (issue 3): copy-up, whiteouts, renames, links.

Every test checks at the end that the lower layers did not change (content, mode, owner,
mtime, xattrs), and most check the upper layer on disk in kernel overlayfs format.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers
from tests.support.mounts import overlay_mounted, unionfs_mounted
from unionfs import safeio

OPAQUE_XATTR = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"
# Our upper uses redirects for renamed directories and metadata-only copy-ups.
KERNEL_OPTIONS = ("redirect_dir=on", "index=on", "metacopy=on")
REDIRECT_XATTR = "trusted.overlay.redirect" if os.geteuid() == 0 else "user.overlay.redirect"


def fingerprint(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a layer that must never change."""
    result: dict[str, tuple[object, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        xattrs = tuple(
            sorted(
                (name, os.getxattr(path, name, follow_symlinks=False))
                for name in os.listxattr(path, follow_symlinks=False)
            )
        )
        result[str(path.relative_to(root))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            content,
            xattrs,
        )
    return result


@contextlib.contextmanager
def writable(
    layers: list[Path], tmp_path: Path, mountpoint: Path, extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[Path, Path]]:
    """Mount with an upper; yield (mountpoint, upper); check lowers are untouched after."""
    before = [fingerprint(layer) for layer in layers]
    upper, work = tmp_path / "upper", tmp_path / "work"
    with unionfs_mounted(
        layers, mountpoint, upper=upper, workdir=work, extra_args=extra_args
    ) as mnt:
        yield mnt, upper
    assert [fingerprint(layer) for layer in layers] == before, "a lower layer changed"
    assert os.listdir(work / "work") == [], "temporary files were left in the workdir"


def is_whiteout(path: Path) -> bool:
    st = path.lstat()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_copy_up_on_write_keeps_metadata(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({"dir/f": "hello", "dir/g": "other"})
    os.chmod(layers[0] / "dir", 0o750)
    os.chmod(layers[0] / "dir/f", 0o640)
    os.setxattr(layers[0] / "dir/f", "user.note", b"kept")
    os.setxattr(layers[0] / "dir", "user.dirnote", b"dir")
    os.utime(layers[0] / "dir", ns=(5_000_000_000, 6_000_000_000))
    if os.geteuid() == 0:
        os.chown(layers[0] / "dir/f", 1234, 5678)
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        inode = (mnt / "dir/f").stat().st_ino
        with open(mnt / "dir/f", "a") as handle:
            handle.write(" world")
        assert (mnt / "dir/f").read_text() == "hello world"
        copied = (upper / "dir/f").lstat()
        assert stat.S_IMODE(copied.st_mode) == 0o640
        assert os.getxattr(upper / "dir/f", "user.note") == b"kept"
        if os.geteuid() == 0:
            assert (copied.st_uid, copied.st_gid) == (1234, 5678)
        assert stat.S_IMODE((upper / "dir").lstat().st_mode) == 0o750
        assert os.getxattr(upper / "dir", "user.dirnote") == b"dir"
        assert not (upper / "dir/g").exists(), "only the written file is copied up"
        assert (mnt / "dir/f").stat().st_ino == inode, "copy-up changed the inode number"


@pytest.mark.parametrize(
    "how", ["truncate", "chmod", "utime", "setxattr", "removexattr", "o_trunc", "rdwr"]
)
def test_metadata_changes_copy_up(
    how: str, tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({"f": "content"})
    os.setxattr(layers[0] / "f", "user.gone", b"1")
    os.utime(layers[0] / "f", ns=(7_000_000_000, 8_000_000_000))
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        target = mnt / "f"
        if how == "truncate":
            os.truncate(target, 3)
            assert target.read_text() == "con"
        elif how == "chmod":
            os.chmod(target, 0o600)
            assert stat.S_IMODE((upper / "f").lstat().st_mode) == 0o600
            assert target.read_text() == "content"
        elif how == "utime":
            os.utime(target, ns=(1_000_000_000, 2_000_000_000))
            assert (upper / "f").lstat().st_mtime_ns == 2_000_000_000
        elif how == "setxattr":
            os.setxattr(target, "user.added", b"v")
            assert os.getxattr(upper / "f", "user.added") == b"v"
        elif how == "removexattr":
            os.removexattr(target, "user.gone")
            assert os.listxattr(target) == []
        elif how == "o_trunc":
            target.write_text("new")
            assert target.read_text() == "new"
        elif how == "rdwr":
            with open(target, "r+b") as handle:
                assert handle.read() == b"content"
            assert (upper / "f").read_text() == "content"
            assert (upper / "f").lstat().st_mtime_ns == 8_000_000_000
        assert (upper / "f").exists()


def test_copy_up_keeps_holes(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers({})
    with open(layers[0] / "sparse", "wb") as handle:
        handle.write(b"head")
        handle.seek(1 << 30)
        handle.write(b"tail")
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        with open(mnt / "sparse", "r+b") as handle:
            handle.seek(0, os.SEEK_END)
            handle.write(b"!")
        copied = (upper / "sparse").lstat()
        assert copied.st_size == (1 << 30) + 5
        assert copied.st_blocks * 512 < 1 << 20, "holes were filled with zeroes"
        with open(mnt / "sparse", "rb") as handle:
            assert handle.read(4) == b"head"
            handle.seek(1 << 30)
            assert handle.read() == b"tail!"


def test_whiteouts_on_disk(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers({"f": "1", "d/x": "2", "g": "3"})
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        (mnt / "f").unlink()
        (mnt / "d/x").unlink()
        (mnt / "d").rmdir()
        assert sorted(os.listdir(mnt)) == ["g"]
        assert is_whiteout(upper / "f") and is_whiteout(upper / "d")
        (mnt / "f").write_text("again")
        assert (mnt / "f").read_text() == "again"
        assert stat.S_ISREG((upper / "f").lstat().st_mode)


def test_oci_whiteout_format(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers({"f": "1", "d/x": "2"})
    with writable(layers, tmp_path, mountpoint, ("--whiteout-format", "oci")) as (mnt, upper):
        (mnt / "f").unlink()
        (mnt / "d/x").unlink()
        (mnt / "d").rmdir()
        (mnt / "d").mkdir()
        assert os.listdir(mnt) == ["d"] and os.listdir(mnt / "d") == []
        assert (upper / ".wh.f").is_file()
        assert (upper / "d/.wh..wh..opq").is_file()


def test_rmdir_and_mkdir_makes_opaque(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({"d/a": "1", "d/sub/b": "2"})
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        with pytest.raises(OSError) as not_empty:
            (mnt / "d").rmdir()
        assert not_empty.value.errno == errno.ENOTEMPTY
        subprocess.run(["rm", "-rf", str(mnt / "d")], check=True)
        (mnt / "d").mkdir()
        assert os.listdir(mnt / "d") == []
        assert os.getxattr(upper / "d", OPAQUE_XATTR) == b"y"


def test_rmdir_of_merged_dir_empty_in_view(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({"d/a": "1"}, {"d/b": "2"})
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        (mnt / "d/a").unlink()
        (mnt / "d/b").unlink()
        (mnt / "d").rmdir()
        assert not (mnt / "d").exists() and is_whiteout(upper / "d")


def test_rename_lower_directory_is_o1(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({f"tree/sub{i}/f{j}": f"{i}-{j}" for i in range(5) for j in range(20)})
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        inode = (mnt / "tree").stat().st_ino
        os.rename(mnt / "tree", mnt / "moved")
        assert not (mnt / "tree").exists()
        assert (mnt / "moved/sub3/f7").read_text() == "3-7"
        assert (mnt / "moved").stat().st_ino == inode
        # Within one directory the kernel writes a relative redirect (the old name).
        assert os.getxattr(upper / "moved", REDIRECT_XATTR) == b"tree"
        assert os.listdir(upper / "moved") == [], "the renamed tree was copied"
        assert is_whiteout(upper / "tree")
        # and once more, into another directory: now absolute
        (mnt / "other").mkdir()
        os.rename(mnt / "moved", mnt / "other/again")
        assert (mnt / "other/again/sub0/f0").read_text() == "0-0"
        assert os.getxattr(upper / "other/again", REDIRECT_XATTR) == b"/tree"


def test_hard_links_survive_copy_up(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({"a": "old", "dir": DIR})
    os.link(layers[0] / "a", layers[0] / "dir/b")
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        before = (mnt / "dir/b").stat()
        assert before.st_nlink == 2
        (mnt / "a").write_text("new")
        after = (mnt / "dir/b").stat()
        assert (mnt / "dir/b").read_text() == "new"
        assert after.st_ino == before.st_ino and after.st_nlink == 2
        os.link(mnt / "a", mnt / "c")
        assert (mnt / "c").stat().st_ino == before.st_ino
        assert (mnt / "a").stat().st_nlink == 3


ORIGIN_XATTR = "trusted.overlay.origin" if os.geteuid() == 0 else "user.overlay.origin"
NLINK_XATTR = "trusted.overlay.nlink" if os.geteuid() == 0 else "user.overlay.nlink"


def test_hard_links_copied_up_stay_one_file_after_remount(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """The copy of a lower file with three names is recorded in WORKDIR/index (kernel format):
    after a remount the names never copied up show the new data, one inode and the count."""
    layers = tmp_layers({"a": "old", "dir": DIR, "c": "other"})
    os.link(layers[0] / "a", layers[0] / "dir/b")
    os.link(layers[0] / "a", layers[0] / "c2")
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        (mnt / "a").write_text("new")
        assert (mnt / "dir/b").read_text() == "new" and (mnt / "a").stat().st_nlink == 3
    index = tmp_path / "work/index"
    entries = os.listdir(index)
    assert len(entries) == 1, entries
    entry = index / entries[0]
    assert entry.stat().st_ino == (upper / "a").stat().st_ino, "index and upper name differ"
    assert os.getxattr(entry, ORIGIN_XATTR).hex() == entries[0]
    assert os.getxattr(entry, NLINK_XATTR) == b"U+1"  # 2 upper links, 3 names
    assert not (upper / "dir/b").exists() and not (upper / "c2").exists()
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        names = [mnt / "a", mnt / "dir/b", mnt / "c2"]
        assert [path.read_text() for path in names] == ["new"] * 3
        assert len({path.stat().st_ino for path in names}) == 1
        assert [path.stat().st_nlink for path in names] == [3, 3, 3]
        (mnt / "dir/b").write_text("newer")  # through a name that is only in the index
        assert (mnt / "c2").read_text() == "newer"


def test_hard_link_count_is_kept_across_remounts(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """Unlinking or renaming lower names of a hard-linked file: the merged count is recorded,
    and the index entry goes with the last name."""
    layers = tmp_layers({"a": "data", "keep": "k"})
    for name in ("b", "c", "d"):
        os.link(layers[0] / "a", layers[0] / name)
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        os.unlink(mnt / "b")  # a lower name only: recorded through the index
        os.rename(mnt / "c", mnt / "c-moved")
        assert (mnt / "a").stat().st_nlink == 3
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        assert not (mnt / "b").exists()
        assert {(mnt / name).stat().st_nlink for name in ("a", "c-moved", "d")} == {3}
        assert (mnt / "d").stat().st_ino == (mnt / "c-moved").stat().st_ino
        os.unlink(mnt / "a")
        os.unlink(mnt / "d")
        assert (mnt / "c-moved").stat().st_nlink == 1
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        assert (mnt / "c-moved").stat().st_nlink == 1
        assert (mnt / "c-moved").read_text() == "data"
        os.unlink(mnt / "c-moved")
        assert sorted(os.listdir(mnt)) == ["keep"]
    assert os.listdir(tmp_path / "work/index") == [], "the index entry outlived its names"


def test_orphaned_index_entries_are_removed_at_mount(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """A crash after the last name of an indexed file went but before its index entry did:
    the next mount removes the entry (only the index links it, its merged count is 0)."""
    layers = tmp_layers({"a": "data"})
    os.link(layers[0] / "a", layers[0] / "b")
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        (mnt / "a").write_text("new")
    index = tmp_path / "work/index"
    (entry,) = index.iterdir()
    lonely = index / ("00fb" + "1" * 52)
    lonely.write_bytes(b"x")
    os.setxattr(lonely, NLINK_XATTR, b"U-1")
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        assert (mnt / "b").read_text() == "new"
    assert os.listdir(index) == [entry.name]


def test_index_off_writes_no_index(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers({"a": "old"})
    os.link(layers[0] / "a", layers[0] / "b")
    with writable(layers, tmp_path, mountpoint, extra_args=("-o", "index=off")) as (mnt, upper):
        (mnt / "a").write_text("new")
        assert (mnt / "b").read_text() == "new", "within one mount the names stay one file"
    assert os.listdir(tmp_path / "work/index") == []
    assert ORIGIN_XATTR not in os.listxattr(upper / "a")


@pytest.mark.root
def test_kernel_sees_our_hard_link_index(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({"a": "old"})
    os.link(layers[0] / "a", layers[0] / "b")
    os.link(layers[0] / "a", layers[0] / "c")
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        (mnt / "a").write_text("new")
        os.unlink(mnt / "c")
    kernel = tmp_path / "kernel"
    kernel.mkdir()
    with overlay_mounted(
        layers, kernel, upper=tmp_path / "upper", workdir=tmp_path / "work", options=KERNEL_OPTIONS
    ):
        assert (kernel / "b").read_text() == "new"
        assert (kernel / "b").stat().st_ino == (kernel / "a").stat().st_ino
        assert (kernel / "b").stat().st_nlink == 2
        assert not (kernel / "c").exists()


def test_reader_sees_copy_up_by_another_writer(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    layers = tmp_layers({"f": "before"})
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        reader = os.open(mnt / "f", os.O_RDONLY)
        try:
            assert os.pread(reader, 100, 0) == b"before"
            with open(mnt / "f", "r+") as writer:
                writer.write("AFTER!")
            assert os.pread(reader, 100, 0) == b"AFTER!"
        finally:
            os.close(reader)


def test_rename_flags(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers({"a": "A", "b": "B", "d/x": "X"})
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(OSError) as exists:
                safeio.renameat2(fd, b"a", fd, b"b", safeio.RENAME_NOREPLACE)
            assert exists.value.errno == errno.EEXIST
            safeio.renameat2(fd, b"a", fd, b"b", safeio.RENAME_EXCHANGE)
            assert (mnt / "a").read_text() == "B" and (mnt / "b").read_text() == "A"
            safeio.renameat2(fd, b"a", fd, b"d", safeio.RENAME_EXCHANGE)
            assert (mnt / "a/x").read_text() == "X" and (mnt / "d").read_text() == "B"
            with pytest.raises(OSError) as missing:
                safeio.renameat2(fd, b"a", fd, b"nothing", safeio.RENAME_EXCHANGE)
            assert missing.value.errno == errno.ENOENT
        finally:
            os.close(fd)


def test_rename_errors(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers({"f": "1", "d/x": "2", "e": DIR})
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        cases = [
            (mnt / "d", mnt / "f", errno.ENOTDIR),
            (mnt / "f", mnt / "d", errno.EISDIR),
            (mnt / "e", mnt / "d", errno.ENOTEMPTY),
            (mnt / "d", mnt / "d/x/y", errno.ENOTDIR),
            (mnt / "d", mnt / "d/sub", errno.EINVAL),
            (mnt / "none", mnt / "z", errno.ENOENT),
        ]
        for source, target, expected in cases:
            with pytest.raises(OSError) as failed:
                os.rename(source, target)
            assert failed.value.errno == expected, (source, target)


def test_special_files_created(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    with writable(tmp_layers({}), tmp_path, mountpoint) as (mnt, upper):
        os.mkfifo(mnt / "fifo")
        os.symlink("../somewhere", mnt / "link")
        assert stat.S_ISFIFO((upper / "fifo").lstat().st_mode)
        assert os.readlink(mnt / "link") == "../somewhere"
        if os.geteuid() == 0:
            os.mknod(mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            assert (mnt / "null").lstat().st_rdev == os.makedev(1, 3)


def test_model_checked_random_io(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    """Tens of thousands of random reads, writes and truncates against an in-memory model."""
    rng = random.Random(1234)
    initial = bytes(rng.getrandbits(8) for _ in range(70_000))
    layers = tmp_layers({"data": initial})
    model = bytearray(initial)
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        fd = os.open(mnt / "data", os.O_RDWR)
        try:
            for step in range(20_000):
                action = rng.random()
                offset = rng.randrange(0, len(model) + 4096)
                if action < 0.45:
                    chunk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 600)))
                    os.pwrite(fd, chunk, offset)
                    if offset > len(model):
                        model.extend(bytes(offset - len(model)))
                    model[offset : offset + len(chunk)] = chunk
                elif action < 0.9:
                    size = rng.randrange(1, 5000)
                    assert os.pread(fd, size, offset) == bytes(model[offset : offset + size]), step
                elif action < 0.97:
                    length = rng.randrange(0, 100_000)
                    os.ftruncate(fd, length)
                    del model[length:]
                    model.extend(bytes(length - len(model)))
                else:
                    os.close(fd)
                    fd = os.open(mnt / "data", os.O_RDWR)
        finally:
            os.close(fd)
        assert (mnt / "data").read_bytes() == bytes(model)
        assert os.stat(mnt / "data").st_size == len(model)


@pytest.mark.root
def test_kernel_reads_our_upper(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers(
        {"keep": "k", "gone": "g", "tree/a/b": "ab", "d/x": "x", "h": "h"},
        {"top": "t", "tree/c": "c"},
    )
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        (mnt / "gone").unlink()
        os.rename(mnt / "tree", mnt / "renamed")
        subprocess.run(["rm", "-rf", str(mnt / "d")], check=True)
        (mnt / "d").mkdir()
        (mnt / "d/new").write_text("n")
        (mnt / "h").write_text("changed")
        os.chmod(mnt / "keep", 0o600)
        seen_by_us = snapshot(mnt)
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    with overlay_mounted(
        layers,
        kernel_mnt,
        upper=tmp_path / "upper",
        workdir=tmp_path / "work",
        options=KERNEL_OPTIONS,
    ) as kernel:
        assert snapshot(kernel) == seen_by_us


@pytest.mark.root
def test_we_read_kernel_upper(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    layers = tmp_layers({"keep": "k", "gone": "g", "tree/a/b": "ab", "d/x": "x"}, {"top": "t"})
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    upper, work = tmp_path / "kupper", tmp_path / "kwork"
    upper.mkdir()
    work.mkdir()
    with overlay_mounted(
        layers, kernel_mnt, upper=upper, workdir=work, options=KERNEL_OPTIONS
    ) as kernel:
        (kernel / "gone").unlink()
        os.rename(kernel / "tree", kernel / "renamed")
        subprocess.run(["rm", "-rf", str(kernel / "d")], check=True)
        (kernel / "d").mkdir()
        (kernel / "d/new").write_text("n")
        (kernel / "top").write_text("t2")
        seen_by_kernel = snapshot(kernel)
    with unionfs_mounted(layers, mountpoint, upper=upper, workdir=work) as mnt:
        assert snapshot(mnt) == seen_by_kernel


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    result: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        result[str(path.relative_to(root))] = (
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_size,
            content,
        )
    return result


METACOPY_XATTR = "trusted.overlay.metacopy" if os.geteuid() == 0 else "user.overlay.metacopy"


def test_metadata_only_copy_up_survives_remount(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """chmod/chown/utime/rename of a lower file copy no data (kernel metacopy format); the
    data is copied on the first write, also after a remount."""
    payload = os.urandom(300_000)
    layers = tmp_layers({"big": payload, "moved": "m" * 5000})
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        os.chmod(mnt / "big", 0o600)
        os.rename(mnt / "moved", mnt / "renamed")
        stored = (upper / "big").lstat()
        assert stat.S_IMODE(stored.st_mode) == 0o600 and stored.st_size == len(payload)
        # (at most a block of xattrs: metacopy, origin and redirect may not fit the inode)
        assert stored.st_blocks * 512 <= 4096, "the data was copied"
        assert os.getxattr(upper / "big", METACOPY_XATTR) == b""
        assert os.getxattr(upper / "renamed", REDIRECT_XATTR) == b"moved"  # same directory
        assert (mnt / "big").read_bytes() == payload
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        assert (mnt / "big").read_bytes() == payload, "metacopy lost its data on remount"
        assert (mnt / "renamed").read_text() == "m" * 5000
        assert stat.S_IMODE((mnt / "big").stat().st_mode) == 0o600
        with open(mnt / "big", "r+b") as handle:
            handle.write(b"X")
        assert (mnt / "big").read_bytes() == b"X" + payload[1:]
        assert METACOPY_XATTR not in os.listxattr(upper / "big")
        assert (upper / "big").lstat().st_blocks > 0
        assert stat.S_IMODE((upper / "big").lstat().st_mode) == 0o600


@pytest.mark.parametrize("change", ["chmod", "rename", "utime", "setxattr"])
def test_metacopy_off_copies_the_data(
    change: str, tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """-o metacopy=off: a metadata change copies the data up too (the upper file is complete,
    no overlay.metacopy), so any overlay mount reads it. It used to copy the size only: the
    file read back as zeros (found by scripts/crash-loop -o metacopy=off)."""
    payload = os.urandom(70_000)
    layers = tmp_layers({"f": payload})
    options = ("-o", "metacopy=off")
    with writable(layers, tmp_path, mountpoint, extra_args=options) as (mnt, upper):
        if change == "chmod":
            os.chmod(mnt / "f", 0o600)
        elif change == "utime":
            os.utime(mnt / "f", ns=(1_000_000_000, 2_000_000_000))
        elif change == "setxattr":
            os.setxattr(mnt / "f", "user.note", b"x")
        else:
            os.rename(mnt / "f", mnt / "g")
        name = "g" if change == "rename" else "f"
        assert (mnt / name).read_bytes() == payload
        assert (upper / name).read_bytes() == payload, "the upper copy lacks the data"
        assert METACOPY_XATTR not in os.listxattr(upper / name)
    with writable(layers, tmp_path, mountpoint, extra_args=options) as (mnt, _upper):
        assert (mnt / name).read_bytes() == payload


def test_unlinked_open_files_never_reach_the_lower_layer(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """fchmod/ftruncate through fds of files deleted while open: an upper file changes, a
    lower file opened read-only stays untouched (the writable() check verifies the lowers)."""
    layers = tmp_layers({"lower": "lower data"})
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        reader = os.open(mnt / "lower", os.O_RDONLY)
        (mnt / "new").write_text("upper data")
        writer = os.open(mnt / "new", os.O_RDWR)
        try:
            (mnt / "lower").unlink()
            (mnt / "new").unlink()
            with contextlib.suppress(OSError):
                os.fchmod(reader, 0o600)  # refused or harmless: never the lower file
            os.ftruncate(writer, 5)
            os.fchmod(writer, 0o640)
            assert os.pread(writer, 100, 0) == b"upper"
            assert stat.S_IMODE(os.fstat(writer).st_mode) == 0o640
            assert os.pread(reader, 100, 0) == b"lower data"
        finally:
            os.close(reader)
            os.close(writer)


def test_link_count_is_zero_once_the_last_name_is_gone(
    tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """fstat of a file opened and then unlinked (or renamed over) says st_nlink 0, as every
    local filesystem does; a lower hard link that keeps a name says 1."""
    layers = tmp_layers({"lower": "l", "over_me": "o", "source": "s", "h1": "h"})
    os.link(layers[0] / "h1", layers[0] / "h2")
    with writable(layers, tmp_path, mountpoint) as (mnt, _upper):
        (mnt / "upper").write_text("u")
        (mnt / "upper_target").write_text("t")
        fds = {
            name: os.open(mnt / name, os.O_RDONLY)
            for name in ("lower", "upper", "over_me", "upper_target", "h1")
        }
        try:
            (mnt / "lower").unlink()
            (mnt / "upper").unlink()
            os.rename(mnt / "source", mnt / "over_me")  # a lower file renamed over
            os.rename(mnt / "over_me", mnt / "upper_target")  # an upper file renamed over
            (mnt / "h1").unlink()
            nlinks = {name: os.fstat(fd).st_nlink for name, fd in fds.items()}
            assert nlinks == {"lower": 0, "upper": 0, "over_me": 0, "upper_target": 0, "h1": 1}
            assert os.pread(fds["lower"], 10, 0) == b"l"  # still readable
            assert (mnt / "h2").stat().st_nlink == 1
        finally:
            for fd in fds.values():
                os.close(fd)


def _long_name_errors(mnt: Path, long: str) -> dict[str, int]:
    """The errno of every operation on a name of more than 255 bytes (0: it worked)."""
    operations: dict[str, Callable[[], object]] = {
        "stat": lambda: os.lstat(mnt / long),
        "open": lambda: os.close(os.open(mnt / long, os.O_RDONLY)),
        "create": lambda: os.close(os.open(mnt / long, os.O_CREAT | os.O_WRONLY, 0o644)),
        "mknod": lambda: os.mknod(mnt / long, stat.S_IFIFO | 0o644),
        "mkdir": lambda: os.mkdir(mnt / long),
        "symlink": lambda: os.symlink("target", mnt / long),
        "link": lambda: os.link(mnt / "f", mnt / long),
        "rename_from": lambda: os.rename(mnt / long, mnt / "g"),
        "rename_to": lambda: os.rename(mnt / "f", mnt / long),
        "unlink": lambda: os.unlink(mnt / long),
        "rmdir": lambda: os.rmdir(mnt / long),
        "chmod": lambda: os.chmod(mnt / long, 0o600),
        "chown": lambda: os.chown(mnt / long, 0, 0),
        "truncate": lambda: os.truncate(mnt / long, 0),
        "utime": lambda: os.utime(mnt / long),
        "setxattr": lambda: os.setxattr(mnt / long, "user.x", b"1"),
        "getxattr": lambda: os.getxattr(mnt / long, "user.x"),
        "listxattr": lambda: os.listxattr(mnt / long),
        "removexattr": lambda: os.removexattr(mnt / long, "user.x"),
        "inside": lambda: os.lstat(mnt / long / "x"),
    }
    errors: dict[str, int] = {}
    for name, operation in operations.items():
        try:
            operation()
            errors[name] = 0
        except OSError as error:
            assert error.errno is not None
            errors[name] = error.errno
    return errors


@pytest.mark.parametrize("length", [256, 1024])
def test_names_longer_than_255_bytes(
    length: int, tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path
) -> None:
    """ENAMETOOLONG for every operation on a longer name (before the fix lookups said
    ENOENT), as local filesystems and kernel overlayfs answer; 255 bytes still work."""
    layers = tmp_layers({"f": "f", "d/x": "x"})
    with writable(layers, tmp_path, mountpoint) as (mnt, upper):
        errors = _long_name_errors(mnt, "n" * length)
        assert errors == dict.fromkeys(errors, errno.ENAMETOOLONG)
        longest = "m" * 255
        (mnt / longest).write_text("ok")
        os.rename(mnt / longest, mnt / "d" / longest)
        assert (mnt / "d" / longest).read_text() == "ok"
        assert (upper / "d" / longest).read_text() == "ok"

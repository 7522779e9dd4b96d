"""Minimal reproductions of bugs the reliability runs found (each names the run that found it)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers
from tests.support.mounts import abort_connection, unionfs_mounted

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


@pytest.mark.parametrize(
    "make",
    [
        lambda path: path.write_text(""),
        lambda path: os.mkdir(path),
        lambda path: os.symlink("b", path),
        lambda path: os.mknod(path),
        lambda path: os.link(path.parent / "mine", path),
        lambda path: os.rename(path.parent / "mine", path),
    ],
    ids=["create", "mkdir", "symlink", "mknod", "link", "rename"],
)
def test_names_starting_wh_cannot_be_made(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path, make: Callable[[Path], object]
) -> None:
    """Found by test_hostile.py::test_whiteout_tricks: creating ``.wh.b`` through the mount
    failed (the new name is hidden) but left ``.wh.b`` in the upper, which then hid ``b``;
    ``.wh..wh..opq`` hid every lower file in the directory."""
    (lower,) = tmp_layers({"b": "b\n", "d/e": "e\n"})
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir):
        (mountpoint / "mine").write_text("mine\n")
        for name in (".wh.b", ".wh..wh..opq", ".wh.d"):
            with pytest.raises(OSError) as raised:
                make(mountpoint / name)
            assert raised.value.errno == errno.EINVAL
        assert sorted(os.listdir(mountpoint)) == ["b", "d", "mine"]
    assert sorted(os.listdir(upper)) == ["mine"]


@pytest.mark.parametrize("source", ["lower", "upper"])
def test_rename_to_a_255_byte_name(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path, source: str
) -> None:
    """Found by test_hostile.py::test_strange_names: a rename to a name longer than 251 bytes
    was done in the upper but answered ENAMETOOLONG (removing a possible ``.wh.NAME`` failed
    afterwards), leaving the daemon's inode table out of step with the upper."""
    (lower,) = tmp_layers({"lower": "lower\n"})
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    long_name = "z" * 255
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir):
        (mountpoint / "upper").write_text("upper\n")
        os.rename(mountpoint / source, mountpoint / long_name)
        assert (mountpoint / long_name).read_text() == f"{source}\n"
        assert sorted(os.listdir(mountpoint)) == sorted({"lower", "upper", long_name} - {source})
        os.rename(mountpoint / long_name, mountpoint / "back")
        assert (mountpoint / "back").read_text() == f"{source}\n"


def test_copy_up_below_1000_directories(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """Found by test_hostile.py::test_depth_1000: copying up a file 1000 directories deep
    recursed once per directory (copyup.ensure_dir) and hit Python's recursion limit: EIO."""
    (lower,) = tmp_layers({"top": "top\n"})
    fd = os.open(lower, os.O_DIRECTORY)
    for _ in range(1000):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir):
        fd = os.open(mountpoint, os.O_DIRECTORY)
        try:
            for _ in range(1000):
                child = os.open("d", os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
            written = os.open("bottom", os.O_WRONLY | os.O_APPEND, dir_fd=fd)  # copies up
            try:
                os.write(written, b"deep\n")
            finally:
                os.close(written)
            os.mkdir("new", dir_fd=fd)
        finally:
            os.close(fd)
    deep = Path(upper, *(["d"] * 1000))
    assert (deep / "bottom").read_bytes() == b"deep\n"
    assert (deep / "new").is_dir()
    assert Path(lower, *(["d"] * 1000), "bottom").read_bytes() == b"", "the lower was changed"


def test_copy_up_of_a_directory_swapped_for_a_symlink(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """Found by test_hostile.py::test_symlink_swapped_in_for_a_directory_while_in_use: when a
    lower directory the kernel still caches is replaced by a symlink, a copy-up below it made
    the upper directory from the symlink's lstat: a directory with mode 0777 (permissions
    widened). The copy-up must refuse a source that is no longer a directory."""
    (lower,) = tmp_layers({"d/sub/file": "inside\n"})
    os.chmod(lower / "d", 0o750)
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir):
        assert (mountpoint / "d" / "sub" / "file").read_text() == "inside\n"
        os.rename(lower / "d", lower / "d.old")
        os.symlink("/", lower / "d")
        with pytest.raises(OSError):
            os.mkdir(mountpoint / "d" / "new")
        st = os.lstat(upper / "d") if (upper / "d").exists() else None
        assert st is None or stat.S_IMODE(st.st_mode) == 0o750, oct(st.st_mode)


def test_xattrs_of_an_unlinked_open_file(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """Found by test_load.py::test_stress_ng_file_stressors (stress-ng --hdd): the kernel asks
    for security.capability on every write; for a file unlinked while open the daemon hit an
    IndexError (no upper, no lower: tree.top_location) and answered EIO with a traceback;
    and close() of such a file returned EIO (the SETATTR the kernel sends got ENOENT)."""
    (lower,) = tmp_layers({"x": "x\n"})
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir):
        fd = os.open(mountpoint / "scratch", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            os.unlink(mountpoint / "scratch")
            with pytest.raises(OSError) as raised:
                os.getxattr(fd, "security.capability")
            assert raised.value.errno == errno.ENODATA
            assert os.listxattr(fd) == []
            assert os.write(fd, b"data") == 4
            assert os.pread(fd, 4, 0) == b"data"
            os.fchmod(fd, 0o640)  # a setattr on the unlinked file
            assert os.fstat(fd).st_mode & 0o777 == 0o640
        except BaseException:
            os.close(fd)
            raise
        # The kernel sends a SETATTR (times) at close: it failed with ENOENT, so close()
        # returned EIO (found by the same stress-ng run).
        os.close(fd)


@pytest.mark.parametrize("how", ["unlink", "rename"])
def test_oci_whiteout_of_a_255_byte_name_changes_nothing(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path, how: str
) -> None:
    """Found by test_hostile.py::test_strange_names: with --whiteout-format=oci, deleting (or
    renaming away) a changed lower file with a 255-byte name needs ``.wh.`` + 255 bytes, which
    cannot exist. The call failed with ENAMETOOLONG but had already moved the upper copy into
    the work area (lost at the next mount) or renamed it (the lower file came back)."""
    name = "n" * 255
    (lower,) = tmp_layers({name: "lower\n"})
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    args = ["--whiteout-format", "oci"]
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, extra_args=args):
        (mountpoint / name).write_text("changed\n")
        with pytest.raises(OSError) as raised:
            if how == "unlink":
                os.unlink(mountpoint / name)
            else:
                os.rename(mountpoint / name, mountpoint / "short")
        assert raised.value.errno == errno.ENAMETOOLONG
        assert sorted(os.listdir(mountpoint)) == [name]
        assert (mountpoint / name).read_text() == "changed\n"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, extra_args=args):
        assert (mountpoint / name).read_text() == "changed\n"


@pytest.mark.timeout(120)
def test_concurrent_o_trunc_opens_keep_the_size_right(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """Two threads open(O_TRUNC) + write + close one file at once. With FUSE's atomic O_TRUNC
    the kernel truncated its own view a second time, after dropping the inode lock and without
    telling the daemon: another thread's flushed data stayed in the upper file while the
    kernel showed the file empty (the write-back cache then never takes the size back).
    unionfs turns atomic O_TRUNC off, so the kernel sends that truncate as SETATTR."""
    import random
    import threading

    (lower,) = tmp_layers({"keep": "k"})
    upper, log = tmp_path / "upper", tmp_path / "daemon.log"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=tmp_path / "work", log=log):
        target = mountpoint / "f"
        target.write_bytes(b"start")
        mismatches = []
        for round_number in range(60):

            def writer(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(3):
                    fd = os.open(target, os.O_WRONLY | os.O_TRUNC)
                    try:
                        os.write(fd, b"x" * rng.choice([0, 10, 5000]))
                    finally:
                        os.close(fd)

            threads = [
                threading.Thread(target=writer, args=(round_number * 2 + n,)) for n in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seen, stored = target.stat().st_size, (upper / "f").stat().st_size
            if seen != stored:
                mismatches.append((round_number, seen, stored))
    assert not mismatches, f"kernel size != upper size (round, seen, stored): {mismatches}"
    assert "atomic O_TRUNC turned off" in log.read_text()


@pytest.mark.root
def test_close_reports_data_lost_when_the_daemon_dies(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """Found by the crash loop: a file written and closed (not fsync'd) just before the SIGKILL
    was empty, or exactly 1 MiB (one write() chunk) short, after the remount.

    With the write-back cache a write() only fills the kernel's page cache. When the kernel
    writes it back (its flusher, a sync, or close() itself) after the daemon died, it drops the
    pages without recording an error (fs/fuse/file.c, fuse_send_writepage: "Fails on broken
    connection only"), so close() returned 0 for data that never reached the upper. A FLUSH
    request, which fails with ENOTCONN on a dead connection, is the only thing left that can
    report it: the daemon must answer FLUSH, not ENOSYS (after which the kernel stops sending
    it). Aborting the connection stands for the daemon's death; syncfs for the flusher.
    """
    (lower,) = tmp_layers({})
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    libc = ctypes.CDLL(None, use_errno=True)
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir):
        (mountpoint / "first").write_bytes(b"")  # one close: the kernel learns FLUSH's answer
        fd = os.open(mountpoint / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            assert abort_connection(mountpoint)
            os.write(fd, b"data" * 25_000)  # fills the page cache only: succeeds
            libc.syncfs(fd)  # the write-back meets the dead connection: pages dropped
        finally:
            with pytest.raises(OSError) as raised:
                os.close(fd)
    assert raised.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    assert (upper / "new").stat().st_size == 0  # the data really is lost

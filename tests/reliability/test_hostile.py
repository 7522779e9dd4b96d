"""Hostile layers: layers built to attack the daemon.

Nothing outside a layer may be read or written (canary files outside every layer keep their
content, mtime and atime: their atime is set older than their mtime, so with relatime any read
would move it), the daemon never crashes (the mount helper fails a test on a ``Traceback`` in the
daemon's log) and its memory stays bounded (VmRSS from /proc).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from tests.support import DIR, Symlink, TmpLayers, opaque_xattr_name
from tests.support.mounts import pid_from_log, unionfs_mounted

pytestmark = pytest.mark.timeout(180)


class Canary:
    """Files outside every layer; ``check`` fails if any was read, written or replaced."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        for name in ("secret", "sub", "file", "f"):
            (directory / name).write_text(f"CANARY {name}\n")
        past = time.time() - 3600
        for path in [*directory.iterdir(), directory]:
            os.utime(path, (past - 100, past))  # atime < mtime: relatime would update it
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[float, float, bytes | None]]:
        state: dict[str, tuple[float, float, bytes | None]] = {}
        for path in [self.directory, *sorted(self.directory.iterdir())]:
            st = os.lstat(path)
            # Read the content without touching the atime.
            data = None
            if stat.S_ISREG(st.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
                try:
                    data = os.read(fd, 1 << 16)
                finally:
                    os.close(fd)
            state[path.name] = (st.st_atime, st.st_mtime, data)
        return state

    def check(self) -> None:
        assert self.snapshot() == self.before, "something outside the layers was touched"


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.root
def test_symlinks_never_lead_out(tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path) -> None:
    canary = Canary(tmp_path / "canary")
    (lower,) = tmp_layers(
        {
            "abs": Symlink(str(canary.directory / "secret")),
            "absdir": Symlink(str(canary.directory)),
            "up": Symlink("../../../../../../../.." + str(canary.directory)),
            "chain1": Symlink("chain2"),
            "chain2": Symlink("chain3"),
            "chain3": Symlink(str(canary.directory / "file")),
            "loop1": Symlink("loop2"),
            "loop2": Symlink("loop1"),
            "self": Symlink("self"),
            "proc": Symlink("/proc/self/root" + str(canary.directory)),
            "procfd": Symlink("/proc/self/cwd"),
            "dir/inner": Symlink("../../.."),
            "dir/file": "inside\n",
        }
    )
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    links = ["abs", "absdir", "up", "chain1", "chain2", "chain3", "loop1", "loop2", "self"]
    links += ["proc", "procfd", "dir/inner"]
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        for name in links:
            path = mountpoint / name
            assert stat.S_ISLNK(os.lstat(path).st_mode)
            assert os.readlink(path) == os.readlink(lower / name)
        # Operations the daemon performs itself must act on the link, never its target.
        for name in links:
            path = mountpoint / name
            os.chown(path, 1234, 1234, follow_symlinks=False)  # copy-up of the symlink
            assert os.lstat(path).st_uid == 1234
            os.utime(path, (1, 1), follow_symlinks=False)
            # The VFS refuses user.* xattrs on symlinks before the daemon sees the request.
            with pytest.raises(OSError) as refused:
                os.setxattr(path, "user.x", b"1", follow_symlinks=False)
            assert refused.value.errno == errno.EPERM
            # trusted.* reaches the daemon, which must set it on the link's upper copy.
            os.setxattr(path, "trusted.x", b"1", follow_symlinks=False)
            assert "trusted.x" in os.listxattr(path, follow_symlinks=False)
            assert os.getxattr(upper / name, "trusted.x", follow_symlinks=False) == b"1"
        # A loop through the mount ends in ELOOP in the kernel, never inside the daemon.
        for name in ("loop1", "self"):
            with pytest.raises(OSError) as raised:
                (mountpoint / name).read_text()
            assert raised.value.errno == errno.ELOOP
        os.rename(mountpoint / "abs", mountpoint / "abs2")
        os.unlink(mountpoint / "chain3")
        os.symlink(str(canary.directory / "f"), mountpoint / "made")
        for name in ["abs2", "absdir", "up", "chain1", "proc", "dir/inner", "made"]:
            assert stat.S_ISLNK(os.lstat(upper / name).st_mode), name
        canary.check()
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        assert sorted(os.listdir(mountpoint / "dir")) == ["file", "inner"]
        canary.check()


@pytest.mark.root
def test_redirects_through_symlinks_stay_inside(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """A hostile upper's redirect xattrs: climbing, absolute into a symlinked dir."""
    canary = Canary(tmp_path / "canary")
    (lower,) = tmp_layers(
        {"link": Symlink("/"), "real/a": "a\n", "esc": Symlink(str(canary.directory))}
    )
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    upper.mkdir()
    for name, value in [
        ("r1", b"/link" + str(canary.directory).encode()),
        ("r2", b"/../../../" + str(canary.directory).encode().lstrip(b"/")),
        ("r3", b"/esc"),
        ("r4", b"../real"),
        ("r5", b"/real"),
    ]:
        (upper / name).mkdir()
        os.setxattr(upper / name, "trusted.overlay.redirect", value)
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        for name in ("r1", "r2", "r3", "r4"):
            assert os.listdir(mountpoint / name) == [], name
        assert os.listdir(mountpoint / "r5") == ["a"]
        os.rename(mountpoint / "r1", mountpoint / "r1b")
        (mountpoint / "r3" / "new").write_text("new\n")
        canary.check()


@pytest.mark.root
def test_symlink_swapped_in_for_a_directory_while_in_use(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    canary = Canary(tmp_path / "canary")
    (lower,) = tmp_layers({"d/sub/file": "inside\n", "d/f": "inside f\n", "keep": "keep\n"})
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    for attempt in ("live", "remounted"):
        with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
            if attempt == "live":
                assert (mountpoint / "d" / "sub" / "file").read_text() == "inside\n"
                os.mkdir(mountpoint / "u")
                (mountpoint / "u" / "x").write_text("x\n")
                # The lower d and the upper u become symlinks to the canary behind our back.
                os.rename(lower / "d", lower / "d.old")
                os.symlink(canary.directory, lower / "d")
                os.rename(upper / "u", upper / "u.old")
                os.symlink(canary.directory, upper / "u")
            if attempt == "remounted":
                # Through a fresh mount the swapped entries are plain symlinks (a client that
                # follows one resolves it in its own namespace: nothing the daemon reads).
                for name in ("d", "u"):
                    assert stat.S_ISLNK(os.lstat(mountpoint / name).st_mode)
                    assert os.readlink(mountpoint / name) == str(canary.directory)
                os.chown(mountpoint / "d", 4321, 4321, follow_symlinks=False)
                os.rename(mountpoint / "u", mountpoint / "u2")
                assert sorted(os.listdir(mountpoint)) == ["d", "d.old", "keep", "u.old", "u2"]
            else:
                # The kernel still holds d and u as directories: requests below them reach
                # the daemon, which must not follow the new symlinks.
                seen: list[str] = []
                for path in [
                    mountpoint / "d" / "sub" / "file",
                    mountpoint / "d" / "f",
                    mountpoint / "d" / "secret",
                    mountpoint / "u" / "secret",
                    mountpoint / "u" / "x",
                ]:
                    try:
                        seen.append(path.read_text())
                    except OSError:
                        seen.append("error")
                for directory in ("d", "u"):
                    try:
                        seen.extend(os.listdir(mountpoint / directory))
                    except OSError:
                        pass
                assert not any("CANARY" in text for text in seen), seen
                assert "secret" not in seen
                for action in (
                    lambda: (mountpoint / "d" / "new").write_text("new\n"),
                    lambda: (mountpoint / "u" / "new").write_text("new\n"),
                    lambda: (mountpoint / "u" / "secret").write_text("overwritten\n"),
                    lambda: (mountpoint / "d" / "f").write_text("overwritten\n"),
                    lambda: os.unlink(mountpoint / "u" / "secret"),
                    lambda: os.unlink(mountpoint / "d" / "secret"),
                    lambda: os.mkdir(mountpoint / "d" / "sub" / "m"),
                    lambda: os.rename(mountpoint / "d" / "f", mountpoint / "d" / "g"),
                    lambda: os.rename(mountpoint / "u" / "x", mountpoint / "u" / "secret"),
                ):
                    try:
                        action()
                    except OSError:
                        pass
            assert (mountpoint / "keep").read_text() == "keep\n"
            canary.check()


@pytest.mark.root
def test_strange_names(tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path) -> None:
    names = [b"new\nline", b"\xff\xfe not utf-8", b"tab\there", b"x" * 255, b"\x01\x7f", b" "]
    lower = tmp_path / "lower"
    lower.mkdir()
    for name in names:
        with open(os.path.join(bytes(lower), name), "wb") as file:
            file.write(name)
    os.mkdir(os.path.join(bytes(lower), b"d\n\xff"))
    for whiteout_format in ("overlay", "oci"):
        base = tmp_path / whiteout_format
        upper, workdir, log = base / "upper", base / "work", base / "daemon.log"
        with unionfs_mounted(
            [lower],
            mountpoint,
            upper=upper,
            workdir=workdir,
            log=log,
            extra_args=["--whiteout-format", whiteout_format],
        ):
            m = bytes(mountpoint)
            assert sorted(os.listdir(m)) == sorted([*names, b"d\n\xff"])
            for name in names:
                with open(os.path.join(m, name), "rb") as file:
                    assert file.read() == name
            # copy-up, rename to another strange name, delete (a whiteout of a 255-byte
            # name cannot be an OCI .wh. file: that must fail cleanly, not crash)
            with open(os.path.join(m, names[0]), "ab") as file:
                file.write(b"+")
            os.rename(os.path.join(m, names[1]), os.path.join(m, b"\xfe" * 255))
            os.rename(os.path.join(m, b"d\n\xff"), os.path.join(m, b"D\xff\n"))
            try:
                os.unlink(os.path.join(m, names[3]))
            except OSError as error:
                assert whiteout_format == "oci" and error.errno == errno.ENAMETOOLONG
            with pytest.raises(OSError) as raised:
                open(os.path.join(m, b"y" * 256), "wb").close()
            assert raised.value.errno == errno.ENAMETOOLONG
            listing = sorted(os.listdir(m))
            assert b"\xfe" * 255 in listing and b"D\xff\n" in listing
        with unionfs_mounted(
            [lower],
            mountpoint,
            upper=upper,
            workdir=workdir,
            log=log,
            extra_args=["--whiteout-format", whiteout_format],
        ):
            assert sorted(os.listdir(bytes(mountpoint))) == listing
            with open(os.path.join(bytes(mountpoint), names[0]), "rb") as file:
                assert file.read() == names[0] + b"+"


@pytest.mark.root
def test_whiteout_tricks(tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path) -> None:
    base, top = tmp_layers(
        {"a": "a\n", "b": "b\n", "..x": "dots\n", "d/e": "e\n"},
        {
            ".wh..": "",
            ".wh...": "",
            ".wh.": "",
            ".wh..wh..opq": "",  # an opaque marker in a layer root: ignored, as the kernel does
            ".wh.a": "",
            "d/.wh..wh..opq": "",
            "d/mine": "mine\n",
            ".wh..wh.b": "",  # hides ".wh.b", which is hidden anyway
        },
    )
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    with unionfs_mounted([base, top], mountpoint, upper=upper, workdir=workdir, log=log):
        assert sorted(os.listdir(mountpoint)) == ["..x", "b", "d"]
        assert sorted(os.listdir(mountpoint / "d")) == ["mine"]
        assert (mountpoint / "b").read_text() == "b\n"
        assert os.stat(mountpoint / "..").st_ino == os.stat(mountpoint.parent).st_ino
        # Names that would be whiteouts cannot be made, looked up or renamed to.
        for name in (".wh.b", ".wh..wh..opq", ".wh..", ".wh.d"):
            with pytest.raises(OSError):
                (mountpoint / name).write_text("")
            with pytest.raises(OSError):
                os.mkdir(mountpoint / name)
            with pytest.raises(OSError):
                os.rename(mountpoint / "b", mountpoint / name)
            assert not (mountpoint / name).exists()
        assert sorted(os.listdir(mountpoint)) == ["..x", "b", "d"]
        assert (mountpoint / "b").read_text() == "b\n"
        os.setxattr(mountpoint / "d", "user.note", b"1")
        # Overlay xattrs set through the mount are refused or escaped (stored as
        # *.overlay.overlay.*, as Linux >= 6.7 does): they never change the view.
        (mountpoint / "dir2").mkdir()
        for path, name, value in [
            (mountpoint / "d", opaque_xattr_name(), b"y"),
            (mountpoint / "dir2", "trusted.overlay.redirect", b"/d"),
            (mountpoint / "b", "trusted.overlay.whiteout", b"y"),
        ]:
            try:
                os.setxattr(path, name, value)
            except OSError:
                pass
    with unionfs_mounted([base, top], mountpoint, upper=upper, workdir=workdir, log=log):
        assert sorted(os.listdir(mountpoint)) == ["..x", "b", "d", "dir2"]
        assert sorted(os.listdir(mountpoint / "d")) == ["mine"]
        assert os.listdir(mountpoint / "dir2") == []
        assert (mountpoint / "b").read_text() == "b\n"


@pytest.mark.root
@pytest.mark.timeout(240)
def test_huge_directory_bounded_memory(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    (lower,) = tmp_layers({"big": DIR, "other": "x\n"})
    count = 100_000
    fd = os.open(lower / "big", os.O_DIRECTORY)
    try:
        for index in range(count):
            os.close(os.open(f"f{index:06d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        pid = pid_from_log(log)
        assert pid is not None
        before = vm_rss_kib(pid)
        started = time.monotonic()
        names = os.listdir(mountpoint / "big")
        elapsed = time.monotonic() - started
        assert len(names) == count
        os.unlink(mountpoint / "big" / "f000000")
        (mountpoint / "big" / "new").write_text("new\n")
        assert (mountpoint / "big" / "f099999").exists()
        for _ in range(2):
            assert len(os.listdir(mountpoint / "big")) == count
        after = vm_rss_kib(pid)
        print(f"listing {count} entries took {elapsed:.1f} s; RSS {before} -> {after} KiB")
        assert after - before < 400_000, f"RSS grew by {(after - before) // 1024} MiB"
        # Forgetting the entries gives the memory back to the allocator (not necessarily to
        # the OS), so a second round of listings does not grow it again much.
        again = vm_rss_kib(pid)
        assert again - after < 50_000


@pytest.mark.root
def test_depth_1000(tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path) -> None:
    (lower,) = tmp_layers({"top": "top\n"})
    depth = 1000
    fd = os.open(lower, os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    with os.fdopen(os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
        f.write("bottom\n")
    os.close(fd)
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"

    def walk_down(root: Path, levels: int = depth) -> int:
        fd = os.open(root, os.O_DIRECTORY)
        for _ in range(levels):
            child = os.open("d", os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd

    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        walked = sum(1 for _ in os.walk(mountpoint))
        assert walked == depth + 1
        fd = walk_down(mountpoint)
        try:
            with os.fdopen(os.open("bottom", os.O_RDONLY, dir_fd=fd)) as f:
                assert f.read() == "bottom\n"
            # Copy-up of the bottom file copies up all 1000 directories above it.
            with os.fdopen(os.open("bottom", os.O_WRONLY | os.O_APPEND, dir_fd=fd), "w") as f:
                f.write("more\n")
            os.mkdir("new", dir_fd=fd)
        finally:
            os.close(fd)
        os.rename(mountpoint / "d", mountpoint / "moved")
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        fd = walk_down(mountpoint / "moved", depth - 1)
        try:
            with os.fdopen(os.open("bottom", os.O_RDONLY, dir_fd=fd)) as f:
                assert f.read() == "bottom\nmore\n"
            assert sorted(os.listdir(fd)) == ["bottom", "new"]
        finally:
            os.close(fd)


@pytest.mark.root
def test_ten_thousand_hard_links(tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path) -> None:
    (lower,) = tmp_layers({"links/original": "shared\n"})
    for index in range(10_000):
        os.link(lower / "links" / "original", lower / "links" / f"l{index}")
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        names = os.listdir(mountpoint / "links")
        assert len(names) == 10_001
        assert os.stat(mountpoint / "links" / "l5000").st_nlink == 10_001
        (mountpoint / "links" / "l1").write_text("changed\n")
        assert (mountpoint / "links" / "l1").read_text() == "changed\n"
        # Other names show the old or the new content (kernel overlayfs without index breaks
        # the link), never anything else.
        assert (mountpoint / "links" / "l2").read_text() in ("shared\n", "changed\n")
        os.unlink(mountpoint / "links" / "l3")
        os.link(mountpoint / "links" / "l4", mountpoint / "links" / "extra")
        assert len(os.listdir(mountpoint / "links")) == 10_001
    assert (lower / "links" / "original").read_text() == "shared\n"


@pytest.mark.root
def test_one_tib_sparse_file(tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path) -> None:
    (lower,) = tmp_layers({"x": "x\n"})
    size = 1 << 40
    with open(lower / "sparse", "wb") as file:
        file.write(b"head")
        file.seek(size - 4)
        file.write(b"tail")
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        path = mountpoint / "sparse"
        assert os.stat(path).st_size == size
        with open(path, "rb") as file:
            file.seek(size - 4)
            assert file.read() == b"tail"
            file.seek(size // 2)
            assert file.read(4096) == b"\0" * 4096
        started = time.monotonic()
        with open(path, "ab") as file:  # copy-up, then one more byte
            file.write(b"!")
        elapsed = time.monotonic() - started
        assert elapsed < 20, f"copy-up of a 1 TiB sparse file took {elapsed:.1f} s"
        st = os.stat(upper / "sparse")
        assert st.st_size == size + 1
        assert st.st_blocks * 512 < 1 << 20, "holes were not kept"
        with open(path, "rb") as file:
            assert file.read(4) == b"head"
            file.seek(size - 4)
            assert file.read() == b"tail!"
    shutil.rmtree(upper)

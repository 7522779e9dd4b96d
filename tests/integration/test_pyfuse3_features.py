"""What the patched pyfuse3 (scripts/pyfuse3) changes, seen through real mounts.

Each test asserts the behaviour of the build it runs on: the patched one where
``fusefeatures`` says the feature is there, the stock fallback otherwise (so the same test
proves both, and ``scripts/test --stock`` runs the fallbacks). Requests are counted from the
daemon's ``--debug`` log (one line per answered request: ``name(args) -> answer``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.support import Symlink, TmpLayers
from tests.support.mounts import default_log, unionfs_mounted
from unionfs import fusefeatures

pytestmark = pytest.mark.timeout(120)

REQUEST = re.compile(r" unionfs\.operations: (\w+)\(")
MiB = 1 << 20


def requests(log: Path, since: int = 0) -> Counter[str]:
    """Handler calls logged after byte ``since`` of the log."""
    with open(log, "rb") as text:
        text.seek(since)
        lines = text.read().decode("utf-8", "replace")
    return Counter(REQUEST.findall(lines))


def log_size(log: Path) -> int:
    return log.stat().st_size


def sparse_file(path: Path, size: int, data_at: list[int]) -> None:
    """A file of ``size`` bytes with 64 KiB of data at each offset, holes elsewhere."""
    with open(path, "wb") as out:
        out.truncate(size)
        for offset in data_at:
            out.seek(offset)
            out.write(b"x" * 65536)


@pytest.mark.parametrize("writeback", ["1", "0"])
def test_read_only_closes_send_no_flush_and_writable_ones_do(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path, writeback: str
) -> None:
    """noflush on read-only opens. The kernel ignores it while the write-back cache is on
    (fs/fuse/file.c, fuse_flush: FOPEN_NOFLUSH counts only without writeback_cache), so
    only -o writeback=0 mounts save the FLUSH."""
    layers = tmp_layers({"file": "lower data"})
    log = default_log(mountpoint)
    with unionfs_mounted(
        layers,
        mountpoint,
        upper=tmp_path / "up",
        workdir=tmp_path / "work",
        options=[f"writeback={writeback}"],
        extra_args=["--debug"],
    ) as mnt:
        start = log_size(log)
        for _ in range(5):
            assert (mnt / "file").read_text() == "lower data"
        read_only = requests(log, start)
        start = log_size(log)
        for index in range(3):
            (mnt / "file").write_text(f"new {index}")
        writable = requests(log, start)
    assert read_only["open"] == 5
    if fusefeatures.has("fileinfo_flags") and writeback == "0":
        assert read_only["flush"] == 0, "noflush on read-only opens"
    else:
        assert read_only["flush"] == 5, "stock pyfuse3: every close sends FLUSH"
    assert writable["flush"] >= 3, "a writable close keeps its FLUSH (data-loss reporting)"


def test_directory_listings_are_cached_by_the_kernel(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    names = {f"d/f{index:04d}": "" for index in range(300)}
    layers = tmp_layers(names, {"d/upper-only": "x"})
    log = default_log(mountpoint)
    with unionfs_mounted(
        layers,
        mountpoint,
        upper=tmp_path / "up",
        workdir=tmp_path / "work",
        extra_args=["--debug"],
    ) as mnt:
        expected = sorted([f"f{index:04d}" for index in range(300)] + ["upper-only"])
        assert sorted(os.listdir(mnt / "d")) == expected
        start = log_size(log)
        for _ in range(5):
            assert sorted(os.listdir(mnt / "d")) == expected
        again = requests(log, start)
        (mnt / "d" / "new").write_text("")  # a change through the mount: listed at once
        assert "new" in os.listdir(mnt / "d")
        os.unlink(mnt / "d" / "f0000")
        assert "f0000" not in os.listdir(mnt / "d")
    if fusefeatures.has("no_opendir"):
        assert again["opendir"] == 0 and again["releasedir"] == 0
        assert again["readdir"] == 0, "the kernel serves cached listings itself"
    elif fusefeatures.has("opendir_fileinfo"):
        assert again["opendir"] == 5 and again["readdir"] == 0
    else:
        assert again["opendir"] == 5 and again["readdir"] >= 5


def test_listing_without_opendir_survives_a_rewind_and_seekdir(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """Offsets handed out without a handle name their snapshot: telldir/seekdir and rewinddir
    (through Python's os.scandir twice and a C-level seek via ls -U) give every name once."""
    layers = tmp_layers({f"d/e{index:05d}": "" for index in range(2000)})
    with unionfs_mounted(
        layers, mountpoint, upper=tmp_path / "up", workdir=tmp_path / "work"
    ) as mnt:
        fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            first = subprocess.run(
                ["ls", "-U", "-a", f"/proc/self/fd/{fd}/"],
                pass_fds=(fd,),
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
        finally:
            os.close(fd)
        assert len(first) == len(set(first)) == 2002
        with os.scandir(mnt / "d") as entries:
            second = [entry.name for entry in entries]
        assert sorted(second) == sorted(set(first) - {".", ".."})


def test_symlink_targets_are_cached_by_the_kernel(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layers = tmp_layers({"target": "t", "link": Symlink("target")})
    log = default_log(mountpoint)
    with unionfs_mounted(layers, mountpoint, extra_args=["--debug"]) as mnt:
        start = log_size(log)
        for _ in range(10):
            assert os.readlink(mnt / "link") == "target"
        counted = requests(log, start)
    # CACHE_SYMLINKS: the patched build asks for it at INIT, stock through fuseconn.
    assert counted["readlink"] <= 1


def test_a_slow_copy_up_does_not_stall_other_requests(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """A big lower file's copy-up runs in a worker thread (a deferred request on the patched
    loop, a task on stock): reads of other files go on meanwhile. Shown by order, not time:
    a reader thread completes reads while the copy-up's open() has not returned yet."""
    layers = tmp_layers({"small": "s"})
    with open(layers[0] / "big", "wb") as out:
        chunk = os.urandom(MiB)
        for _ in range(256):
            out.write(chunk)
    with unionfs_mounted(
        layers, mountpoint, upper=tmp_path / "up", workdir=tmp_path / "work"
    ) as mnt:
        opened = threading.Event()
        reads_while_copying = []

        def copy_up() -> None:
            with open(mnt / "big", "r+b") as file:  # copies 256 MiB up
                opened.set()
                file.write(b"x")

        writer = threading.Thread(target=copy_up)
        writer.start()
        try:
            for _ in range(2000):
                if opened.is_set():
                    break
                fd = os.open(mnt / "small", os.O_RDONLY | os.O_DIRECT)
                try:
                    assert os.pread(fd, 4096, 0) == b"s"
                finally:
                    os.close(fd)
                if not opened.is_set():
                    reads_while_copying.append(1)
        finally:
            writer.join()
        assert (mnt / "big").read_bytes()[:1] == b"x"
    assert len(reads_while_copying) >= 2, "reads were served while the copy-up ran"


# fallocate and lseek ---------------------------------------------------------------------
needs_fallocate = pytest.mark.skipif(
    not fusefeatures.has("fallocate"),
    reason="stock pyfuse3 3.5.0 has no fallocate handler (test_fallocate_is_eopnotsupp_on_stock)",
)
needs_lseek = pytest.mark.skipif(
    not fusefeatures.has("lseek"),
    reason="stock pyfuse3 3.5.0 has no lseek handler: SEEK_HOLE sees one hole at the end",
)


@pytest.mark.skipif(fusefeatures.has("fallocate"), reason="the patched build has fallocate")
def test_fallocate_is_eopnotsupp_on_stock(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layers = tmp_layers({})
    with unionfs_mounted(
        layers, mountpoint, upper=tmp_path / "up", workdir=tmp_path / "work"
    ) as mnt:
        fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with pytest.raises(OSError) as raised:
                _fallocate(fd, 0, 0, MiB)
            assert raised.value.errno == errno.EOPNOTSUPP
        finally:
            os.close(fd)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


@needs_fallocate
def test_fallocate_modes_through_the_mount(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layers = tmp_layers({"lower": b"L" * (3 * 65536)})
    upper = tmp_path / "up"
    with unionfs_mounted(layers, mountpoint, upper=upper, workdir=tmp_path / "work") as mnt:
        # mode 0 (fallocate(1), posix_fallocate): size grows, blocks are allocated
        subprocess.run(["fallocate", "-l", "1MiB", str(mnt / "new")], check=True)
        st = os.stat(mnt / "new")
        assert st.st_size == MiB and st.st_blocks * 512 >= MiB
        fd = os.open(mnt / "posix", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, 2 * MiB)
            assert os.fstat(fd).st_size == 2 * MiB
            # KEEP_SIZE: blocks beyond the end, size unchanged
            _fallocate(fd, FALLOC_FL_KEEP_SIZE, 2 * MiB, MiB)
            assert os.fstat(fd).st_size == 2 * MiB
        finally:
            os.close(fd)
        assert os.stat(upper / "posix").st_blocks * 512 >= 3 * MiB

        # on a lower file: copied up first, the lower layer never changes
        fd = os.open(mnt / "lower", os.O_RDWR)
        try:
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 65536)
            _fallocate(fd, FALLOC_FL_ZERO_RANGE, 2 * 65536, 4096)
        finally:
            os.close(fd)
        data = (mnt / "lower").read_bytes()
        assert data == b"L" * 65536 + b"\0" * 65536 + b"\0" * 4096 + b"L" * (65536 - 4096)
        assert (layers[0] / "lower").read_bytes() == b"L" * (3 * 65536)
        assert (upper / "lower").read_bytes() == data

        # an unknown mode is refused, nothing changes
        fd = os.open(mnt / "lower", os.O_RDWR)
        try:
            with pytest.raises(OSError) as raised:
                _fallocate(fd, 0x08, 0, 4096)  # FALLOC_FL_COLLAPSE_RANGE
            assert raised.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        finally:
            os.close(fd)
        assert (mnt / "lower").read_bytes() == data


@needs_fallocate
@needs_lseek
def test_punched_hole_is_seen_by_seek_hole(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layers = tmp_layers({})
    with unionfs_mounted(
        layers, mountpoint, upper=tmp_path / "up", workdir=tmp_path / "work"
    ) as mnt:
        fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"d" * (4 * MiB), 0)
            os.fsync(fd)
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, MiB)
            assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
            assert os.lseek(fd, MiB, os.SEEK_DATA) == 2 * MiB
            with pytest.raises(OSError) as raised:
                os.lseek(fd, 4 * MiB, os.SEEK_DATA)
            assert raised.value.errno == errno.ENXIO
        finally:
            os.close(fd)
        assert (mnt / "f").read_bytes() == b"d" * MiB + b"\0" * MiB + b"d" * (2 * MiB)


@needs_lseek
def test_cp_sparse_through_the_mount_keeps_holes(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layers = tmp_layers({})
    sparse_file(layers[0] / "sparse", 64 * MiB, [0, 32 * MiB, 64 * MiB - 65536])
    upper = tmp_path / "up"
    with unionfs_mounted(layers, mountpoint, upper=upper, workdir=tmp_path / "work") as mnt:
        # lower file, read through the mount, copied within the mount
        fd = os.open(mnt / "sparse", os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 65536
            assert os.lseek(fd, 65536, os.SEEK_DATA) == 32 * MiB
        finally:
            os.close(fd)
        subprocess.run(
            ["cp", "--sparse=always", str(mnt / "sparse"), str(mnt / "copy")], check=True
        )
        copied = tmp_path / "copied-out"
        subprocess.run(["cp", "--sparse=auto", str(mnt / "sparse"), str(copied)], check=True)
        assert (mnt / "copy").read_bytes() == (layers[0] / "sparse").read_bytes()
    for path in (upper / "copy", copied):
        assert path.stat().st_size == 64 * MiB
        assert path.stat().st_blocks * 512 <= 4 * MiB, f"{path} was densified"


@pytest.mark.root
@needs_fallocate
@needs_lseek
def test_fallocate_and_holes_match_kernel_overlayfs(
    tmp_layers: TmpLayers, tmp_path: Path, require_overlay: None
) -> None:
    """The same fallocate calls on a lower file through kernel overlayfs and unionfs: the
    same content and the same data/hole map. (ZERO_RANGE is left out of the map: whether
    zeroed blocks show as a hole depends on how the page cache held them, not on us.)"""
    from tests.support.mounts import overlay_mounted

    def scenario(mnt: Path) -> tuple[bytes, list[tuple[int, int]]]:
        fd = os.open(mnt / "f", os.O_RDWR)
        try:
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 2 * MiB)
            _fallocate(fd, 0, 8 * MiB, MiB)
            os.fsync(fd)
            extents = []
            offset = 0
            size = os.fstat(fd).st_size
            while offset < size:
                try:
                    data = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError:
                    break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                extents.append((data, hole))
                offset = hole
        finally:
            os.close(fd)
        return (mnt / "f").read_bytes(), extents

    results = []
    for name in ("overlay", "unionfs"):
        layers = tmp_layers({"f": b"z" * (6 * MiB)})
        mnt = tmp_path / f"mnt-{name}"
        mnt.mkdir()
        upper, work = tmp_path / f"up-{name}", tmp_path / f"work-{name}"
        if name == "overlay":
            upper.mkdir()
            work.mkdir()
            with overlay_mounted(layers, mnt, upper=upper, workdir=work) as mounted:
                results.append(scenario(mounted))
        else:
            with unionfs_mounted(layers, mnt, upper=upper, workdir=work) as mounted:
                results.append(scenario(mounted))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]


def test_the_daemon_reports_its_pyfuse3_build(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({"a": "a"})
    log = default_log(mountpoint)
    with unionfs_mounted(layers, mountpoint):
        text = log.read_text()
    assert fusefeatures.describe() in text
    assert shutil.which("fallocate") is not None  # util-linux: scripts/setup --test


def _acl_denying(uid: int) -> bytes:
    """A system.posix_acl_access value: owner rw, user ``uid`` nothing, group r, mask r,
    others r (the kernel's binary format, version 2)."""
    import struct

    entries = [
        (0x01, 6, 0xFFFFFFFF),
        (0x02, 0, uid),
        (0x04, 4, 0xFFFFFFFF),
        (0x10, 4, 0xFFFFFFFF),
        (0x20, 4, 0xFFFFFFFF),
    ]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


@pytest.mark.root
@pytest.mark.parametrize("option", ["acl", "noacl"])
def test_posix_acls_are_enforced_as_by_kernel_overlayfs(
    tmp_layers: TmpLayers,
    shared_tmp: Path,
    ordinary_user: object,
    option: str,
    require_overlay: None,
) -> None:
    """enable_acl (FUSE_POSIX_ACL, the default): an ACL entry denying a user is enforced, as
    kernel overlayfs enforces it; with -o noacl only the mode bits count (world-readable)."""
    import pwd

    from tests.support import run_as
    from tests.support.mounts import overlay_mounted

    assert isinstance(ordinary_user, pwd.struct_passwd)
    layers = tmp_layers({"secret": "s"})
    (layers[0] / "secret").chmod(0o644)
    os.setxattr(layers[0] / "secret", "system.posix_acl_access", _acl_denying(ordinary_user.pw_uid))
    for layer in layers:
        layer.chmod(0o755)
    shared_tmp.chmod(0o755)
    readable = {}
    for system in ("overlay", "unionfs"):
        mnt = shared_tmp / f"mnt-{system}"
        mnt.mkdir()
        upper, work = shared_tmp / f"up-{system}", shared_tmp / f"work-{system}"
        if system == "overlay":
            upper.mkdir()
            work.mkdir()
            context = overlay_mounted(layers, mnt, upper=upper, workdir=work)
        else:
            context = unionfs_mounted(
                layers, mnt, upper=upper, workdir=work, options=[option, "allow_other"]
            )
        with context as mounted:
            result = run_as(ordinary_user, ["cat", mounted / "secret"])
            readable[system] = result.returncode == 0
            assert os.getxattr(mounted / "secret", "system.posix_acl_access") == _acl_denying(
                ordinary_user.pw_uid
            )
    assert readable["overlay"] is False
    assert readable["unionfs"] is (option == "noacl")

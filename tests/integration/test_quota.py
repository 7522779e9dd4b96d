"""-o quota / quota_inodes through real mounts: EDQUOT at the limit with nothing half-written,
copy-ups refused before anything lands, space freed by unlink, the limit kept across remounts,
`unionfs status`, df, and `unionfs check` repairing a stale usage record."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import TmpLayers
from tests.support.mounts import unionfs_mounted

KIB = 1024


def unionfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unionfs", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def upper_usage(upper: Path) -> tuple[int, int]:
    """(st_blocks * 512, inodes) of everything in the upper (hard links once)."""
    seen: set[int] = set()
    used = 0
    for directory, dirs, files in os.walk(upper):
        for name in dirs + files:
            st = os.lstat(os.path.join(directory, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                used += st.st_blocks * 512
    return used, len(seen)


def status(mnt: Path) -> dict[str, int]:
    document = json.loads(os.getxattr(mnt, "user.unionfs.status"))
    quota: dict[str, int] = document["quota"]
    return quota


def test_writes_fail_with_edquot_at_the_limit(tmp_layers: TmpLayers, tmp_path: Path,
                                              mountpoint: Path) -> None:  # fmt: skip
    (layer,) = tmp_layers({"keep": "k"})
    upper, work = tmp_path / "up", tmp_path / "work"
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work,
                         options=["quota=256K"]) as mnt:  # fmt: skip
        # dd, as a user would: the write past the limit fails, what fits stays intact
        dd = subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'dd'}", "bs=64k", "count=10"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert dd.returncode != 0 and "Disk quota exceeded" in dd.stderr
        assert os.path.getsize(mnt / "dd") == 256 * KIB
        assert (mnt / "dd").read_bytes() == bytes(256 * KIB)
        assert status(mnt)["used_bytes"] == upper_usage(upper)[0] <= 256 * KIB
        # python: write(2) itself answers EDQUOT; close and fsync then succeed
        (mnt / "dd").unlink()
        assert status(mnt)["used_bytes"] == upper_usage(upper)[0]
        fd = os.open(mnt / "py", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.write(fd, b"a" * (200 * KIB)) == 200 * KIB
            with pytest.raises(OSError) as refused:
                os.write(fd, b"b" * (100 * KIB))
            assert refused.value.errno == errno.EDQUOT
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (mnt / "py").read_bytes() == b"a" * (200 * KIB)  # the refused write left nothing
        assert (upper / "py").read_bytes() == b"a" * (200 * KIB)
        with pytest.raises(OSError) as refused, open(mnt / "py", "ab") as appended:
            appended.write(b"c" * (100 * KIB))
        assert refused.value.errno == errno.EDQUOT
        assert (mnt / "py").read_bytes() == b"a" * (200 * KIB)
        # a write(2) bigger than one FUSE request (the kernel splits it) fails whole when its
        # first request does not fit, else ends short at the last request that fitted, as on
        # a local filesystem at its quota: either way what it reports is what landed
        (mnt / "py").unlink()
        data = bytes(range(256)) * 4096  # 1 MiB
        fd = os.open(mnt / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        written = 0
        try:
            with pytest.raises(OSError) as refused:
                for _ in range(64):  # each write lands whole or short, until one is refused
                    written += os.write(fd, data[written:])
            assert refused.value.errno == errno.EDQUOT
        finally:
            os.close(fd)
        assert written <= 256 * KIB
        assert (mnt / "big").read_bytes() == data[:written]
        (mnt / "big").unlink()
        (mnt / "py").write_bytes(b"a" * (200 * KIB))
        # df shows the quota as the filesystem
        info = os.statvfs(mnt)
        assert info.f_blocks * info.f_frsize == 256 * KIB
        assert info.f_bavail * info.f_frsize <= 256 * KIB - 200 * KIB
        # unlink frees the space: the same write fits now
        (mnt / "py").unlink()
        (mnt / "again").write_bytes(b"d" * (250 * KIB))
        assert status(mnt)["used_bytes"] == upper_usage(upper)[0]


def test_with_the_write_back_cache_fsync_reports_edquot(tmp_layers: TmpLayers, tmp_path: Path,
                                                       mountpoint: Path) -> None:  # fmt: skip
    """-o writeback=1 with a quota: write(2) lands in the page cache; the refused write-back
    shows at fsync as EDQUOT (and at close as EIO: the kernel keeps no other errno there)."""
    (layer,) = tmp_layers({"keep": "k"})
    upper, work = tmp_path / "up", tmp_path / "work"
    log = tmp_path / "wb.log"
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work, log=log,
                         options=["quota=256K", "writeback=1"]) as mnt:  # fmt: skip
        assert "quota with writeback=1" in log.read_text()
        fd = os.open(mnt / "g", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.write(fd, b"a" * (300 * KIB)) == 300 * KIB  # cached, not written yet
            with pytest.raises(OSError) as refused:
                os.fsync(fd)
            assert refused.value.errno == errno.EDQUOT
        finally:
            os.close(fd)
        assert status(mnt)["used_bytes"] == upper_usage(upper)[0] <= 256 * KIB


def test_copy_up_past_the_limit_leaves_nothing(tmp_layers: TmpLayers, tmp_path: Path,
                                               mountpoint: Path) -> None:  # fmt: skip
    (layer,) = tmp_layers({"big": "x" * (300 * KIB), "small": "s", "d/deep": "y" * (300 * KIB)})
    upper, work = tmp_path / "up", tmp_path / "work"
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work,
                         options=["quota=128K"]) as mnt:  # fmt: skip
        changes: list[Callable[[], object]] = [
            lambda: open(mnt / "big", "r+b").close(),
            lambda: open(mnt / "big", "ab").close(),
            lambda: os.truncate(mnt / "big", 400 * KIB),
            lambda: os.link(mnt / "big", mnt / "big2"),
        ]
        for change in changes:
            with pytest.raises(OSError) as refused:
                change()
            assert refused.value.errno == errno.EDQUOT
        with pytest.raises(OSError) as refused:  # its parent directory is not made either
            open(mnt / "d" / "deep", "ab").close()
        assert refused.value.errno == errno.EDQUOT
        assert list(upper.iterdir()) == []
        assert [entry.name for entry in (work / "work").iterdir()] == []
        assert (mnt / "big").read_text() == "x" * (300 * KIB)
        # metadata-only changes need no data and still work
        os.chmod(mnt / "big", 0o600)
        assert (mnt / "big").stat().st_mode & 0o777 == 0o600
        # a small file copies up fine; the status agrees with the upper
        with open(mnt / "small", "a") as small:
            small.write("+")
        assert (mnt / "small").read_text() == "s+"
        assert (status(mnt)["used_bytes"], status(mnt)["used_inodes"]) == upper_usage(upper)


def test_inode_limit(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    (layer,) = tmp_layers({"low": "l", "d/x": "x"})
    upper, work = tmp_path / "up", tmp_path / "work"
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work,
                         options=["quota_inodes=3"]) as mnt:  # fmt: skip
        (mnt / "a").write_text("a")
        (mnt / "b").mkdir()
        os.symlink("a", mnt / "c")
        for make in (lambda: (mnt / "e").write_text("e"), lambda: (mnt / "f").mkdir(),
                     lambda: os.symlink("a", mnt / "g"), lambda: os.mkfifo(mnt / "h"),
                     lambda: (mnt / "d" / "new").write_text("n")):  # fmt: skip
            with pytest.raises(OSError) as refused:
                make()
            assert refused.value.errno == errno.EDQUOT
        assert sorted(os.listdir(upper)) == ["a", "b", "c"]
        # removing is always possible (a whiteout is counted, never refused)
        (mnt / "low").unlink()
        assert not (mnt / "low").exists()
        assert status(mnt)["used_inodes"] == upper_usage(upper)[1] == 4
        (mnt / "a").unlink()
        assert status(mnt)["used_inodes"] == upper_usage(upper)[1] == 3


def test_limit_kept_across_remounts_status_and_check(tmp_layers: TmpLayers, tmp_path: Path,
                                                     mountpoint: Path) -> None:  # fmt: skip
    (layer,) = tmp_layers({"low": "l"})
    upper, work = tmp_path / "up", tmp_path / "work"
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work,
                         options=["quota=1M,quota_inodes=50"]) as mnt:  # fmt: skip
        (mnt / "f").write_bytes(b"z" * (100 * KIB))
        shown = unionfs("status", str(mnt))
        assert shown.returncode == 0, shown.stderr
        used = upper_usage(upper)[0]
        assert f"quota:   {used} of {1 << 20} bytes" in shown.stdout
        assert "1 of 50 inodes" in shown.stdout
    record = json.loads((work / "unionfs-quota").read_text())
    assert record == {"limit_bytes": 1 << 20, "limit_inodes": 50, "used_bytes": used,
                      "used_inodes": 1}  # fmt: skip
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work) as mnt:  # no -o quota
        assert status(mnt)["limit_bytes"] == 1 << 20
        assert status(mnt)["used_bytes"] == used  # computed again by a walk of the upper
        with pytest.raises(OSError) as refused:
            (mnt / "g").write_bytes(b"w" * (1 << 20))
        assert refused.value.errno == errno.EDQUOT
        (mnt / "g").unlink()
    # the upper changed offline: check reports the stale usage and repairs it
    (upper / "offline").write_bytes(b"o" * (64 * KIB))
    checked = unionfs("check", "--workdir", str(work), str(upper))
    assert checked.returncode == 1 and "quota record says" in checked.stdout, checked.stdout
    repaired = unionfs("check", "--repair", "--workdir", str(work), str(upper))
    assert repaired.returncode == 0, repaired.stdout
    record = json.loads((work / "unionfs-quota").read_text())
    assert (record["used_bytes"], record["used_inodes"]) == upper_usage(upper)
    assert unionfs("check", "--workdir", str(work), str(upper)).returncode == 0
    # quota=none forgets the limit
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work,
                         options=["quota=none"]) as mnt:  # fmt: skip
        assert json.loads(os.getxattr(mnt, "user.unionfs.status"))["quota"] is None
        (mnt / "big").write_bytes(b"b" * (2 << 20))
    assert not (work / "unionfs-quota").exists()


def test_quota_without_an_upper_is_refused(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    (layer,) = tmp_layers({"f": "f"})
    result = unionfs("mount", "-o", "quota=1G", str(layer), str(mountpoint))
    assert result.returncode == 2 and "quota= needs a writable upper" in result.stderr
    assert "Traceback" not in result.stderr
    bad = unionfs("mount", "--upper", str(mountpoint.parent / "u"), "-o", "quota=much",
                  str(layer), str(mountpoint))  # fmt: skip
    assert bad.returncode == 2 and "quota" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("seed", [1515, 7, 2026])
def test_usage_stays_exact_under_random_changes(tmp_layers: TmpLayers, tmp_path: Path,
                                                mountpoint: Path, seed: int) -> None:  # fmt: skip
    """A seeded random mix of creates, writes, truncates, copy-ups, links, renames and removals
    (within the limits): the daemon's usage equals a walk of the upper after every step."""
    import random

    lower = {f"l{index}": "x" * (index * 3000) for index in range(8)}
    lower |= {"ld/a": "a" * 5000, "ld/b": "b"}
    (layer,) = tmp_layers(lower)
    upper, work = tmp_path / "up", tmp_path / "work"
    chooser = random.Random(seed)
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work,
                         options=["quota=64M,quota_inodes=100000"]) as mnt:  # fmt: skip
        for step in range(200):
            files = [p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink()]
            dirs = [mnt, *(p for p in mnt.rglob("*") if p.is_dir() and not p.is_symlink())]
            action = chooser.choice(["create", "write", "truncate", "unlink", "mkdir", "rmdir",
                                     "rename", "link", "symlink", "chmod",
                                     "xattr"])  # fmt: skip
            target = chooser.choice(dirs) / f"n{step}"
            try:
                if action == "create":
                    target.write_bytes(os.urandom(chooser.randrange(0, 20000)))
                elif action == "write" and files:
                    with open(chooser.choice(files), "r+b") as changed:
                        changed.seek(chooser.randrange(0, 30000))
                        changed.write(os.urandom(chooser.randrange(1, 9000)))
                elif action == "truncate" and files:
                    os.truncate(chooser.choice(files), chooser.randrange(0, 40000))
                elif action == "unlink" and files:
                    chooser.choice(files).unlink()
                elif action == "mkdir":
                    target.mkdir()
                elif action == "rmdir" and len(dirs) > 1:
                    chooser.choice(dirs[1:]).rmdir()
                elif action == "rename" and files:
                    chooser.choice(files).rename(target)
                elif action == "link" and files:
                    os.link(chooser.choice(files), target)
                elif action == "symlink":
                    os.symlink("t" * chooser.choice([5, 100]), target)
                elif action == "chmod" and files:
                    os.chmod(chooser.choice(files), 0o640)
                elif action == "xattr" and files:  # big enough for a block of its own
                    os.setxattr(chooser.choice(files), "user.big", os.urandom(3000))
            except OSError as error:
                assert error.errno in (errno.ENOTEMPTY, errno.ENOENT), (action, error)
            used = status(mnt)
            assert (used["used_bytes"], used["used_inodes"]) == upper_usage(upper), (step, action)

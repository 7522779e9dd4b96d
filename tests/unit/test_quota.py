"""Quota accounting without a mount: sizes, the write estimate, the walk, the record, settle."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from unionfs import quota
from unionfs.config import MountConfig
from unionfs.options import OptionError, apply_options
from unionfs.quota import Quota, Usage


def test_parse_size_units() -> None:
    assert quota.parse_size("4096") == 4096
    assert quota.parse_size("1k") == 1024
    assert quota.parse_size("512M") == 512 << 20
    assert quota.parse_size("1G") == 1 << 30
    assert quota.parse_size("2GiB") == 2 << 30
    assert quota.parse_size("1.5K") == 1536
    for bad in ("", "G", "-1", "0", "12Q", "1e400"):
        with pytest.raises(quota.QuotaError):
            quota.parse_size(bad)


def test_options_spellings() -> None:
    config = MountConfig(lowers=["a"], mountpoint="m")
    apply_options(config, ["quota=1G", "quota_inodes=100"])
    assert (config.quota_bytes, config.quota_inodes) == (1 << 30, 100)
    config = MountConfig(lowers=["a"], mountpoint="m")
    apply_options(config, ["size=10M", "inodes=5"])  # podman's size=, the inodes=
    assert (config.quota_bytes, config.quota_inodes) == (10 << 20, 5)
    assert not config.warnings
    config = MountConfig(lowers=["a"], mountpoint="m")
    apply_options(config, ["quota=none"])
    assert config.quota_remove
    with pytest.raises(OptionError, match="quota"):
        apply_options(MountConfig(lowers=["a"], mountpoint="m"), ["quota=lots"])
    with pytest.raises(OptionError, match="needs a value"):
        apply_options(MountConfig(lowers=["a"], mountpoint="m"), ["quota"])
    with pytest.raises(OptionError, match="out of range"):
        apply_options(MountConfig(lowers=["a"], mountpoint="m"), ["quota_inodes=0"])
    with pytest.raises(OptionError, match="cannot be combined"):
        apply_options(MountConfig(lowers=["a"], mountpoint="m"), ["quota=none", "quota=1G"])


def _st(
    size: int, blocks: int, *, nlink: int = 1, ino: int = 1, mode: int = 0o100644
) -> os.stat_result:
    """A stand-in stat result with the fields quota reads."""
    fake = SimpleNamespace(st_size=size, st_blocks=blocks, st_blksize=4096, st_nlink=nlink,
                           st_ino=ino, st_mode=mode)  # fmt: skip
    return cast(os.stat_result, fake)


def test_write_need_counts_only_new_blocks() -> None:
    empty = _st(0, 0)
    assert quota.write_need(empty, 0, 1) == 4096
    assert quota.write_need(empty, 0, 4096) == 4096
    assert quota.write_need(empty, 0, 4097) == 8192
    dense = _st(8192, 16)  # two full blocks
    assert quota.write_need(dense, 0, 8192) == 0  # an overwrite allocates nothing
    assert quota.write_need(dense, 4096, 8192) == 4096  # one block past the end
    assert quota.write_need(dense, 100, 0) == 0
    tail = _st(5000, 16)  # the second block is partly used: writing into it is free
    assert quota.write_need(tail, 5000, 3000) == 0
    sparse = _st(1 << 20, 8)  # holes: every block of the range may be new
    assert quota.write_need(sparse, 8192, 4096) == 4096
    assert quota.write_need(sparse, 10, 10) == 4096


def test_walk_counts_blocks_and_inodes_once(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "d" / "e").mkdir(parents=True)
    (upper / "d" / "f").write_bytes(b"x" * 10000)
    os.link(upper / "d" / "f", upper / "d" / "hard")
    (upper / "link").symlink_to("/etc")  # never followed
    os.mknod(upper / "wh", 0o20000, 0) if os.geteuid() == 0 else (upper / "wh").write_text("")
    expected = Usage()
    seen: set[int] = set()
    for path in [upper / "d", upper / "d" / "e", upper / "d" / "f", upper / "d" / "hard",
                 upper / "link", upper / "wh"]:  # fmt: skip
        st = os.lstat(path)
        if st.st_ino in seen:
            continue
        seen.add(st.st_ino)
        expected.bytes += st.st_blocks * 512
        expected.inodes += 1
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert quota.walk_usage(fd) == expected
    finally:
        os.close(fd)
    assert expected.inodes == 5 and expected.bytes >= 10000


def test_require_refuses_past_either_limit(tmp_path: Path) -> None:
    account = Quota(10000, 3, Usage(8000, 2), os.open(tmp_path, os.O_RDONLY))
    try:
        account.require(2000, 1)  # exactly at the limit: fits
        with pytest.raises(OSError) as refused:
            account.require(2001, 0)
        assert refused.value.errno == errno.EDQUOT
        with pytest.raises(OSError) as refused:
            account.require(0, 2)
        assert refused.value.errno == errno.EDQUOT
        account.require(0, 0)  # nothing needed: never refused, even over the limit
        assert account.refused == 2
        assert account.used == Usage(8000, 2)  # require charges nothing
    finally:
        os.close(account.base_fd)


def test_settle_charges_new_and_credits_last_links(tmp_path: Path) -> None:
    account = Quota(None, None, Usage(100000, 10), os.open(tmp_path, os.O_RDONLY))
    try:
        gone = _st(5000, 16)
        shared = _st(5000, 16, nlink=2, ino=5)
        new = _st(0, 0, ino=99, mode=0o20000)
        before = account.begin([gone])
        account.settle(before, account.snapshot([new]))  # a file replaced by a whiteout
        assert account.used == Usage(100000 - 8192, 10)
        account.settle(account.begin([shared]), {})  # one of two hard links: nothing freed
        assert account.used == Usage(100000 - 8192, 10)
    finally:
        os.close(account.base_fd)


def test_open_keeps_and_replaces_the_recorded_limit(tmp_path: Path) -> None:
    work, upper = tmp_path / "work", tmp_path / "upper"
    work.mkdir()
    upper.mkdir()
    (upper / "f").write_bytes(b"y" * 8192)
    root = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert Quota.open(str(work), root, None, None) is None  # no limit, no record
        first = Quota.open(str(work), root, 1 << 20, None)
        assert first is not None and first.used.inodes == 1 and first.used.bytes >= 8192
        first.close()
        again = Quota.open(str(work), root, None, None)  # the limit comes from the record
        assert again is not None and (again.limit_bytes, again.limit_inodes) == (1 << 20, None)
        again.close()
        changed = Quota.open(str(work), root, None, 7)  # given limits replace the record's
        assert changed is not None and (changed.limit_bytes, changed.limit_inodes) == (None, 7)
        changed.close()
        assert Quota.open(str(work), root, None, None, remove=True) is None
        assert Quota.open(str(work), root, None, None) is None
    finally:
        os.close(root)


def test_write_is_refused_whole_and_charged_exactly(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    account = Quota(16384, None, Usage(), os.open(work, os.O_RDONLY))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert account.write(fd, b"a" * 12288, 0) == 12288
        assert account.used.bytes == os.fstat(fd).st_blocks * 512
        with pytest.raises(OSError) as refused:
            account.write(fd, b"b" * 8192, 12288)
        assert refused.value.errno == errno.EDQUOT
        assert os.fstat(fd).st_size == 12288  # nothing of the refused write landed
        assert account.write(fd, b"c" * 4096, 0) == 4096  # an overwrite still works
    finally:
        os.close(fd)
        os.close(account.base_fd)


def test_record_survives_damage(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "unionfs-quota").write_text("{not json")
        assert quota.read_record(fd) == {}
        quota.write_record(fd, {"limit_bytes": 5, "limit_inodes": None, "used_bytes": 1,
                                "used_inodes": 2})  # fmt: skip
        assert quota.read_record(fd) == {"limit_bytes": 5, "limit_inodes": None,
                                         "used_bytes": 1, "used_inodes": 2}  # fmt: skip
    finally:
        os.close(fd)

"""uid/gid mapping and squashing as fuse-overlayfs does them (uidmapping=ON_DISK:SHOWN:COUNT)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unionfs.config import MountConfig
from unionfs.idmap import IdMapper, overflow_id
from unionfs.options import apply_options


def mapper(*options: str) -> IdMapper:
    config = MountConfig(lowers=["/l"], mountpoint="/m")
    apply_options(config, list(options))
    return IdMapper(config)


def test_identity_by_default() -> None:
    ids = mapper()
    assert ids.identity and ids.shown(1000, 100) == (1000, 100)
    assert ids.stored(5, 6) == (5, 6)


def test_first_field_is_the_id_on_disk_second_the_id_shown() -> None:
    """fuse-overlayfs: -o uidmapping=0:1000:1,gidmapping=0:2000:1 shows a 0:0 file as 1000:2000."""
    ids = mapper("uidmapping=0:1000:1", "gidmapping=0:2000:1")
    assert ids.shown(0, 0) == (1000, 2000)
    assert ids.stored(1000, 2000) == (0, 0)  # chown and new files map back


def test_ranges_both_directions() -> None:
    ids = mapper("uidmapping=0:100000:65536", "gidmapping=0:200000:1:1:300000:10")
    assert ids.shown(0, 0) == (100000, 200000)
    assert ids.shown(42, 4) == (100042, 300003)
    assert ids.stored(100042, 300003) == (42, 4)
    assert ids.stored(-1, -1) == (-1, -1)


def test_podman_leading_colon() -> None:
    """podman 4.3 passes uidmapping=:0:200000:65536; fuse-overlayfs skips empty fields."""
    ids = mapper("uidmapping=:0:200000:65536", "gidmapping=:0:200000:65536")
    assert ids.shown(0, 1) == (200000, 200001)
    assert ids.stored(265535, 200000) == (65535, 0)


def test_unmapped_ids_become_the_overflow_id_both_ways() -> None:
    ids = mapper("uidmapping=0:1000:1", "gidmapping=0:1000:1")
    overflow = (overflow_id("uid"), overflow_id("gid"))
    assert ids.shown(7, 7) == overflow
    assert ids.stored(7, 7) == overflow


def test_overflow_id_is_the_kernels() -> None:
    text = Path("/proc/sys/kernel/overflowuid").read_text()
    assert overflow_id("uid") == int(text)


def test_squash() -> None:
    assert mapper("squash_to_root").shown(1234, 5678) == (0, 0)
    assert mapper("squash_to_uid=7", "squash_to_gid=8").shown(1, 2) == (7, 8)


def test_squash_to_uid_wins_over_squash_to_root_whatever_the_order() -> None:
    assert mapper("squash_to_uid=7", "squash_to_root").shown(1, 2) == (7, 0)
    assert mapper("squash_to_root", "squash_to_gid=9").shown(1, 2) == (0, 9)


def test_squash_ignores_a_refused_chown(tmp_path: Path) -> None:
    """With squashing the owner shown cannot change: chown's EPERM is no error (fuse-overlayfs)."""
    target = tmp_path / "f"
    target.write_text("x")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _chown_checks(target, dir_fd)
    finally:
        os.close(dir_fd)


def _chown_checks(target: Path, dir_fd: int) -> None:
    ids = mapper("squash_to_uid=0")
    if os.geteuid() == 0:
        ids.chown(dir_fd, b"f", 4321, -1)
        assert target.stat().st_uid == 4321
    else:
        ids.chown(dir_fd, b"f", 0, -1)  # would be EPERM
        assert target.stat().st_uid == os.geteuid()
    plain = mapper()
    if os.geteuid() != 0:
        with pytest.raises(PermissionError):
            plain.chown(dir_fd, b"f", 0, -1)

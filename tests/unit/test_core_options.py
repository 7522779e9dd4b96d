"""Option parsing: -o strings, id mappings, the fuse-overlayfs and mount.fuse3 forms."""

from __future__ import annotations

import pytest

from unionfs.cli import parse
from unionfs.config import IdMapping, MountConfig
from unionfs.options import OptionError, apply_options, parse_id_mapping, split_options


def test_split_honours_quotes() -> None:
    assert split_options('a,context="system_u:object_r:x:s0:c1,c2",b=1') == [
        "a", "context=system_u:object_r:x:s0:c1,c2", "b=1"]


def test_split_rejects_unbalanced_quote() -> None:
    with pytest.raises(OptionError):
        split_options('context="abc')


def test_id_mapping() -> None:
    assert parse_id_mapping("0:1000:1:1:100000:65536") == [
        IdMapping(0, 1000, 1), IdMapping(1, 100000, 65536)]
    for bad in ("0:1", "a:b:c", "0:1:2:3", "-1:0:1"):
        with pytest.raises(OptionError):
            parse_id_mapping(bad)


def test_lowerdir_is_top_first() -> None:
    config = MountConfig(lowers=[], mountpoint="/m")
    apply_options(config, ["lowerdir=/top:/mid:/base", "upperdir=/u", "workdir=/w"])
    assert config.lowers == ["/base", "/mid", "/top"]
    assert (config.upper, config.workdir) == ("/u", "/w")


def test_fuse_overlayfs_vocabulary_is_accepted() -> None:
    config = MountConfig(lowers=[], mountpoint="/m")
    apply_options(config, ["lowerdir=/l", "squash_to_root", "fsync=0", "noacl", "volatile",
                           "redirect_dir=off", "timeout=5", "xattr_permissions=2",
                           "context=x,y", "allow_other", "uidmapping=0:1000:1"])
    assert config.warnings == []
    assert (config.squash_uid, config.squash_gid) == (0, 0)
    assert config.fsync is False and config.redirect_dir is False and config.timeout == 5.0
    assert config.fuse_options == ["allow_other"]
    assert config.uid_mappings == [IdMapping(0, 1000, 1)]


def test_unknown_options_warn() -> None:
    config = MountConfig(lowers=[], mountpoint="/m")
    apply_options(config, ["frobnicate=3"])
    assert config.warnings == ["unknown option ignored: frobnicate=3"]


def test_ro_without_upper() -> None:
    config = MountConfig(lowers=[], mountpoint="/m")
    apply_options(config, ["lowerdir=/a:/b", "ro"])
    assert config.read_only and not config.writable


def test_cli_mount_form() -> None:
    action, config = parse(["mount", "--upper", "/u", "-o", "timeout=3", "/base", "/top", "/m"])
    assert action == "mount" and isinstance(config, MountConfig)
    assert config.lowers == ["/base", "/top"] and config.mountpoint == "/m"
    assert config.upper == "/u" and config.timeout == 3.0


def test_cli_overlay_form() -> None:
    _action, config = parse(["-o", "lowerdir=/top:/base,upperdir=/u,workdir=/w", "/merged"])
    assert isinstance(config, MountConfig)
    assert config.lowers == ["/base", "/top"] and config.mountpoint == "/merged"


def test_cli_mount_fuse3_form() -> None:
    _action, config = parse(["unionfs", "/merged", "-o", "rw,lowerdir=/a:/b"])
    assert isinstance(config, MountConfig) and config.mountpoint == "/merged"
    assert config.lowers == ["/b", "/a"]


def test_cli_overlay_form_needs_lowerdir() -> None:
    with pytest.raises(OptionError):
        parse(["-o", "upperdir=/u", "/merged"])


def test_cli_umount() -> None:
    assert parse(["umount", "/m"]) == ("umount", "/m")

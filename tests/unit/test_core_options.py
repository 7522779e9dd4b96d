"""Option parsing: -o strings, id mappings, the fuse-overlayfs and mount.fuse3 forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from unionfs.cli import parse
from unionfs.config import IdMapping, MountConfig
from unionfs.options import (
    NO_EFFECT,
    REFUSED,
    OptionError,
    apply_options,
    fuse_mount_options,
    parse_id_mapping,
    split_options,
)


def config_of(*options: str) -> MountConfig:
    config = MountConfig(lowers=[], mountpoint="/m")
    apply_options(config, list(options))
    return config


def test_split_honours_quotes() -> None:
    assert split_options('a,context="system_u:object_r:x:s0:c1,c2",b=1') == [
        "a",
        "context=system_u:object_r:x:s0:c1,c2",
        "b=1",
    ]


def test_split_rejects_unbalanced_quote() -> None:
    with pytest.raises(OptionError):
        split_options('context="abc')


def test_id_mapping() -> None:
    assert parse_id_mapping("0:1000:1:1:100000:65536") == [
        IdMapping(0, 1000, 1),
        IdMapping(1, 100000, 65536),
    ]
    assert parse_id_mapping(":0:200000:65536") == [IdMapping(0, 200000, 65536)]  # podman 4.3
    assert parse_id_mapping("0:1:1::5:6:7:") == [IdMapping(0, 1, 1), IdMapping(5, 6, 7)]
    for bad in (
        "0:1",
        "a:b:c",
        "0:1:2:3",
        "-1:0:1",
        "0:0:0",
        "",
        ":",
        "0:4294967295:2",
        "1:2:+3",
        "1: 2:3",
    ):
        with pytest.raises(OptionError):
            parse_id_mapping(bad)


def test_lowerdir_is_top_first() -> None:
    config = MountConfig(lowers=[], mountpoint="/m")
    apply_options(config, ["lowerdir=/top:/mid:/base", "upperdir=/u", "workdir=/w"])
    assert config.lowers == ["/base", "/mid", "/top"]
    assert (config.upper, config.workdir) == ("/u", "/w")


def test_fuse_overlayfs_vocabulary_is_accepted() -> None:
    config = config_of(
        "lowerdir=/l",
        "squash_to_root",
        "fsync=0",
        "noacl",
        "volatile",
        "redirect_dir=off",
        "timeout=5",
        "xattr_permissions=0",
        "context=x,y",
        "allow_other",
        "uidmapping=0:1000:1",
        "static_nlink",
        "noxattrs=1",
        "userxattr",
        "threaded=1",
        "fast_ino=1",
        "writeback=0",
        "plugins=",
        "xino=auto",
        "index=off",
        "debug",
    )
    assert config.warnings == []
    assert config.squash_to_root and config.squashing
    assert config.fsync is False and config.redirect_dir is False and config.timeout == 5.0
    assert config.volatile and config.static_nlink and config.userxattr and not config.xattrs
    assert config.posix_acl is False  # noacl: the kernel checks mode bits only
    assert config.metacopy is False  # redirect_dir=off turns metacopy off, as in the kernel
    assert config.writeback is False and config.index is False and config.debug
    assert config.fuse_options == ["allow_other"]
    assert config.uid_mappings == [IdMapping(0, 1000, 1)]
    assert any("context=x,y" in note for note in config.notes)


def test_mount_flags_from_fstab_and_mount8_are_accepted() -> None:
    config = config_of(
        "relatime",
        "diratime",
        "nodiratime",
        "lazytime",
        "nonempty",
        "rootmode=40000",
        "blksize=4096",
        "strictatime",
        "norelatime",
        "defaults",
        "noauto",
        "user",
        "_netdev",
        "nofail",
        "x-systemd.automount",
        "comment=x",
        "nosuid",
        "nodev",
        "noexec",
        "noatime",
        "sync",
        "dirsync",
    )
    assert config.warnings == [] and config.nonempty
    assert config.fuse_options == ["nosuid", "nodev", "noexec", "noatime", "sync", "dirsync"]
    assert len(config.notes) == 15  # each accepted without effect, the reason kept for --debug


@pytest.mark.parametrize(
    "option",
    [
        "max_read=65536",
        "blkdev",
        "remount",
        "bind",
        "fd=3",
        "setuid=nobody",
        "private",
        "xattr_permissions=2",
        "plugins=/x.so",
        "nfs_export=on",
        "verity=require",
        "rootmode=100644",
        "datadir+=/d",
        "suid=1",
        "timeout=x",
        "metacopy=maybe",
        "fsync=x",
        "uidmapping=1:2",
        "squash_to_uid=-1",
        "lowerdir",
        "fsname=a b",
    ],
)
def test_refused_options_raise_before_mounting(option: str) -> None:
    with pytest.raises(OptionError) as refused:
        config_of(option)
    assert "\n" not in str(refused.value) and str(refused.value)


def test_metacopy_on_with_redirect_dir_off_conflicts() -> None:
    with pytest.raises(OptionError):
        config_of("metacopy=on", "redirect_dir=off")


def test_volatile_wins_over_fsync() -> None:
    assert config_of("volatile", "fsync=1").fsync is False


def test_lowerdir_plus_adds_layers_top_first() -> None:
    assert config_of("lowerdir+=/top", "lowerdir+=/base").lowers == ["/base", "/top"]
    with pytest.raises(OptionError):
        config_of("lowerdir=/a", "lowerdir+=/b")


def test_xino_off_warns_once_and_acl_is_the_default() -> None:
    config = config_of("acl", "acl", "xino=off", "xino=off")
    assert len(config.warnings) == 1
    assert config.posix_acl and config_of().posix_acl


def test_every_known_option_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("<!-- options:start -->") : readme.index("<!-- options:end -->")]
    known = [
        *NO_EFFECT,
        *REFUSED,
        "lowerdir",
        "upperdir",
        "workdir",
        "uidmapping",
        "gidmapping",
        "squash_to_root",
        "squash_to_uid",
        "squash_to_gid",
        "fsync",
        "volatile",
        "reuse_volatile",
        "redirect_dir",
        "writeback",
        "metacopy",
        "index",
        "timeout",
        "whiteout",
        "xino",
        "nfs_export",
        "verity",
        "xattr_permissions",
        "plugins",
        "rootmode",
        "fsname",
        "noxattrs",
        "userxattr",
        "static_nlink",
        "nonempty",
        "acl",
        "noacl",
        "debug",
        "allow_other",
        "allow_root",
        "auto_unmount",
        "ro",
        "rw",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "sync",
        "async",
        "atime",
        "noatime",
        "dirsync",
        "quota",
        "size",
        "quota_inodes",
        "inodes",
        "watch",
    ]
    missing = [name for name in known if f"`{name}" not in table]
    assert missing == []


def test_root_gets_allow_other_and_suid_like_fuse_overlayfs() -> None:
    assert fuse_mount_options(config_of("lowerdir=/l", "upperdir=/u"), root=True) == [
        "default_permissions",
        "fsname=unionfs",
        "allow_other",
        "suid",
    ]
    assert fuse_mount_options(config_of("lowerdir=/l", "upperdir=/u"), root=False) == [
        "default_permissions",
        "fsname=unionfs",
    ]


def test_the_last_of_contradicting_options_wins() -> None:
    root = fuse_mount_options(
        config_of("upperdir=/u", "nosuid", "dev", "nodev", "dev", "allow_root"), root=True
    )
    assert "suid" not in root and "nosuid" in root and "dev" in root and "nodev" not in root
    assert "allow_root" in root and "allow_other" not in root
    assert "ro" in fuse_mount_options(config_of(), root=True)  # no upper: read-only
    assert "ro" in fuse_mount_options(config_of("upperdir=/u", "ro"), root=True)
    assert "ro" not in fuse_mount_options(config_of("upperdir=/u", "ro", "rw"), root=True)


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


@pytest.mark.parametrize(
    ("lowerdir", "lowers", "data"),
    [
        ("/a:/b::/c::/d", ["/b", "/a"], ["/c", "/d"]),  # the kernel's example
        ("/a::/c", ["/a"], ["/c"]),
        ("/a::/c:/d", ["/a"], ["/c", "/d"]),  # every layer after the first :: is data-only
        ("/a:/b", ["/b", "/a"], []),
    ],
)
def test_data_only_layers_after_double_colon(
    lowerdir: str, lowers: list[str], data: list[str]
) -> None:
    config = config_of(f"lowerdir={lowerdir}")
    assert (config.lowers, config.data_layers) == (lowers, data)


def test_lowerdir_plus_and_datadir_plus() -> None:
    config = config_of("lowerdir+=/top", "lowerdir+=/base", "datadir+=/d1", "datadir+=/d2")
    assert (config.lowers, config.data_layers) == (["/base", "/top"], ["/d1", "/d2"])


@pytest.mark.parametrize(
    "options",
    [
        ("lowerdir=::/c",),  # no regular layer before ::
        ("lowerdir=/a::",),  # nothing after ::
        ("datadir+=/d",),  # datadir+ needs a lowerdir+ first
        ("lowerdir+=/a", "datadir+=/d", "lowerdir+=/b"),  # data-only layers come last
        ("lowerdir+=/a", "datadir+="),
    ],
)
def test_bad_data_only_layers_are_refused(options: tuple[str, ...]) -> None:
    with pytest.raises(OptionError) as refused:
        config_of(*options)
    assert "\n" not in str(refused.value) and str(refused.value)

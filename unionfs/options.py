"""Parsing of ``-o`` option strings (the fuse-overlayfs / mount.fuse3 vocabulary).

Pure functions, no I/O: ``split_options`` honours double quotes (``context="a,b"``),
``apply_options`` folds options into a ``MountConfig`` and collects warnings for unknown
ones instead of failing (podman passes options we do not need).
"""

from __future__ import annotations

from unionfs.config import IdMapping, MountConfig

# Options the kernel / libfuse understand; passed through unchanged.
FUSE_PASSTHROUGH = {
    "allow_other",
    "allow_root",
    "default_permissions",
    "auto_unmount",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "diratime",
    "nodiratime",
    "sync",
    "async",
    "dirsync",
    "lazytime",
    "nonempty",
}
FUSE_PASSTHROUGH_VALUED = {"max_read", "blksize", "fsname", "subtype", "rootmode"}
IGNORED = {
    "noacl",
    "acl",
    "volatile",
    "rw",
    "userxattr",
    "index",
    "metacopy",
    "xino",
    "nfs_export",
    "default_permissions",
    "plugins",
    "fast_ino",
    "static_nlink",
    "noxattrs",
    "debug",
    "_netdev",
    "x-systemd.automount",
    "defaults",
    "user",
    "users",
    "nouser",
    "auto",
    "noauto",
}
IGNORED_VALUED = {
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "xattr_permissions",
    "xino",
    "nfs_export",
    "plugins",
    "threaded",
    "uid",
    "gid",
    "volatile",
}


class OptionError(ValueError):
    pass


def split_options(text: str) -> list[str]:
    """Split ``a,b=c,d="x,y"`` at commas outside double quotes; quotes are removed."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for character in text:
        if character == '"':
            quoted = not quoted
            continue
        if character == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(character)
    if quoted:
        raise OptionError(f"unbalanced quote in options: {text}")
    parts.append("".join(current))
    return [part for part in parts if part]


def parse_id_mapping(text: str) -> list[IdMapping]:
    """``C:H:S[:C:H:S...]`` as fuse-overlayfs takes it."""
    try:
        numbers = [int(field) for field in text.split(":")]
    except ValueError:
        raise OptionError(f"bad id mapping {text!r} (want C:H:S[:C:H:S...])") from None
    if not numbers or len(numbers) % 3 or any(number < 0 for number in numbers):
        raise OptionError(f"bad id mapping {text!r} (want C:H:S[:C:H:S...])")
    return [IdMapping(*numbers[index : index + 3]) for index in range(0, len(numbers), 3)]


def _int_option(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise OptionError(f"option {key} wants a number, not {value!r}") from None


def apply_options(config: MountConfig, options: list[str]) -> None:
    """Fold ``-o`` options into ``config`` (lowerdir lists layers top first, like the kernel)."""
    for option in options:
        key, has_value, value = option.partition("=")
        if key == "lowerdir" and has_value:
            layers = [layer for layer in value.split(":") if layer]
            if not layers:
                raise OptionError("lowerdir is empty")
            config.lowers = list(reversed(layers))
        elif key == "upperdir" and has_value:
            config.upper = value
        elif key == "workdir" and has_value:
            config.workdir = value
        elif key == "uidmapping" and has_value:
            config.uid_mappings = parse_id_mapping(value)
        elif key == "gidmapping" and has_value:
            config.gid_mappings = parse_id_mapping(value)
        elif key == "squash_to_root" and not has_value:
            config.squash_uid = 0
            config.squash_gid = 0
        elif key == "squash_to_uid" and has_value:
            config.squash_uid = _int_option(key, value)
        elif key == "squash_to_gid" and has_value:
            config.squash_gid = _int_option(key, value)
        elif key == "fsync" and has_value:
            config.fsync = value != "0"
        elif key == "redirect_dir" and has_value:
            config.redirect_dir = value not in ("off", "nofollow")
        elif key == "writeback" and has_value:
            config.writeback = value not in ("0", "off", "no")
        elif key == "metacopy" and has_value:
            config.metacopy = value == "on"
        elif key == "index" and has_value:
            config.index = value == "on"
        elif key == "timeout" and has_value:
            try:
                config.timeout = float(value)
            except ValueError:
                raise OptionError(f"option timeout wants seconds, not {value!r}") from None
        elif key == "ro" and not has_value:
            config.read_only = True
        elif key == "whiteout" and has_value:
            if value not in ("overlay", "oci"):
                raise OptionError(f"whiteout must be overlay or oci, not {value!r}")
            config.whiteout_format = value
        elif (key in FUSE_PASSTHROUGH and not has_value) or (
            key in FUSE_PASSTHROUGH_VALUED and has_value
        ):
            if key not in ("fsname", "subtype"):
                config.fuse_options.append(option)
        elif (key in IGNORED and not has_value) or (key in IGNORED_VALUED and has_value):
            continue
        else:
            config.warnings.append(f"unknown option ignored: {option}")

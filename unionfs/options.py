"""Parsing of ``-o`` option strings: fuse-overlayfs's, kernel overlayfs's and mount(8)'s.

Pure functions, no I/O. ``split_options`` honours double quotes (``context="a,b"``);
``apply_options`` folds options into a ``MountConfig``. Every option podman, buildah,
fuse-overlayfs users or mount(8)/fstab may pass gets one of four answers, decided here before
anything is mounted:

- it works (ours, or handed to libfuse/the kernel: ``KERNEL_FLAGS``, ``FUSE_MOUNT``);
- it is accepted with no effect, and ``--debug`` logs why (``NO_EFFECT``: atime flags, fstab
  words, SELinux contexts, fuse-overlayfs tuning knobs);
- it is refused with one line (``OptionError``: ``max_read=``, ``blkdev``, ``remount``, ...);
- unknown: a warning, then ignored (as fuse-overlayfs does).

``fuse_mount_options`` then resolves what reaches libfuse: as root (also root in a user
namespace, i.e. rootless podman) ``allow_other`` and ``suid`` are on by default, as
fuse-overlayfs turns them on; options given later win over earlier and over the defaults.
"""

from __future__ import annotations

import stat

from unionfs.config import IdMapping, MountConfig
from unionfs.quota import QuotaError, parse_size

# libfuse 3 turns these into mount(2) flags: option -> its family (the last given of a family
# wins: "nosuid" after "suid" mounts nosuid).
KERNEL_FLAGS = {
    "ro": "ro",
    "rw": "ro",
    "suid": "suid",
    "nosuid": "suid",
    "dev": "dev",
    "nodev": "dev",
    "exec": "exec",
    "noexec": "exec",
    "sync": "sync",
    "async": "sync",
    "atime": "atime",
    "noatime": "atime",
    "dirsync": "dirsync",
}
# libfuse 3 / the kernel's FUSE options.
FUSE_MOUNT = {"allow_other", "allow_root", "auto_unmount", "default_permissions"}

ATIME_REASON = (
    "the kernel never updates atimes of FUSE inodes (S_NOATIME); lower layers are read with "
    "O_NOATIME and the upper filesystem's own mount options govern its atimes"
)
FSTAB_REASON = "an option for mount(8) and fstab, not for the filesystem"
SELINUX_REASON = "SELinux labels come from the layers' security.* xattrs (as fuse-overlayfs)"
# Accepted, no effect; the reason is logged with --debug.
NO_EFFECT: dict[str, str] = {
    **{
        name: ATIME_REASON
        for name in (
            "relatime",
            "norelatime",
            "strictatime",
            "nostrictatime",
            "diratime",
            "nodiratime",
            "lazytime",
            "nolazytime",
        )
    },
    **{
        name: FSTAB_REASON
        for name in (
            "defaults",
            "auto",
            "noauto",
            "user",
            "nouser",
            "users",
            "owner",
            "group",
            "_netdev",
            "nofail",
            "comment",
            "silent",
            "loud",
        )
    },
    **{name: SELINUX_REASON for name in ("context", "fscontext", "defcontext", "rootcontext")},
    "blksize": "only block-device FUSE (fuseblk) has a block size; st_blksize comes from the "
    "layers",
    "default_permissions": "always on: the kernel checks permissions against the owners and "
    "modes the mount shows",
    "mand": "mandatory locks are gone from Linux (5.15)",
    "nomand": "mandatory locks are gone from Linux (5.15)",
    "iversion": "FUSE keeps no i_version",
    "noiversion": "FUSE keeps no i_version",
    "threaded": "fuse-overlayfs's thread switch: one trio loop serves every request here",
    "fast_ino": "fuse-overlayfs's inode-check shortcut: no equivalent needed",
    "kernel_cache": "lower files are always cached by the kernel (keep_cache)",
    "splice_read": "no splice path in pyfuse3",
    "splice_write": "no splice path in pyfuse3",
    "splice_move": "no splice path in pyfuse3",
    "max_write": "pyfuse3 negotiates the write size",
    "uid": "an obsolete fuse-overlayfs option (use uidmapping=)",
    "gid": "an obsolete fuse-overlayfs option (use gidmapping=)",
    "user_id": "libfuse sets user_id= to the mounting user",
    "group_id": "libfuse sets group_id= to the mounting user's group",
    "uuid": "kernel overlayfs's file-handle uuid: unionfs keeps origins in the index instead",
    "subtype": "the type stays fuse.unionfs-py, so that unionfs status finds the mount",
}
REFUSED: dict[str, str] = {
    "max_read": "max_read= is not supported (pyfuse3 cannot agree on it with the kernel)",
    "blkdev": "blkdev: unionfs is no block-device filesystem",
    "fd": "fd= is not supported: unionfs opens /dev/fuse itself",
    "setuid": "setuid=USER is not supported: run unionfs as that user",
    "drop_privileges": "drop_privileges is not supported: run unionfs as the user it should be",
    "remount": "remount is not supported: unmount and mount again",
    "bind": "bind is not a unionfs option (mount --bind the merged directory instead)",
    "rbind": "rbind is not a unionfs option (mount --rbind the merged directory instead)",
    "move": "move is not a unionfs option (use mount --move)",
    **{
        name: f"{name} is a propagation flag: use mount --make-{name} after mounting"
        for name in (
            "private",
            "rprivate",
            "shared",
            "rshared",
            "slave",
            "rslave",
            "unbindable",
            "runbindable",
        )
    },
}
# Options known here that need (or forbid) a value.
VALUED = {
    "lowerdir",
    "lowerdir+",
    "datadir+",
    "upperdir",
    "workdir",
    "uidmapping",
    "gidmapping",
    "squash_to_uid",
    "squash_to_gid",
    "fsync",
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
    "quota",
    "size",
    "quota_inodes",
    "inodes",
}
VALUE_OPTIONAL = {"xino", "plugins", "noxattrs"}  # fuse-overlayfs takes noxattrs=1
OVERFLOW_FALLBACK = 65534
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to chown


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


def split_lowerdir(value: str) -> tuple[list[str], list[str]]:
    """``lowerdir=TOP:...:BASE[::DATA1[::DATA2...]]`` -> (regular layers top first, data-only
    layers in search order). As in the kernel (Linux 6.5+): every layer after the first ``::``
    is data-only, at least one regular layer comes before it."""
    regular_text, separator, data_text = value.partition("::")
    regular = [layer for layer in regular_text.split(":") if layer]
    data = [layer for layer in data_text.split(":") if layer]
    if not regular:
        raise OptionError(
            "lowerdir is empty"
            if not separator
            else "lowerdir: a data-only layer (after ::) "
            "needs at least one regular lower layer before it"
        )
    if separator and not data:
        raise OptionError("lowerdir: nothing after :: (want TOP:...:BASE::DATA)")
    return regular, data


def parse_id_mapping(text: str) -> list[IdMapping]:
    """``ON_DISK:SHOWN:COUNT[:ON_DISK:SHOWN:COUNT...]`` as fuse-overlayfs reads it: empty fields
    are skipped (podman 4.3 passes ``:0:200000:65536``, with a leading colon)."""
    want = f"bad id mapping {text!r} (want ON_DISK:SHOWN:COUNT[:ON_DISK:SHOWN:COUNT...])"
    fields = [field for field in text.split(":") if field]
    if not fields or len(fields) % 3 or not all(field.isdigit() for field in fields):
        raise OptionError(want)
    numbers = [int(field) for field in fields]
    ranges = [IdMapping(*numbers[index : index + 3]) for index in range(0, len(numbers), 3)]
    for mapping in ranges:
        if mapping.size == 0:
            raise OptionError(f"{want}: a range of 0 ids")
        if max(mapping.on_disk, mapping.shown) + mapping.size - 1 > MAX_ID:
            raise OptionError(f"{want}: ids beyond {MAX_ID}")
    return ranges


def _int_option(key: str, value: str, *, lowest: int = 0, highest: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise OptionError(f"option {key} wants a number, not {value!r}") from None
    if number < lowest or (highest is not None and number > highest):
        raise OptionError(f"option {key}={value} is out of range")
    return number


def _switch(key: str, value: str, on: tuple[str, ...], off: tuple[str, ...]) -> bool:
    if value in on:
        return True
    if value in off:
        return False
    raise OptionError(f"option {key} wants one of {', '.join(on + off)}, not {value!r}")


def _note(config: MountConfig, option: str, reason: str) -> None:
    config.notes.append(f"option {option} accepted, no effect: {reason}")


def _warn_once(config: MountConfig, message: str) -> None:
    if message not in config.warnings:
        config.warnings.append(message)


def apply_options(config: MountConfig, options: list[str]) -> None:
    """Fold ``-o`` options into ``config`` (lowerdir lists layers top first, like the kernel).
    Raises OptionError for an option that is refused or malformed."""
    added_lowers: list[str] = []
    added_data: list[str] = []
    for option in options:
        key, has_value, value = option.partition("=")
        if key in VALUED and not has_value and key not in VALUE_OPTIONAL:
            raise OptionError(f"option {key} needs a value ({key}=...)")
        if has_value and (key in KERNEL_FLAGS or key in FUSE_MOUNT or key in _FLAG_OPTIONS):
            raise OptionError(f"option {key} takes no value")
        if key in REFUSED:
            raise OptionError(REFUSED[key])
        if key in NO_EFFECT or key.startswith("x-"):
            _note(config, option, NO_EFFECT.get(key, FSTAB_REASON))
            continue
        if key == "datadir+":
            if not value:
                raise OptionError("datadir+= is empty")
            if not added_lowers:
                raise OptionError("datadir+= must follow a lowerdir+= (as in the kernel)")
            added_data.append(value)
        elif key in VALUED:
            if key == "lowerdir+" and added_data:
                raise OptionError("lowerdir+= after datadir+=: data-only layers come last")
            _apply_valued(config, key, value, option, added_lowers)
        elif key in KERNEL_FLAGS or key in FUSE_MOUNT:
            if key == "ro":
                config.read_only = True
            elif key == "rw":
                config.read_only = False
            elif key != "default_permissions":
                config.fuse_options.append(key)
        elif key in _FLAG_OPTIONS:
            _FLAG_OPTIONS[key](config)
        else:
            config.warnings.append(f"unknown option ignored: {option}")
    if added_lowers:
        if config.lowers:
            raise OptionError("lowerdir= and lowerdir+= cannot be combined")
        config.lowers = list(reversed(added_lowers))
        config.data_layers = added_data
    if not config.redirect_dir and config.metacopy:
        if config.metacopy_given:
            raise OptionError("metacopy=on needs redirect_dir=on (as in kernel overlayfs)")
        config.metacopy = False
    if (config.quota_bytes is not None or config.quota_inodes is not None) and (
        config.quota_remove
    ):
        raise OptionError("quota=none cannot be combined with a quota limit")
    if config.volatile:
        config.fsync = False  # whatever fsync= said (fuse-overlayfs: volatile means fsync=0)


def _apply_valued(
    config: MountConfig, key: str, value: str, option: str, added_lowers: list[str]
) -> None:
    if key == "lowerdir":
        regular, data = split_lowerdir(value)
        config.lowers = list(reversed(regular))
        config.data_layers = data
    elif key == "lowerdir+":
        if not value:
            raise OptionError("lowerdir+= is empty")
        added_lowers.append(value)
    elif key == "upperdir":
        config.upper = value
    elif key == "workdir":
        config.workdir = value
    elif key == "uidmapping":
        config.uid_mappings = parse_id_mapping(value)
    elif key == "gidmapping":
        config.gid_mappings = parse_id_mapping(value)
    elif key == "squash_to_uid":
        config.squash_uid = _int_option(key, value, highest=MAX_ID)
    elif key == "squash_to_gid":
        config.squash_gid = _int_option(key, value, highest=MAX_ID)
    elif key == "fsync":
        config.fsync = _int_option(key, value) != 0
    elif key == "writeback":
        config.writeback = _switch(key, value, ("1", "on", "yes"), ("0", "off", "no"))
        config.writeback_given = True
    elif key in ("quota", "size"):
        if value == "none":
            config.quota_remove = True
            return
        try:
            config.quota_bytes = parse_size(value)
        except QuotaError as error:
            raise OptionError(f"option {key}: {error}") from None
    elif key in ("quota_inodes", "inodes"):
        config.quota_inodes = _int_option(key, value, lowest=1)
    elif key == "redirect_dir":
        config.redirect_dir = _switch(key, value, ("on",), ("off", "follow", "nofollow"))
        if value == "nofollow":
            _warn_once(
                config, "redirect_dir=nofollow: redirects already in the layers are followed"
            )
    elif key == "metacopy":
        config.metacopy = _switch(key, value, ("on",), ("off",))
        config.metacopy_given = True
    elif key == "index":
        config.index = _switch(key, value, ("on",), ("off",))
    elif key == "timeout":
        try:
            config.timeout = float(value)
        except ValueError:
            raise OptionError(f"option timeout wants seconds, not {value!r}") from None
        if not 0 <= config.timeout < 1e12:
            raise OptionError(f"option timeout={value} is out of range")
    elif key == "whiteout":
        if value not in ("overlay", "oci"):
            raise OptionError(f"whiteout must be overlay or oci, not {value!r}")
        config.whiteout_format = value
    elif key == "xino":
        if value not in ("", "on", "off", "auto"):
            raise OptionError(f"option xino wants on, off or auto, not {value!r}")
        if value == "off":
            _warn_once(config, "xino=off: st_ino stays unique across layers (always on)")
        else:
            _note(config, option, "inode numbers are unique across layers already")
    elif key == "nfs_export":
        if _switch(key, value, ("on",), ("off",)):
            raise OptionError("nfs_export=on is not supported (FUSE mounts are not NFS-exported)")
    elif key == "verity":
        if _switch(key, value, ("on", "require"), ("off",)):
            raise OptionError(f"verity={value} is not supported (no fs-verity checks)")
    elif key == "xattr_permissions":
        if _int_option(key, value) != 0:
            raise OptionError(
                f"xattr_permissions={value} is not supported: owners and modes are stored as "
                "the files' own (use uidmapping=/squash_to_uid= to change how they show)"
            )
    elif key == "plugins":
        if value:
            raise OptionError("plugins= (fuse-overlayfs layer plugins) is not supported")
    elif key == "rootmode":
        try:
            mode = int(value, 8)
        except ValueError:
            raise OptionError(f"option rootmode wants an octal mode, not {value!r}") from None
        if not stat.S_ISDIR(mode):
            raise OptionError(f"rootmode={value}: the root of a union is always a directory")
        _note(config, option, "libfuse sets the root's mode; the union's root is a directory")
    elif key == "noxattrs":
        config.xattrs = value != "" and _int_option(key, value) == 0
    elif key == "fsname":
        if not value or any(character in value for character in " \t\n\\,"):
            raise OptionError(f"fsname={value!r}: want a name without spaces or commas")
        config.fsname = value


def _set_debug(config: MountConfig) -> None:
    config.debug = True


def _set_squash_to_root(config: MountConfig) -> None:
    config.squash_to_root = True


def _set_volatile(config: MountConfig) -> None:
    config.volatile = True


def _set_reuse_volatile(config: MountConfig) -> None:
    config.reuse_volatile = True


def _set_userxattr(config: MountConfig) -> None:
    config.userxattr = True


def _set_static_nlink(config: MountConfig) -> None:
    config.static_nlink = True


def _set_nonempty(config: MountConfig) -> None:
    config.nonempty = True


def _set_watch(config: MountConfig) -> None:
    config.watch = True


def _set_acl(config: MountConfig) -> None:
    config.posix_acl = True


def _set_noacl(config: MountConfig) -> None:
    config.posix_acl = False


_FLAG_OPTIONS = {
    "debug": _set_debug,
    "squash_to_root": _set_squash_to_root,
    "volatile": _set_volatile,
    "reuse_volatile": _set_reuse_volatile,
    "userxattr": _set_userxattr,
    "static_nlink": _set_static_nlink,
    "nonempty": _set_nonempty,
    "acl": _set_acl,
    "watch": _set_watch,
    "noacl": _set_noacl,
}


def fuse_mount_options(config: MountConfig, *, root: bool) -> list[str]:
    """What reaches libfuse, contradictions resolved (the last given wins): as root (also root
    in a user namespace) ``allow_other`` and ``suid`` by default, as fuse-overlayfs does, so
    that every uid in a container can use the mount with normal permission checks
    (``default_permissions``, always on). libfuse mounts ``nodev`` unless ``dev`` is given."""
    chosen: dict[str, str] = {}  # flag family -> option
    given = ["allow_other", "suid", *config.fuse_options] if root else list(config.fuse_options)
    extra: list[str] = []
    for option in given:
        if option in KERNEL_FLAGS:
            chosen[KERNEL_FLAGS[option]] = option
        elif option in ("allow_other", "allow_root"):
            chosen["allow"] = option
        elif option not in extra:
            extra.append(option)
    if config.read_only or config.upper is None:
        chosen["ro"] = "ro"
    options = [option for option in chosen.values() if option != "rw"]
    return ["default_permissions", f"fsname={config.fsname}", *options, *extra]

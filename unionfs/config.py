"""MountConfig: everything a mount needs, already validated into plain values."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class IdMapping:
    """One ``uidmapping=``/``gidmapping=`` range as fuse-overlayfs reads it: ids
    ``on_disk``..``on_disk+size-1`` stored in the layers show as ``shown``..``shown+size-1``
    through the mount (``uidmapping=0:1000:1``: a file owned by 0 shows as owned by 1000)."""

    on_disk: int
    shown: int
    size: int


@dataclass(slots=True)
class MountConfig:
    lowers: list[str]  # base first
    mountpoint: str
    upper: str | None = None
    workdir: str | None = None
    foreground: bool = False
    debug: bool = False
    log_file: str | None = None
    whiteout_format: str = "overlay"  # or "oci"
    # Data-only lower layers (the kernel's lowerdir=A::DATA, datadir+=DATA; --data-layer), in
    # search order: never listed nor looked up, only read as the data of metacopy files whose
    # absolute overlay.redirect finds no data in the regular lowers.
    data_layers: list[str] = field(default_factory=list)
    # Options for libfuse and the kernel (allow_other, suid, nodev, noexec, ...), in the order
    # given: where two contradict (suid, nosuid) the last one wins (options.fuse_mount_options).
    fuse_options: list[str] = field(default_factory=list)
    fsname: str = "unionfs"  # the mount's source in /proc/mounts
    read_only: bool = False
    timeout: float = 86400.0  # entry/attr cache timeout in seconds
    uid_mappings: list[IdMapping] = field(default_factory=list)
    gid_mappings: list[IdMapping] = field(default_factory=list)
    squash_to_root: bool = False  # every owner shows as 0 (squash_to_uid/gid win over it)
    squash_uid: int | None = None
    squash_gid: int | None = None
    fsync: bool = True
    volatile: bool = False  # no syncs; WORKDIR/work/incompat/volatile marks the upper meanwhile
    reuse_volatile: bool = False  # mount an upper a volatile mount did not leave cleanly
    redirect_dir: bool = True  # renaming a directory with lower content (off: EXDEV)
    writeback: bool = True  # kernel write-back cache (errors such as ENOSPC surface at close)
    metacopy: bool = True  # chmod/chown/utimes/xattrs/rename copy metadata only
    metacopy_given: bool = False  # metacopy= was given (redirect_dir=off then conflicts)
    index: bool = True  # record copied-up lower hard links in WORKDIR/index (kernel index=on)
    userxattr: bool = False  # write user.overlay.* even where trusted.overlay.* would work
    static_nlink: bool = False  # directories show st_nlink 1 (fuse-overlayfs static_nlink)
    xattrs: bool = True  # noxattrs=1: extended attributes are refused (ENOTSUP)
    posix_acl: bool = True  # FUSE_POSIX_ACL: the kernel enforces and caches POSIX ACLs (noacl: off)
    nonempty: bool = False  # mounting over a non-empty directory is allowed
    # -o quota=SIZE / quota_inodes=N (unionfs.quota); quota=none forgets a recorded limit
    quota_bytes: int | None = None
    quota_inodes: int | None = None
    quota_remove: bool = False
    writeback_given: bool = False  # writeback= was given (a quota turns the default off)
    watch: bool = False  # -o watch: follow changes of the lower layers (unionfs.watch)
    fake: bool = False  # mount(8)'s -f: check everything, mount nothing
    warnings: list[str] = field(default_factory=list)  # printed by the CLI, one line each
    notes: list[str] = field(default_factory=list)  # options accepted with no effect (--debug)

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.read_only

    @property
    def squashing(self) -> bool:
        return self.squash_to_root or self.squash_uid is not None or self.squash_gid is not None

"""MountConfig: everything a mount needs, already validated into plain values."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class IdMapping:
    """One ``C:H:S`` range: container ids C..C+S-1 are host ids H..H+S-1."""

    container: int
    host: int
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
    fuse_options: list[str] = field(default_factory=list)  # passed to the kernel/libfuse
    read_only: bool = False
    timeout: float = 86400.0  # entry/attr cache timeout in seconds
    uid_mappings: list[IdMapping] = field(default_factory=list)
    gid_mappings: list[IdMapping] = field(default_factory=list)
    squash_uid: int | None = None
    squash_gid: int | None = None
    fsync: bool = True
    redirect_dir: bool = True
    writeback: bool = True  # kernel write-back cache (errors such as ENOSPC surface at close)
    metacopy: bool = True  # chmod/chown/utimes/xattrs/rename copy metadata only
    index: bool = True  # record copied-up lower hard links in WORKDIR/index (kernel index=on)
    warnings: list[str] = field(default_factory=list)

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.read_only

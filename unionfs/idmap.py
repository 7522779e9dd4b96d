"""Owner translation between the layers (ids on disk) and the mount (ids shown), as
fuse-overlayfs does it.

``uidmapping=D:S:N`` says ids D..D+N-1 stored in the layers show as S..S+N-1 through the mount:
with ``uidmapping=0:1000:1`` a file owned by 0 on disk shows as owned by 1000. Owners written
through the mount (chown, the owner of a new file) go the other way, shown -> on disk. podman
passes ``ContainerID:HostID:Size`` here: the image's ids on disk, shown as the ids its user
namespace maps them to. An id outside every range becomes the kernel's overflow id
(``/proc/sys/kernel/overflowuid``, normally 65534) in both directions, as in fuse-overlayfs.

``squash_to_uid``/``squash_to_gid`` (and ``squash_to_root``, which they override) make every
file show as owned by one id and leave stored owners alone; a chown then succeeds without
changing anything that cannot be changed (fuse-overlayfs ignores its errors too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from unionfs import safeio
from unionfs.config import IdMapping, MountConfig

OVERFLOW_FALLBACK = 65534


def overflow_id(kind: str) -> int:
    """The kernel's overflow uid or gid (``kind``: "uid" or "gid")."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}", encoding="ascii") as knob:
            return int(knob.read())
    except (OSError, ValueError):
        return OVERFLOW_FALLBACK


def _to_shown(value: int, ranges: Sequence[IdMapping]) -> int | None:
    for mapping in ranges:
        if mapping.on_disk <= value < mapping.on_disk + mapping.size:
            return mapping.shown + (value - mapping.on_disk)
    return None


def _to_disk(value: int, ranges: Sequence[IdMapping]) -> int | None:
    for mapping in ranges:
        if mapping.shown <= value < mapping.shown + mapping.size:
            return mapping.on_disk + (value - mapping.shown)
    return None


class IdMapper:
    def __init__(self, config: MountConfig) -> None:
        self.uids = list(config.uid_mappings)
        self.gids = list(config.gid_mappings)
        root = 0 if config.squash_to_root else None
        self.squash_uid = config.squash_uid if config.squash_uid is not None else root
        self.squash_gid = config.squash_gid if config.squash_gid is not None else root
        self.squashing = config.squashing
        self.overflow_uid = overflow_id("uid")
        self.overflow_gid = overflow_id("gid")

    @property
    def identity(self) -> bool:
        return not (self.uids or self.gids or self.squashing)

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner on disk -> the owner the mount shows."""
        if self.squash_uid is not None:
            uid = self.squash_uid
        elif self.uids:
            mapped = _to_shown(uid, self.uids)
            uid = self.overflow_uid if mapped is None else mapped
        if self.squash_gid is not None:
            gid = self.squash_gid
        elif self.gids:
            mapped = _to_shown(gid, self.gids)
            gid = self.overflow_gid if mapped is None else mapped
        return uid, gid

    def stored(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner given through the mount (-1 = unchanged) -> the owner to store on disk."""
        if uid != -1 and self.uids:
            mapped = _to_disk(uid, self.uids)
            uid = self.overflow_uid if mapped is None else mapped
        if gid != -1 and self.gids:
            mapped = _to_disk(gid, self.gids)
            gid = self.overflow_gid if mapped is None else mapped
        return uid, gid

    def chown(self, dir_fd: int, name: bytes | None, uid: int, gid: int) -> None:
        """chown(2) of an upper object (``name`` in ``dir_fd``, or ``dir_fd`` itself) to the
        owner given through the mount (-1: unchanged). With squashing the shown owner cannot
        change, so a refused chown is no error."""
        uid, gid = self.stored(uid, gid)
        if not self.squashing:
            safeio.chown(dir_fd, name, uid, gid)
            return
        with contextlib.suppress(PermissionError):
            safeio.chown(dir_fd, name, uid, gid)

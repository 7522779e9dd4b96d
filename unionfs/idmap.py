"""Owner translation between the layers (host ids) and the mount (container ids).

``uidmapping=C:H:S`` (fuse-overlayfs syntax) says container ids C..C+S-1 are stored as host
ids H..H+S-1. Attributes shown through the mount are translated host -> container; owners
written (chown, new files) container -> host. Ids outside every range show as the overflow
id 65534 and cannot be written (EINVAL), as in a user namespace. ``squash_to_uid``/``gid`` (and
``squash_to_root``) make every file appear owned by one id and leave stored owners alone.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from unionfs.config import IdMapping, MountConfig

OVERFLOW_ID = 65534


def _translate(value: int, ranges: Sequence[IdMapping], *, to_container: bool) -> int | None:
    for mapping in ranges:
        source, target = (
            (mapping.host, mapping.container) if to_container else (mapping.container, mapping.host)
        )
        if source <= value < source + mapping.size:
            return target + (value - source)
    return None


class IdMapper:
    def __init__(self, config: MountConfig) -> None:
        self.uids = list(config.uid_mappings)
        self.gids = list(config.gid_mappings)
        self.squash_uid = config.squash_uid
        self.squash_gid = config.squash_gid

    @property
    def identity(self) -> bool:
        return not (
            self.uids or self.gids or self.squash_uid is not None or self.squash_gid is not None
        )

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """Stored (host) owner -> the owner the mount shows."""
        if self.squash_uid is not None:
            uid = self.squash_uid
        elif self.uids:
            mapped_uid = _translate(uid, self.uids, to_container=True)
            uid = OVERFLOW_ID if mapped_uid is None else mapped_uid
        if self.squash_gid is not None:
            gid = self.squash_gid
        elif self.gids:
            mapped = _translate(gid, self.gids, to_container=True)
            gid = OVERFLOW_ID if mapped is None else mapped
        return uid, gid

    def stored(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner given through the mount (-1 = unchanged) -> the owner to store."""
        if uid != -1 and self.uids:
            mapped = _translate(uid, self.uids, to_container=False)
            if mapped is None:
                raise OSError(errno.EINVAL, f"uid {uid} is not mapped")
            uid = mapped
        if gid != -1 and self.gids:
            mapped = _translate(gid, self.gids, to_container=False)
            if mapped is None:
                raise OSError(errno.EINVAL, f"gid {gid} is not mapped")
            gid = mapped
        return uid, gid

"""The classic permission check of ``access(2)``: owner, group and other bits of what the
mount shows (asked only without ``default_permissions``; the kernel checks otherwise)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable


def may_access(
    mode: int,
    owner: tuple[int, int],
    caller: tuple[int, int],
    in_group: Callable[[int], bool],
    wanted: int,
) -> bool:
    """Whether ``caller`` (uid, gid) may access an object of ``mode`` owned by ``owner``
    (uid, gid) as ``wanted`` (``os.R_OK | os.W_OK | os.X_OK`` bits). ``in_group(gid)`` says
    whether the caller's supplementary groups hold ``gid`` (asked only when needed). Root
    may do anything but execute a file no one may execute."""
    uid, gid = owner
    if caller[0] == 0:
        return not (wanted & os.X_OK) or bool(mode & 0o111) or stat.S_ISDIR(mode)
    if caller[0] == uid:
        bits = (mode >> 6) & 7
    elif caller[1] == gid or in_group(gid):
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return (wanted & bits) == wanted

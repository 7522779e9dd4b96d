"""Layer directories reached through private, detached clones of their mounts.

A daemon's open fds keep the mounts they were opened on busy: ``umount LOWERFS`` fails with
EBUSY while the daemon still holds a layer fd, and between the kernel's unmount of the union
(``fusermount3 -u`` returns) and the daemon's exit there is always such a moment. So the
daemon opens its layers through clones: ``open_tree(path, OPEN_TREE_CLONE)`` makes a copy of
the mount at ``path`` that is attached nowhere, and every fd opened below it refers to the
clone, not to the user's mount. ``umount LOWERFS`` then succeeds at any moment; the filesystem
itself lives on (as after ``umount -l``) until the daemon has closed its last fd, which it does
as soon as the union is unmounted.

Clones are not recursive: a layer with another mount below it is opened by its plain path (a
clone would hide that mount). The upper and the work directory must share one mount object
(copy-up links files from one into the other), so both are reached through one clone of their
mount, rooted at their nearest common directory. ``open_tree`` needs CAP_SYS_ADMIN over the
mount namespace: root, or root in the user namespace of rootless podman. Where it is refused,
the plain paths are used and the daemon releases its fds right after the unmount (best effort).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from unionfs.mountinfo import mount_points

log = logging.getLogger(__name__)

SYS_OPEN_TREE = 428  # the same number on every architecture (unified syscall table)
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


def open_tree_clone(path: str) -> int:
    """An fd of a detached, private clone of the mount at ``path`` (rooted at ``path``)."""
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPEN_TREE),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "/" or path == ancestor or path.startswith(ancestor + "/")


def mount_point_of(real: str, points: list[str]) -> str:
    """The mount point of the mount holding the resolved path ``real``."""
    best = "/"
    for point in points:
        if _inside(real, point) and len(point) >= len(best):
            best = point
    return best


def has_mounts_below(real: str, points: list[str]) -> bool:
    return any(point != real and _inside(point, real) for point in points)


class DetachedTrees:
    """Clones made for one mount's layers. ``close`` drops this object's own fds: the layers'
    fds keep the clones alive, and the last of them closing releases each one."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._fds: list[int] = []
        self._points = mount_points() if enabled else []

    def _clone(self, real: str) -> int | None:
        if not self.enabled:
            return None
        try:
            fd = open_tree_clone(real)
        except OSError as error:
            if error.errno in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                self.enabled = False  # no privilege here: plain paths for the rest too
            log.debug("plain path for %s (no detached clone: %s)", real, error.strerror)
            return None
        self._fds.append(fd)
        return fd

    def layer(self, path: str) -> str:
        """A path reaching the directory ``path`` through a clone of its mount (or ``path``)."""
        real = os.path.realpath(path)
        if has_mounts_below(real, self._points):
            return path
        fd = self._clone(real)
        return path if fd is None else f"/proc/self/fd/{fd}"

    def upper_and_work(self, upper: str, work: str) -> tuple[str, str]:
        """Paths reaching ``upper`` and ``work`` through one clone, rooted at their nearest
        common directory (on their common mount; nothing else may be mounted below it)."""
        real_upper, real_work = os.path.realpath(upper), os.path.realpath(work)
        common = os.path.commonpath([real_upper, real_work])
        point = mount_point_of(real_upper, self._points)
        if mount_point_of(real_work, self._points) != point or has_mounts_below(
            common, self._points
        ):
            return upper, work
        fd = self._clone(common)
        if fd is None:
            return upper, work
        base = f"/proc/self/fd/{fd}"
        prefix = len(common.rstrip("/"))
        return base + real_upper[prefix:], base + real_work[prefix:]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

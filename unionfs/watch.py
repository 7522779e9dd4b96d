"""``-o watch``: inotify watches on every directory of the lower layers (a small ctypes
wrapper: the three syscalls and the event layout are all it needs, no dependency).

One watch per lower directory, added by a walk (dirfd-relative, ``O_NOFOLLOW``; a watch is
added through ``/proc/self/fd/N`` of the directory's own fd, so a symlink in a layer never
leads a watch outside it). Directories a layer gains later are watched when their creation
is seen. The kernel charges each watch to the user (``fs.inotify.max_user_watches``, shared
by all of the user's processes): when it is reached the walk stops with one warning and the
directories left unwatched need ``unionfs refresh``. Cost: the kernel's mark (and the pinned
inode of each watched directory) plus a dict entry here per directory (measured in the
README). Events are turned into ``{lower directory path: {names}}`` for ``refresh``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass, field

from unionfs import safeio
from unionfs.layer import Layer
from unionfs.safeio import RelPath

log = logging.getLogger(__name__)

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# No IN_MODIFY: one event per write(2) would cost a refresh each; a file rewritten in place
# shows once its writer closes it (IN_CLOSE_WRITE).
MASK = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)
MAX_DEPTH = 4096
READ_SIZE = 1 << 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class WatchLimit(Exception):
    """The user's inotify watch limit is reached."""


@dataclass
class Changes:
    """What one read of the event queue says: names changed per lower directory path."""

    names: dict[RelPath, set[bytes]] = field(default_factory=dict)
    overflow: bool = False


class Watcher:
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            number = ctypes.get_errno()
            raise OSError(number, f"inotify_init1: {os.strerror(number)}")
        self.fd: int = fd
        self.watched: dict[int, tuple[Layer, RelPath]] = {}
        self.limited = False  # the watch limit was hit: part of the layers is unwatched
        self.events = 0

    def close(self) -> None:
        os.close(self.fd)

    def _add(self, dir_fd: int, layer: Layer, path: RelPath) -> None:
        # The fd's /proc link is followed on purpose: it is the directory opened (no
        # IN_DONT_FOLLOW, which would refuse the link itself).
        wd = _libc.inotify_add_watch(self.fd, b"/proc/self/fd/%d" % dir_fd, MASK)
        if wd < 0:
            number = ctypes.get_errno()
            if number == errno.ENOSPC:
                raise WatchLimit()
            if number in (errno.ENOENT, errno.EACCES, errno.ENOTDIR):
                return  # gone meanwhile, or unreadable: nothing to follow there
            raise OSError(number, os.strerror(number))
        self.watched[wd] = (layer, path)

    def watch_tree(self, layer: Layer, path: RelPath = ()) -> int:
        """Watch ``path`` of ``layer`` and every directory below it; returns how many
        watches were added. Stops (logging one warning) at the user's watch limit."""
        if self.limited:
            return 0
        added = len(self.watched)
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=layer.root_fd)
            try:
                for name in path:
                    child = safeio.open_dir(fd, name)
                    os.close(fd)
                    fd = child
            except OSError:
                os.close(fd)
                return 0
            self._walk(fd, layer, path)
        except WatchLimit:
            self.limited = True
            limit = _max_user_watches()
            log.warning(
                "watch: the inotify watch limit (fs.inotify.max_user_watches=%s) is reached "
                "after %d directories: changes elsewhere need `unionfs refresh`",
                limit,
                len(self.watched),
            )
        return len(self.watched) - added

    def _walk(self, root_fd: int, layer: Layer, root_path: RelPath) -> None:
        """Iterative walk, one fd per level; ``root_fd`` is consumed."""
        try:
            self._add(root_fd, layer, root_path)
            subdirs = _subdirs(root_fd)
        except BaseException:
            os.close(root_fd)
            raise
        stack: list[tuple[int, RelPath, list[bytes]]] = [(root_fd, root_path, subdirs)]
        try:
            while stack:
                fd, path, names = stack[-1]
                if not names:
                    stack.pop()
                    os.close(fd)
                    continue
                name = names.pop()
                if len(stack) >= MAX_DEPTH:
                    continue
                try:
                    child = safeio.open_dir(fd, name)
                except OSError:
                    continue
                try:
                    self._add(child, layer, (*path, name))
                    subdirs = _subdirs(child)
                except BaseException:
                    os.close(child)
                    raise
                stack.append((child, (*path, name), subdirs))
        finally:
            for fd, _path, _names in stack:
                os.close(fd)

    def read(self) -> Changes:
        """Drain the event queue (non-blocking)."""
        changes = Changes()
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                break
            self._parse(data, changes)
        return changes

    def _parse(self, data: bytes, changes: Changes) -> None:
        offset = 0
        created_dirs: list[tuple[Layer, RelPath]] = []
        while offset + EVENT.size <= len(data):
            wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
            raw = data[offset + EVENT.size : offset + EVENT.size + length]
            offset += EVENT.size + length
            self.events += 1
            if mask & IN_Q_OVERFLOW:
                changes.overflow = True
                continue
            if mask & IN_IGNORED:
                self.watched.pop(wd, None)
                continue
            where = self.watched.get(wd)
            if where is None:
                continue
            layer, path = where
            name = raw.rstrip(b"\0")
            if not name:
                continue
            changes.names.setdefault(path, set()).add(name)
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                created_dirs.append((layer, (*path, name)))
        for layer, path in created_dirs:
            self.watch_tree(layer, path)


def _subdirs(fd: int) -> list[bytes]:
    return [name for name, kind in safeio.list_dir(fd) if kind == stat.S_IFDIR]


def _max_user_watches() -> str:
    try:
        with open("/proc/sys/fs/inotify/max_user_watches", encoding="ascii") as knob:
            return knob.read().strip()
    except OSError:
        return "?"

"""Copy-up origins: which lower object an upper object was copied from (``overlay.origin``).

Kernel overlayfs records, on every copy-up of a directory or of a file with one name (and of
an indexed hard link), the lower object's file handle in ``overlay.origin`` (struct ovl_fb,
see ``whiteout.encode_origin``). It uses it to show the lower inode number after a remount
(st_ino stays the same across copy-up and remounts) and to find hard links in the index.

``Origins`` encodes a lower object's origin (``name_to_handle_at`` + the filesystem UUID),
tells whether a lower object is the one a stored origin names (a candidate found by path:
the same name, or the object's redirect), and, only where the process may
(``CAP_DAC_READ_SEARCH``, i.e. root), finds the object by the handle itself
(``open_by_handle_at``), which also finds files renamed after their data was copied up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
from collections.abc import Sequence

from unionfs import safeio, whiteout

log = logging.getLogger(__name__)

_HEADER = 21  # version, magic, length, flags, handle type, 16-byte UUID
# The uuid's bytes in a stored origin: [_UUID_START:_UUID_STOP]. (Plain ints: the mypyc build
# cannot index bytes with a slice object held in a variable.)
_UUID_START = 5
_UUID_STOP = 21

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


class Origins:
    def __init__(self) -> None:
        self._uuids: dict[int, bytes] = {}  # st_dev of a filesystem -> its UUID
        self._unsupported: set[int] = set()  # filesystems without file handles
        self.by_handle = True  # open_by_handle_at allowed (until it answers EPERM)

    def uuid_of(self, fd: int, device: int) -> bytes:
        uuid = self._uuids.get(device)
        if uuid is None:
            uuid = self._uuids[device] = safeio.filesystem_uuid(fd)
        return uuid

    def encode(self, dir_fd: int, name: bytes, st: os.stat_result) -> bytes | None:
        """The origin record of object ``name`` in ``dir_fd`` (attributes ``st``), or None
        when its filesystem cannot tell."""
        if st.st_dev in self._unsupported:
            return None
        try:
            handle_type, handle = safeio.file_handle(dir_fd, name)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EOVERFLOW, errno.ENOSYS, errno.EINVAL):
                log.info("no file handles on device %d: no copy-up origins there", st.st_dev)
                self._unsupported.add(st.st_dev)
                return None
            raise
        uuid = self.uuid_of(dir_fd, st.st_dev)
        try:
            return whiteout.encode_origin(
                handle_type, handle, uuid, big_endian=sys.byteorder == "big"
            )
        except ValueError:
            self._unsupported.add(st.st_dev)
            return None

    def matches(self, stored: bytes, dir_fd: int, name: bytes, st: os.stat_result) -> bool:
        """Is lower object ``name`` (attributes ``st``) the one origin ``stored`` names?
        The handle must be equal; the UUID too, unless either side does not know it (a
        filesystem without one records zeros)."""
        if len(stored) < _HEADER:
            return False
        try:
            mine = self.encode(dir_fd, name, st)
        except OSError:
            return False
        if mine is None or len(mine) != len(stored):
            return False
        if mine == stored:
            return True
        unknown = bytes(16)
        return (
            mine[:_UUID_START] == stored[:_UUID_START]
            and mine[_UUID_STOP:] == stored[_UUID_STOP:]
            and unknown in (mine[_UUID_START:_UUID_STOP], stored[_UUID_START:_UUID_STOP])
        )

    def stat_by_handle(self, stored: bytes, mount_fds: Sequence[int]) -> os.stat_result | None:
        """The attributes of the object origin ``stored`` names, opened by its file handle
        through one of ``mount_fds`` (fds on the lower filesystems); None when it cannot be
        found or this process may not open by handle (it needs CAP_DAC_READ_SEARCH)."""
        if not self.by_handle or len(stored) <= _HEADER or stored[1] != 0xFB:
            return None
        length = min(stored[2], len(stored))
        handle = stored[_HEADER:length]
        handle_type = stored[4]
        wanted_uuid = stored[_UUID_START:_UUID_STOP]
        buffer = ctypes.create_string_buffer(8 + len(handle))
        ctypes.c_uint.from_buffer(buffer, 0).value = len(handle)
        ctypes.c_int.from_buffer(buffer, 4).value = handle_type
        ctypes.memmove(ctypes.addressof(buffer) + 8, handle, len(handle))
        tried: set[int] = set()
        for mount_fd in mount_fds:
            device = os.fstat(mount_fd).st_dev
            if device in tried or device in self._unsupported:
                continue
            tried.add(device)
            uuid = self.uuid_of(mount_fd, device)
            if wanted_uuid != bytes(16) and uuid != bytes(16) and uuid != wanted_uuid:
                continue
            fd = _open_by_handle_at(mount_fd, buffer, os.O_PATH | os.O_CLOEXEC)
            if fd < 0:
                code = ctypes.get_errno()
                if code == errno.EPERM:
                    log.info("open_by_handle_at not permitted: origins are found by path only")
                    self.by_handle = False
                    return None
                continue  # ESTALE (gone), EINVAL, ...: not on this filesystem
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if st.st_dev == device:
                return st
        return None

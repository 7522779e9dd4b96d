"""The hard-link index: lower hard links copied up stay one file across remounts.

When a lower file with several names is copied up through one of them, every other name must
keep showing the copy, also after a remount, when nothing in the upper layer sits at those
names. Kernel overlayfs (``index=on``) records this in ``WORKDIR/index``, and so do we, in
the same format, so that either reads what the other wrote:

- the copy carries ``overlay.origin``, the file handle of the lower inode (see
  ``whiteout.encode_origin``), and ``overlay.nlink``, the merged link count relative to the
  upper inode's own count (which includes the index entry);
- the copy is linked as ``WORKDIR/index/<hex of the origin>`` before any upper name, so a
  crash leaves either no copy or a complete one that every lower name finds.

This module owns that directory: computing a lower file's origin, finding and adding
entries, reading and writing the merged link count, and removing orphans at mount. What a
change does to the count is decided by the callers (copyup, mutations).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

from unionfs import safeio, whiteout
from unionfs.origin import Origins

log = logging.getLogger(__name__)


class HardLinkIndex:
    def __init__(self, fd: int, xattr_prefix: str, origins: Origins | None = None) -> None:
        self.fd = fd
        self.origins = origins if origins is not None else Origins()
        self.origin_xattr = xattr_prefix + "origin"
        self.nlink_xattr = xattr_prefix + "nlink"
        self.names: set[bytes] = {name for name, _kind in safeio.list_dir(fd)}
        self.removed_orphans = self._remove_orphans()

    # identity ------------------------------------------------------------------------
    def origin(self, dir_fd: int, name: bytes, st: os.stat_result) -> bytes | None:
        """The origin record of lower object ``name`` (None: its filesystem cannot say)."""
        return self.origins.encode(dir_fd, name, st)

    def find(self, origin: bytes) -> tuple[bytes, os.stat_result] | None:
        """(index name, attributes) of the copy of the lower inode ``origin``, if any."""
        name = whiteout.index_name(origin)
        if name not in self.names:
            return None
        st = safeio.try_lstat(self.fd, name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None  # (the kernel's whiteouts of fully deleted files show nothing more)
        return name, st

    def upper_entry_name(self, dir_fd: int, name: bytes, st: os.stat_result) -> bytes | None:
        """The index name of upper file ``name`` (attributes ``st``), when it is an indexed
        copy (origin recorded and the index entry is the same inode)."""
        origin = safeio.get_xattr(dir_fd, name, self.origin_xattr)
        if not origin:
            return None
        index = whiteout.index_name(origin)
        if index not in self.names:
            return None
        entry = safeio.try_lstat(self.fd, index)
        if entry is None or (entry.st_dev, entry.st_ino) != (st.st_dev, st.st_ino):
            return None
        return index

    # the merged link count -----------------------------------------------------------
    def link_difference(
        self, dir_fd: int, name: bytes | None, st: os.stat_result, lower_nlink: int
    ) -> int:
        """Merged link count minus the upper inode's link count, as recorded (a missing or
        malformed record counts the index entry as the one lower name not linked up)."""
        parsed = whiteout.parse_nlink(safeio.get_xattr(dir_fd, name, self.nlink_xattr))
        if parsed is None:
            return 0
        base, difference = parsed
        if base == "L":
            return lower_nlink + difference - st.st_nlink
        return difference

    def set_link_difference(self, dir_fd: int, name: bytes | None, difference: int) -> None:
        safeio.set_xattr(dir_fd, name, self.nlink_xattr, whiteout.encode_nlink(difference))

    # entries -------------------------------------------------------------------------
    def mark(self, fd: int, difference: int) -> None:
        """Give a copy being built (open ``fd``) its link-count record (its origin is
        recorded by the copy-up, as on every copy)."""
        safeio.set_xattr(fd, None, self.nlink_xattr, whiteout.encode_nlink(difference))

    def add(self, origin: bytes, link: tuple[int, bytes | None]) -> bytes:
        """Link a finished copy into the index: ``link`` is (the O_TMPFILE fd, None) or
        (directory fd, name) of a named temporary file. Returns the index name."""
        name = whiteout.index_name(origin)
        stale = safeio.try_lstat(self.fd, name)
        if stale is not None and not stat.S_ISREG(stale.st_mode):
            safeio.remove_tree(self.fd, name)  # e.g. the kernel's whiteout of a deleted file
        fd, temp = link
        if temp is None:
            safeio.link_tmpfile(fd, self.fd, name)
        else:
            safeio.renameat2(fd, temp, self.fd, name, safeio.RENAME_NOREPLACE)
        self.names.add(name)
        return name

    def remove(self, name: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            safeio.unlink(self.fd, name)
        self.names.discard(name)

    def _remove_orphans(self) -> int:
        """Entries no name uses any more (a crash after the last name went, before the entry
        did): only the index links them and their merged count is zero."""
        removed = 0
        for name in list(self.names):
            st = safeio.try_lstat(self.fd, name)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                continue
            record = whiteout.parse_nlink(safeio.get_xattr(self.fd, name, self.nlink_xattr))
            if whiteout.index_entry_unused(st.st_nlink, record):
                self.remove(name)
                removed += 1
        return removed

    def close(self) -> None:
        os.close(self.fd)

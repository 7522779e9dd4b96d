"""Atomic copy-up of a lower file or directory chain into the upper layer.

A file is built as an anonymous ``O_TMPFILE`` in its upper parent (or under a temporary
name in the work directory when the filesystem lacks ``O_TMPFILE``): data extents only
(``SEEK_DATA``/``SEEK_HOLE`` + ``copy_file_range``), then owner, mode, xattrs and times, and
only then is it linked into place. A directory is made in the work directory, given its
metadata and renamed into place. So after a crash at any instant the upper holds either no
copy or a complete one. The caller holds the namespace lock, so nothing is copied up twice
at once; big files are copied in a worker thread so other requests keep being served.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
from collections.abc import Awaitable, Callable

from unionfs import safeio, whiteout
from unionfs.inodes import Node, merged_path
from unionfs.layer import Layer
from unionfs.quota import Quota
from unionfs.stack import Source
from unionfs.tree import MergedTree
from unionfs.workdir import WorkDir

THREAD_THRESHOLD = 1 << 20  # files bigger than this are copied off the event loop


class CopyUpMode(enum.Enum):
    """What a copy-up must bring up."""

    FULL = "full"  # the data (a write, an open for writing)
    METADATA = "metadata"  # metadata only when allowed (chmod/chown/utimes/xattrs/rename)
    EMPTY = "empty"  # no data: the caller truncates to zero next


FULL, METADATA, EMPTY = CopyUpMode.FULL, CopyUpMode.METADATA, CopyUpMode.EMPTY
RunInThread = Callable[[Callable[[], int]], Awaitable[int]]
Indexed = tuple[bytes, int]  # (origin record, merged link count minus the upper count)


def _mode_for_copy(st: os.stat_result, *, owner_kept: bool) -> int:
    """The copy's mode: set-id bits of a non-directory survive only with its owner (an
    unprivileged daemon's copy of a root set-uid file must not be set-uid to the daemon's
    user: tests/reliability/test_permissions.py::test_copy_up_never_widens_permissions)."""
    mode = stat.S_IMODE(st.st_mode)
    if not owner_kept and not stat.S_ISDIR(st.st_mode):
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
    return mode


def apply_metadata(fd: int, st: os.stat_result) -> None:
    """Owner first (chown clears set-id bits), then mode, on an open file."""
    owner_kept = True
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        owner_kept = False  # an unprivileged daemon keeps its own ownership
    os.fchmod(fd, _mode_for_copy(st, owner_kept=owner_kept))


def apply_path_metadata(dir_fd: int, name: bytes, st: os.stat_result, *, symlink: bool) -> None:
    owner_kept = True
    try:
        safeio.chown(dir_fd, name, st.st_uid, st.st_gid)
    except PermissionError:
        owner_kept = False
    if not symlink:
        mode = _mode_for_copy(st, owner_kept=owner_kept)
        safeio.chmod(dir_fd, name, mode)


class CopyUp:
    def __init__(
        self,
        tree: MergedTree,
        upper: Layer,
        work: WorkDir,
        run_in_thread: RunInThread,
        *,
        metacopy: bool = True,
    ) -> None:
        self.metacopy = metacopy
        self.prefix = work.xattr_prefix
        self.tree = tree
        self.upper = upper
        self.work = work
        self.run_in_thread = run_in_thread
        self.copies = 0
        self.bytes_copied = 0
        self.quota: Quota | None = None  # -o quota: a copy-up that cannot fit is refused first

    def ensure_dir(self, node: Node) -> None:
        """Make sure directory ``node`` and all its ancestors exist in the upper layer."""
        if node.in_upper:
            return
        link = node.primary_link()
        if link is None:
            raise FileNotFoundError(errno.ENOENT, "directory has no name")
        parent, name = link
        # Missing ancestors first, top down and without recursion: a tree can be deeper
        # than Python's recursion limit (test_copy_up_below_1000_directories).
        missing: list[Node] = []
        ancestor: Node | None = parent
        while ancestor is not None and not ancestor.in_upper:
            missing.append(ancestor)
            up = ancestor.primary_link()
            ancestor = up[0] if up is not None else None
        for directory in reversed(missing):
            self.ensure_dir(directory)
        source = node.lower[0]
        source_fd, source_name = source.layer.parent_and_name(source.path)
        st = safeio.lstat(source_fd, source_name)
        if not stat.S_ISDIR(st.st_mode):
            # The lower directory was replaced (by a symlink, say) under a live mount: never
            # give a new upper directory that object's mode (0777 for a symlink).
            raise OSError(errno.ESTALE, "lower directory replaced while mounted")
        parent_fd = self.upper.dir_fd(merged_path(parent))
        origin = self.tree.origins.encode(source_fd, source_name, st)
        if self.quota is not None:
            self.quota.require(self.quota.block, 1)
        temp = self.work.temp_name()
        safeio.mkdir(self.work.fd, temp, 0o700)
        self._finish_in_work(temp, source_fd, source_name, st, parent_fd, name, origin)
        if self.quota is not None:
            self.quota.charge_new(parent_fd, name)
        self._adopt_upper(node, parent, name, parent_fd)

    def _finish_in_work(
        self,
        temp: bytes,
        source_fd: int,
        source_name: bytes,
        st: os.stat_result,
        parent_fd: int,
        name: bytes,
        origin: bytes | None,
    ) -> None:
        """Give the object built at ``temp`` in the work directory the source's xattrs, its
        ``overlay.origin`` (the source's file handle), owner, mode and times, then rename it
        into place; on any failure nothing is left behind."""
        try:
            safeio.copy_xattrs(
                source_fd, source_name, self.work.fd, temp, keep=whiteout.is_copied_xattr
            )
            if origin is not None:
                self._set_origin(self.work.fd, temp, origin)
            apply_path_metadata(self.work.fd, temp, st, symlink=stat.S_ISLNK(st.st_mode))
            safeio.set_times(self.work.fd, temp, (st.st_atime_ns, st.st_mtime_ns))
            safeio.renameat2(self.work.fd, temp, parent_fd, name, safeio.RENAME_NOREPLACE)
        except BaseException:
            safeio.remove_tree(self.work.fd, temp)
            raise

    def _set_origin(self, dir_fd: int, name: bytes | None, origin: bytes) -> None:
        try:
            safeio.set_xattr(dir_fd, name, self.prefix + "origin", origin)
        except OSError as error:
            # user.* xattrs are refused on symlinks and devices (the kernel ignores that too)
            if error.errno not in (errno.EPERM, errno.ENOTSUP):
                raise

    async def ensure_file(
        self, node: Node, *, data: CopyUpMode = FULL, via: tuple[Node, bytes] | None = None
    ) -> None:
        """Make sure a non-directory has an upper object.

        ``data`` is FULL (copy the data), METADATA (for chmod/chown/utimes/xattrs/rename: a
        regular file gets a metadata-only copy whose data stays below, the kernel's metacopy
        format) or EMPTY (the caller truncates to zero next, so copy no data). A metadata-only
        copy asked for FULL or EMPTY is completed atomically in place.
        """
        if node.is_dir:
            self.ensure_dir(node)
            return
        if node.in_upper:
            if node.metacopy and (
                data != METADATA or (via is not None and not node.links.get(via))
            ):
                await self._complete_metacopy(node, empty=data == EMPTY)
            if via is not None and not node.links.get(via, True):
                self._link_lower_name(node, *via)
            return
        link = via if via is not None else node.primary_link()
        if link is None or not node.lower:
            raise FileNotFoundError(errno.ENOENT, "file has no name")
        parent, name = link
        if self.quota is not None:
            self._require_room(node, parent, data)
        self.ensure_dir(parent)
        parent_fd = self.upper.dir_fd(merged_path(parent))
        source = node.lower[0]
        source_dir_fd, source_name = source.layer.parent_and_name(source.path)
        st = safeio.lstat(source_dir_fd, source_name)
        metacopy = False
        indexed: Indexed | None = None
        if stat.S_ISREG(st.st_mode):
            indexed = self._index_record(node, source_dir_fd, source_name, st)
            if indexed is not None and data == METADATA:
                data = FULL  # an indexed copy is shared by every name: never metadata-only
            metacopy = data == METADATA and self.metacopy and st.st_size > 0
            if data == METADATA and not metacopy:
                data = FULL  # -o metacopy=off (or an empty file): the copy carries the data
            # The data: the lower file itself, or, when it is a metadata-only file of an
            # older upper (a rotated layer), the end of its chain. No redirect is written:
            # the copy sits where its lower entry is found again by name (a rename writes one).
            data_from = None
            if data == FULL:
                data_from = self.tree.data_source(node) if node.metacopy else source
            if self.quota is not None:
                self.quota.require(self._data_blocks(data_from), 1)
            await self._write_regular(
                data_from=data_from,
                size=0 if data == EMPTY else st.st_size,
                meta_fd=source_dir_fd,
                meta_name=source_name,
                meta_st=st,
                parent_fd=parent_fd,
                name=name,
                replace=False,
                private=self._copy_up_records(node, source_dir_fd, source_name, st, indexed)
                | ({"metacopy": b""} if metacopy else {}),
                indexed=indexed,
            )
            if metacopy and not node.metacopy:
                node.set_data(metacopy=node.metacopy, data=source)
        else:
            if self.quota is not None:
                self.quota.require(st.st_blocks * 512, 1)
            origin = self._origin_of(node, source_dir_fd, source_name, st)
            self._copy_special(source_dir_fd, source_name, st, parent_fd, name, origin)
        if self.quota is not None:
            self.quota.charge_new(parent_fd, name)
        node.set_data(metacopy=metacopy, data=node.data if metacopy else None)
        if indexed is not None:
            node.set_index(whiteout.index_name(indexed[0]), indexed[1])
        self._adopt_upper(node, parent, name, parent_fd)
        self.tree.consume_lower_link(node)
        node.new_generation()
        self.copies += 1

    def _origin_of(self, node: Node, dir_fd: int, name: bytes, st: os.stat_result) -> bytes | None:
        """The ``overlay.origin`` a copy of lower object ``name`` records: its file handle,
        as the kernel records it for a file with one name (a lower hard link copied up
        without the index breaks the link, so the kernel records no origin then)."""
        if st.st_nlink > 1 or node.lower_nlink > 1:
            return None
        return self.tree.origins.encode(dir_fd, name, st)

    def _copy_up_records(
        self,
        node: Node,
        dir_fd: int,
        name: bytes,
        st: os.stat_result,
        indexed: Indexed | None,
    ) -> dict[str, bytes]:
        """The overlay xattrs (names without the prefix) a regular file's copy records."""
        origin = indexed[0] if indexed is not None else self._origin_of(node, dir_fd, name, st)
        return {} if origin is None else {"origin": origin}

    def _index_record(
        self, node: Node, dir_fd: int, name: bytes, st: os.stat_result
    ) -> Indexed | None:
        """(origin, link-count difference) for the copy of a lower file with several names,
        when the index can record it; None for files with one name."""
        index = self.tree.index
        if index is None or st.st_nlink <= 1:
            return None
        origin = index.origin(dir_fd, name, st)
        if origin is None:
            return None
        # Merged count now: the lower names not yet copied up, deleted or replaced. Upper
        # count once only the index links the copy: 1. The difference is kept in between.
        remaining = max(st.st_nlink, node.lower_nlink) - node.lower_links_consumed
        return origin, remaining - 1

    def _link_lower_name(self, node: Node, parent: Node, name: bytes) -> None:
        """Another (lower) name of a hard-linked file that is already up: link it to the upper
        object, so every name keeps showing one inode (what kernel overlayfs's index does)."""
        self.ensure_dir(parent)
        source_fd, source_name = self.tree.upper_object(node)
        parent_fd = self.upper.dir_fd(merged_path(parent))
        safeio.link(source_fd, source_name, parent_fd, name)
        node.add_link(parent, name, in_upper=True)
        self.upper.note_entry(merged_path(parent), name, node.kind)
        self.tree.consume_lower_link(node)

    async def _complete_metacopy(self, node: Node, *, empty: bool) -> None:
        """Give a metadata-only upper file its data (or none, before a truncate to zero). Its
        origin and redirect stay (the kernel leaves both; the redirect keeps finding the
        origin by path after a remount)."""
        data_from = None if empty else self.tree.data_source(node)
        path = self.tree.upper_path(node)
        parent_fd = self.upper.dir_fd(path[:-1])
        name = path[-1]
        old = safeio.lstat(parent_fd, name)
        if self.quota is not None:
            self.quota.require(self._data_blocks(data_from), 0)
        kept = {}
        for record in ("origin", "redirect"):
            for prefix in (whiteout.TRUSTED_PREFIX, whiteout.USER_PREFIX):
                value = safeio.get_xattr(parent_fd, name, prefix + record)
                if value:
                    kept[record] = value
                    break
        await self._write_regular(
            data_from=data_from,
            size=0 if empty else old.st_size,
            meta_fd=parent_fd,
            meta_name=name,
            meta_st=old,
            parent_fd=parent_fd,
            name=name,
            replace=True,
            private=kept,
        )
        if self.quota is not None:
            self.quota.add((safeio.lstat(parent_fd, name).st_blocks - old.st_blocks) * 512)
        self.tree.inodes.drop_key((old.st_dev, old.st_ino), node)
        node.set_data(metacopy=False, data=None)
        self._adopt_upper(node, *node.upper_link_or_fail(), parent_fd)
        node.new_generation()
        self.copies += 1

    def _require_room(self, node: Node, parent: Node, data: CopyUpMode) -> None:
        """Refuse (EDQUOT) a copy-up of ``node`` whose data (when it brings its data) and
        missing parent directories cannot all fit, before any of them is made."""
        assert self.quota is not None
        missing = 0
        ancestor: Node | None = parent
        while ancestor is not None and not ancestor.in_upper and missing < 4096:
            missing += 1
            up = ancestor.primary_link()
            ancestor = up[0] if up is not None else None
        need = 0
        if data == FULL or (data == METADATA and not self.metacopy):
            need = self._data_blocks(
                self.tree.data_source(node) if node.metacopy else node.lower[0]
            )
        self.quota.require(need + missing * self.quota.block, 1 + missing)

    @staticmethod
    def _data_blocks(data_from: Source | None) -> int:
        """Bytes the copy of ``data_from``'s data allocates (its own allocation: holes are
        not copied)."""
        if data_from is None:
            return 0
        return int(data_from.layer.lstat(data_from.path).st_blocks) * 512

    def _adopt_upper(self, node: Node, parent: Node, name: bytes, parent_fd: int) -> None:
        st = safeio.lstat(parent_fd, name)
        self.tree.inodes.alias((st.st_dev, st.st_ino), node)
        node.copied_up(parent, name)
        self.upper.note_entry(merged_path(parent), name, node.kind)

    async def _write_regular(
        self,
        *,
        data_from: Source | None,
        size: int,
        meta_fd: int,
        meta_name: bytes,
        meta_st: os.stat_result,
        parent_fd: int,
        name: bytes,
        replace: bool,
        private: dict[str, bytes],
        indexed: Indexed | None = None,
    ) -> None:
        """Build a regular file off to the side (data from the lower file ``data_from``, if
        any) with the overlay xattrs ``private`` (``{"metacopy": b"", "origin": ...}``, names
        without the prefix), then link or rename it to parent/name (by way of the index when
        ``indexed``)."""
        temp = self.work.temp_name()
        try:
            target_fd = safeio.open_tmpfile(self.work.fd, os.O_RDWR | os.O_CLOEXEC)
            anonymous = True
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            target_fd = safeio.open_file(
                self.work.fd, temp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600
            )
            anonymous = False
        named = not anonymous
        try:
            if data_from is not None and size:
                await self._copy_lower_data(data_from, target_fd, size)
            else:
                os.ftruncate(target_fd, size)
            safeio.copy_xattrs(meta_fd, meta_name, target_fd, None, keep=whiteout.is_copied_xattr)
            for record, value in private.items():
                safeio.set_xattr(target_fd, None, self.prefix + record, value)
            index = self.tree.index if indexed is not None else None
            if index is not None and indexed is not None:
                index.mark(target_fd, indexed[1])
            apply_metadata(target_fd, meta_st)
            safeio.set_times(target_fd, None, (meta_st.st_atime_ns, meta_st.st_mtime_ns))
            if index is not None and indexed is not None:
                entry = index.add(
                    indexed[0], (target_fd, None) if anonymous else (self.work.fd, temp)
                )
                named = False
                safeio.link(index.fd, entry, parent_fd, name)
            elif anonymous and not replace:
                safeio.link_tmpfile(target_fd, parent_fd, name)
            else:
                if anonymous:
                    safeio.link_tmpfile(target_fd, self.work.fd, temp)
                    named = True
                flags = 0 if replace else safeio.RENAME_NOREPLACE
                safeio.renameat2(self.work.fd, temp, parent_fd, name, flags)
                named = False
        except BaseException:
            if named:
                with contextlib.suppress(OSError):
                    safeio.unlink(self.work.fd, temp)
            raise
        finally:
            os.close(target_fd)

    async def _copy_lower_data(self, data_from: Source, target_fd: int, size: int) -> None:
        """Copy the data extents of lower file ``data_from`` into ``target_fd`` (big files in a
        worker thread, so other requests keep being served)."""
        source_fd = safeio.open_lower_file(*data_from.layer.parent_and_name(data_from.path))
        try:

            def copy() -> int:
                return safeio.copy_data(source_fd, target_fd, size)

            self.bytes_copied += (
                await self.run_in_thread(copy) if size > THREAD_THRESHOLD else copy()
            )
        finally:
            os.close(source_fd)

    def _copy_special(
        self,
        source_dir_fd: int,
        source_name: bytes,
        st: os.stat_result,
        parent_fd: int,
        name: bytes,
        origin: bytes | None,
    ) -> None:
        temp = self.work.temp_name()
        if stat.S_ISLNK(st.st_mode):
            safeio.symlink(safeio.readlink(source_dir_fd, source_name), self.work.fd, temp)
        else:
            safeio.mknod(self.work.fd, temp, st.st_mode, st.st_rdev)
        self._finish_in_work(temp, source_dir_fd, source_name, st, parent_fd, name, origin)

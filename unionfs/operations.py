"""The pyfuse3 adapter: one error boundary, the namespace lock, and thread hops for slow work.

Handlers translate FUSE requests into calls on ``MergedTree`` (reads) and ``Mutations``
(writes). Invariants:
- code between two ``await``s runs atomically on the trio thread; every handler that changes
  the namespace or copies up holds ``self.lock`` for its whole duration, so no file is ever
  copied up twice and no one sees a half-done rename;
- only ``OSError`` and ``FUSEError`` leave the union code; the ``boundary`` decorator maps
  them to an errno, logs anything else and answers ``EIO`` — a handler can never end
  ``pyfuse3.main()`` and with it the mount. ``BaseException`` (trio cancellation) passes.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from unionfs import fuseconn, introspection, safeio, whiteout
from unionfs.attrs import entry_attributes, negative_entry
from unionfs.config import MountConfig
from unionfs.copyup import EMPTY, FULL, METADATA, CopyUp
from unionfs.handles import DirHandle, FileHandle, HandleTable
from unionfs.idmap import IdMapper
from unionfs.inodes import Node
from unionfs.mutations import Mutations
from unionfs.tree import MergedTree
from unionfs.workdir import WorkDir

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


def boundary(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn every failure of a handler into an errno reply."""

    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        tracing = log.isEnabledFor(logging.DEBUG)  # --debug: one line per request
        try:
            result = await handler(*args, **kwargs)
        except pyfuse3.FUSEError as error:
            if tracing:
                log.debug("%s%s -> errno %s", name, _brief(args[1:]), error.errno)
            raise
        except OSError as error:
            if tracing:
                log.debug("%s%s -> %s", name, _brief(args[1:]), error)
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if tracing:
            log.debug("%s%s -> %s", name, _brief(args[1:]), _brief_result(result))
        return result

    return wrapper


def _brief(args: tuple[object, ...]) -> str:
    shown = []
    for arg in args:
        if isinstance(arg, bytes) and len(arg) > 64:
            shown.append(f"<{len(arg)} bytes>")
        elif isinstance(arg, (int, bytes, str)):
            shown.append(repr(arg))
    return "(" + ", ".join(shown) + ")"


def _brief_result(result: object) -> str:
    if isinstance(result, pyfuse3.EntryAttributes):
        return f"ino={result.st_ino} size={result.st_size} mode={result.st_mode:o}"
    if isinstance(result, tuple):
        return " ".join(_brief_result(item) for item in result)
    if isinstance(result, pyfuse3.FileInfo):
        return f"fh={result.fh}"
    if isinstance(result, bytes):
        return f"<{len(result)} bytes>"
    return repr(result)


async def run_in_thread(function: Callable[[], int]) -> int:
    return await trio.to_thread.run_sync(function, limiter=COPY_LIMITER)


COPY_LIMITER = trio.CapacityLimiter(2)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    # With the write-back cache (default; -o writeback=0 turns it off) the kernel batches
    # writes and owns O_APPEND, size and mtime, and may read through a write-only handle:
    # upper files are opened O_RDWR without O_APPEND either way. Without it, O_APPEND is
    # the kernel's job too (it sends the end-of-file offset).
    enable_writeback_cache = True

    def __init__(self, tree: MergedTree, config: MountConfig, work: WorkDir | None) -> None:
        super().__init__()
        self.tree = tree
        self.config = config
        self.enable_writeback_cache = config.writeback  # read by pyfuse3 at INIT
        self.timeout = config.timeout
        self.handles = HandleTable()
        self.lock = trio.Lock()
        self.initialized = trio.Event()
        self.ids = IdMapper(config)
        self.mutations: Mutations | None = None
        self.copyup: CopyUp | None = None
        if tree.upper is not None and work is not None and config.writable:
            self.copyup = CopyUp(tree, tree.upper, work, run_in_thread, metacopy=config.metacopy)
            self.mutations = Mutations(
                tree,
                tree.upper,
                work,
                self.copyup,
                oci_whiteouts=config.whiteout_format == "oci",
                redirect_dir=config.redirect_dir,
            )

    def init(self) -> None:
        """Called by pyfuse3 when the kernel's INIT request arrives."""
        fuseconn.refuse_atomic_o_trunc()
        self.initialized.set()

    # helpers -------------------------------------------------------------------------
    def _writer(self) -> Mutations:
        if self.mutations is None:
            raise OSError(errno.EROFS, "read-only mount")
        return self.mutations

    def _attributes(self, node: Node, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        if st is None:
            st = self.tree.stat(node)
        if self.config.static_nlink and node.is_dir:
            nlink = 1  # -o static_nlink (fuse-overlayfs): no link counting for directories
        else:
            nlink = self.tree.nlink(node, st)
        attributes = entry_attributes(st, node.ino, nlink, self.timeout)
        if node.metacopy and node.data is not None:
            data = node.data  # the top object is all hole: show the data's allocation
            attributes.st_blocks = data.layer.lstat(data.path).st_blocks
        if not self.ids.identity:
            attributes.st_uid, attributes.st_gid = self.ids.shown(st.st_uid, st.st_gid)
        return attributes

    def _xattrs_enabled(self) -> None:
        """-o noxattrs=1: extended attributes are not supported (answered per request, never
        ENOSYS, which would make the kernel refuse introspection's xattrs too)."""
        if not self.config.xattrs:
            raise OSError(errno.ENOTSUP, "extended attributes are off (noxattrs)")

    def _owner(self, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """The stored owner of an object the caller creates."""
        return self.ids.stored(ctx.uid, ctx.gid)

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._attributes(node, st)

    def _node(self, inode: int) -> Node:
        return self.tree.inodes[inode]

    # lookups and attributes ----------------------------------------------------------
    @boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self._entry(parent, self.tree.stat(parent))
        if name == b"..":
            link = parent.primary_link()
            target = link[0] if link is not None else self.tree.root
            return self._entry(target, self.tree.stat(target))
        found = self.tree.lookup(parent, name)
        if found is None:
            return negative_entry(self.timeout)
        return self._entry(*found)

    @boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.tree.inodes.forget(inode, count)

    @boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    @boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.tree.readlink(self._node(inode))

    @boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Only asked without default_permissions: classic owner/group/other bits."""
        shown = self._attributes(self._node(inode))
        file_mode, uid, gid = shown.st_mode, shown.st_uid, shown.st_gid
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(file_mode & 0o111) or stat.S_ISDIR(file_mode)
        if ctx.uid == uid:
            bits = (file_mode >> 6) & 7
        elif ctx.gid == gid or gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (file_mode >> 3) & 7
        else:
            bits = file_mode & 7
        return (mode & bits) == mode

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        layer = self.tree.upper if self.tree.upper is not None else self.tree.stack.layers[0]
        info = os.statvfs(layer.root_fd)
        data = pyfuse3.StatvfsData()
        for field in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, field, getattr(info, field))
        return data

    # extended attributes -------------------------------------------------------------
    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        attribute = os.fsdecode(name)
        if attribute.startswith(introspection.PREFIX):
            return introspection.answer(self, self._node(inode), attribute)
        self._xattrs_enabled()
        stored = whiteout.stored_xattr_name(attribute)
        if stored is None:
            raise OSError(errno.ENODATA, "private")
        dir_fd, entry = self.tree.top_location(self._node(inode))
        value = safeio.get_xattr(dir_fd, entry, stored)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    @boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._xattrs_enabled()
        dir_fd, entry = self.tree.top_location(self._node(inode))
        shown = (whiteout.shown_xattr_name(stored) for stored in safeio.list_xattrs(dir_fd, entry))
        return [os.fsencode(name) for name in shown if name is not None]

    @boundary
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        attribute = os.fsdecode(name)
        self._xattrs_enabled()
        writer = self._writer()
        stored = whiteout.stored_xattr_name(attribute)
        if stored is None or attribute.startswith(introspection.PREFIX):
            raise OSError(errno.EPERM, "private attribute")
        async with self.lock:
            node = self._node(inode)
            await writer.prepare_change(node, METADATA)
            dir_fd, entry = writer.upper_location(node)
            safeio.set_xattr(dir_fd, entry, stored, value)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        attribute = os.fsdecode(name)
        self._xattrs_enabled()
        writer = self._writer()
        stored = whiteout.stored_xattr_name(attribute)
        if stored is None:
            raise OSError(errno.ENODATA, "private attribute")
        async with self.lock:
            node = self._node(inode)
            dir_fd, entry = self.tree.top_location(node)
            if safeio.get_xattr(dir_fd, entry, stored) is None:
                raise OSError(errno.ENODATA, "no such attribute")
            await writer.prepare_change(node, METADATA)
            dir_fd, entry = writer.upper_location(node)
            safeio.remove_xattr(dir_fd, entry, stored)

    # files ---------------------------------------------------------------------------
    @boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        writable = bool(flags & WRITE_FLAGS) or bool(flags & os.O_TRUNC)
        if writable:
            writer = self._writer()
            async with self.lock:
                # O_TRUNC arrives here only if fuseconn could not turn atomic O_TRUNC off;
                # normally the kernel strips it and sends SETATTR(size=0) after the open.
                truncate = bool(flags & os.O_TRUNC)
                await writer.prepare_change(node, EMPTY if truncate else FULL)
                dir_fd, name = writer.upper_location(node)
                assert name is not None
                fd = safeio.open_file(dir_fd, name, os.O_RDWR | (flags & os.O_TRUNC))
        else:
            fd = self.tree.open_for_read(node)
        number = self.handles.add_file(FileHandle(node, fd, node.generation, writable))
        return pyfuse3.FileInfo(fh=number, keep_cache=True)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.file(fh)
        if handle.generation != handle.node.generation and not handle.writable:
            self.handles.swap_fd(
                handle, self.tree.open_for_read(handle.node), handle.node.generation
            )
        return os.pread(handle.fd, size, off)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles.file(fh)
        return os.pwrite(handle.fd, buf, off)

    @boundary
    async def flush(self, fh: int) -> None:
        """Nothing to do, but answer (never ENOSYS): this round trip is what makes close() fail
        when the daemon has died. With the write-back cache the kernel writes a file's dirty
        pages back at close (or earlier, in its flusher); on a dead connection it drops them
        *without recording an error* (fs/fuse/file.c: fuse_send_writepage, "Fails on broken
        connection only"), so close() returned 0 for data that never reached the upper. After
        one ENOSYS the kernel never sends FLUSH again (fc->no_flush); answered, FLUSH comes after
        the write-back and fails with ENOTCONN on a dead connection, so close() reports the loss
        (test_regressions.py::test_close_reports_data_lost_when_the_daemon_dies)."""

    @boundary
    async def release(self, fh: int) -> None:
        self.handles.release_file(fh)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.config.fsync:
            return
        fd = self.handles.file(fh).fd
        sync = os.fdatasync if datasync else os.fsync
        await trio.to_thread.run_sync(sync, fd)

    # directories ---------------------------------------------------------------------
    @boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        return self.handles.add_dir(DirHandle(node, self.tree.list_dir(node)))

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles.dir(fh)
        node = handle.node
        if start_id == 0 and handle.started:
            handle.entries = self.tree.list_dir(node)
        handle.started = True
        position = start_id
        while position < len(handle.entries) + 2:
            if position < 2:
                if position == 0:
                    name, target = b".", node
                else:
                    link = node.primary_link()
                    name, target = b"..", (link[0] if link else self.tree.root)
                attributes = self._attributes(target)
                if not pyfuse3.readdir_reply(token, name, attributes, position + 1):
                    return
            else:
                name, _kind = handle.entries[position - 2]
                try:
                    found = self.tree.lookup(node, name)
                except OSError:
                    found = None
                if found is not None:
                    child, st = found
                    attributes = self._attributes(child, st)
                    if not pyfuse3.readdir_reply(token, name, attributes, position + 1):
                        return
                    child.lookups += 1
            position += 1

    @boundary
    async def releasedir(self, fh: int) -> None:
        self.handles.release_dir(fh)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if self.tree.upper is None or not self.config.fsync:
            return
        node = self.handles.dir(fh).node
        if not node.in_upper:
            return
        fd = (
            self.tree.upper.dir_fd(self.tree.upper_path(node))
            if node.ino != 1
            else self.tree.upper.root_fd
        )
        await trio.to_thread.run_sync(os.fsync, fd)

    # namespace changes ---------------------------------------------------------------
    @boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        writer = self._writer()
        async with self.lock:
            node, st, fd = writer.create(self._node(parent_inode), name, mode, *self._owner(ctx))
        number = self.handles.add_file(FileHandle(node, fd, node.generation, True))
        return pyfuse3.FileInfo(fh=number, keep_cache=True), self._entry(node, st)

    @boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        writer = self._writer()
        async with self.lock:
            node, st = writer.mkdir(self._node(parent_inode), name, mode, *self._owner(ctx))
        return self._entry(node, st)

    @boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        writer = self._writer()
        async with self.lock:
            node, st = writer.mknod(self._node(parent_inode), name, mode, rdev, *self._owner(ctx))
        return self._entry(node, st)

    @boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        writer = self._writer()
        async with self.lock:
            node, st = writer.symlink(self._node(parent_inode), name, target, *self._owner(ctx))
        return self._entry(node, st)

    @boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        writer = self._writer()
        async with self.lock:
            node, st = await writer.link(self._node(inode), self._node(new_parent_inode), new_name)
        return self._entry(node, st)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        writer = self._writer()
        async with self.lock:
            await writer.unlink(self._node(parent_inode), name)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        writer = self._writer()
        async with self.lock:
            writer.rmdir(self._node(parent_inode), name)

    @boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        writer = self._writer()
        async with self.lock:
            await writer.rename(
                self._node(parent_inode_old),
                name_old,
                self._node(parent_inode_new),
                name_new,
                flags,
            )

    @boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        writer = self._writer()
        async with self.lock:
            node = self._node(inode)
            if not node.in_upper and not node.lower and node.open_fds:
                # Unlinked while open (the kernel sets times at close): change the open
                # file itself (test_xattrs_of_an_unlinked_open_file). Only through a handle
                # open for writing: that fd is an upper file, never a lower one.
                fd = self._detached_upper_fd(node)
                if fd is not None:
                    self._apply_setattr(node, fd, None, attr, fields, fh)
                elif (
                    fields.update_size
                    or fields.update_mode
                    or fields.update_uid
                    or fields.update_gid
                ):
                    raise OSError(errno.ENOENT, "deleted, and only open for reading")
                # else: times the kernel flushes at close of a deleted lower file: nothing to do
                return self._attributes(node)
            if fields.update_size:
                data = EMPTY if attr.st_size == 0 else FULL
            else:
                data = METADATA
            await writer.prepare_change(node, data)
            dir_fd, name = writer.upper_location(node)
            self._apply_setattr(node, dir_fd, name, attr, fields, fh)
            return self._attributes(node)

    def _detached_upper_fd(self, node: Node) -> int | None:
        """An fd of an unlinked-but-open file that is safe to change: a writable handle's
        (always an upper file). A read-only handle may be a lower file: never that one."""
        for handle in self.handles.files.values():
            if handle.node is node and handle.writable:
                return handle.fd
        return None

    def _apply_setattr(
        self,
        node: Node,
        dir_fd: int,
        name: bytes | None,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
    ) -> None:
        target: Any = dir_fd if name is None else name
        at: dict[str, Any] = {} if name is None else {"dir_fd": dir_fd, "follow_symlinks": False}
        if fields.update_size:
            handle = self.handles.files.get(fh) if fh is not None else None
            if handle is not None and handle.writable:
                os.ftruncate(handle.fd, attr.st_size)
            elif name is None:
                os.ftruncate(dir_fd, attr.st_size)  # an open upper file (see setattr)
            else:
                fd = safeio.open_file(dir_fd, name, os.O_WRONLY)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            self.ids.chown(target, uid, attr.st_gid if fields.update_gid else -1, **at)
        if fields.update_mode:
            if stat.S_ISLNK(node.kind):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            os.chmod(target, stat.S_IMODE(attr.st_mode), **at)
        if fields.update_atime or fields.update_mtime:
            current = self.tree.stat(node)
            atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
            os.utime(target, ns=(atime, mtime), **at)

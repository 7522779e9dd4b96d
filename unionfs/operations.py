"""The pyfuse3 adapter: one error boundary, the namespace lock, and thread hops for slow work.

Handlers translate FUSE requests into calls on ``MergedTree`` (reads) and ``Mutations``
(writes). Invariants:
- code between two ``await``s runs atomically on the trio thread; every handler that changes
  the namespace or copies up holds ``self.lock`` for its whole duration, so no file is ever
  copied up twice and no one sees a half-done rename;
- most handlers are plain functions (``@boundary``): they answer at once, without a task or
  an ``await``, so each runs atomically. One that changes the namespace does its work at once
  only when ``self.lock`` is free and nothing needs copying up (then taking the lock would
  not have waited, and nothing in it awaits); otherwise it returns a coroutine that takes the
  lock and does the same work (its slow path). The patched pyfuse3's loop answers plain
  handlers inline and runs only such coroutines as tasks; on stock pyfuse3 ``boundary``
  makes every handler a coroutine function. Handlers that always wait (fsync, link, unlink,
  rename) are ``async def`` (``@async_boundary``);
- only ``OSError`` and ``FUSEError`` leave the union code; the boundary decorators map them
  to an errno, log anything else and answer ``EIO`` — a handler can never end
  ``pyfuse3.main()`` and with it the mount. ``BaseException`` (trio cancellation) passes.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import types
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NoReturn, ParamSpec, TypeAlias, TypeVar, cast

import pyfuse3
import trio

from unionfs import fuseconn, fusefeatures, introspection, refresh, safeio
from unionfs.assembly import Union, writers
from unionfs.attrs import entry_attributes, negative_entry
from unionfs.config import MountConfig
from unionfs.copyup import METADATA, CopyUp, CopyUpMode
from unionfs.handles import DirHandle, FileHandle, HandleTable, Listings
from unionfs.idmap import IdMapper
from unionfs.inodes import Node, link_path
from unionfs.mutations import AttrChange, Mutations
from unionfs.permissions import may_access
from unionfs.quota import Quota, lstat_upper
from unionfs.safeio import RelPath
from unionfs.watch import Watcher

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
Answer: TypeAlias = R | Coroutine[Any, Any, R]  # a plain handler's answer, or its slow path
FALLOCATE_MODES = (
    safeio.FALLOC_FL_KEEP_SIZE | safeio.FALLOC_FL_PUNCH_HOLE | (safeio.FALLOC_FL_ZERO_RANGE)
)


def _fail(name: str, args: tuple[object, ...], error: Exception) -> NoReturn:
    """Raise the FUSEError that answers ``error``."""
    if isinstance(error, pyfuse3.FUSEError):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%s -> errno %s", name, _brief(args[1:]), error.errno)
        raise error
    if isinstance(error, OSError):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%s -> %s", name, _brief(args[1:]), error)
        raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
    log.error("internal error in %s", name, exc_info=error)
    raise pyfuse3.FUSEError(errno.EIO) from None


async def _finish(name: str, args: tuple[object, ...], pending: Coroutine[Any, Any, R]) -> R:
    try:
        result = await pending
    except Exception as error:
        _fail(name, args, error)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s%s -> %s", name, _brief(args[1:]), _brief_result(result))
    return result


def boundary(handler: Callable[P, Answer[R]]) -> Callable[P, Answer[R]]:
    """Turn every failure of a plain handler (or of the coroutine it returns) into an errno
    reply. On a pyfuse3 without plain handlers (stock) the wrapper is itself the coroutine
    function pyfuse3 awaits (one coroutine per request, as for an ``async def`` handler)."""

    name = handler.__name__

    @functools.wraps(handler)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Answer[R]:
        try:
            result = handler(*args, **kwargs)
        except Exception as error:
            _fail(name, args, error)
        if type(result) is types.CoroutineType:
            return _finish(name, args, cast(Coroutine[Any, Any, R], result))
        if log.isEnabledFor(logging.DEBUG):  # --debug: one line per request
            log.debug("%s%s -> %s", name, _brief(args[1:]), _brief_result(result))
        return result

    if fusefeatures.has("sync_handlers"):
        return wrapper

    @functools.wraps(handler)
    async def stock_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        result = wrapper(*args, **kwargs)
        if type(result) is types.CoroutineType:
            return await cast(Coroutine[Any, Any, R], result)
        return cast(R, result)

    return cast(Callable[P, Answer[R]], stock_wrapper)


def async_boundary(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """``boundary`` for ``async def`` handlers."""

    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return await _finish(name, args, handler(*args, **kwargs))

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
WATCH_BATCH_SECONDS = 0.01


def invalidate(out: list[refresh.Invalidation]) -> None:
    """Make the kernel forget entries and inodes (from a worker thread only)."""
    for ino, name in out:
        try:
            if name is None:
                pyfuse3.invalidate_inode(ino, attr_only=False)
            else:
                pyfuse3.invalidate_entry(ino, name)
        except OSError:
            continue  # nothing cached there (ENOENT), or the mount is going away


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    # With the write-back cache (default; -o writeback=0 turns it off) the kernel batches
    # writes and owns O_APPEND, size and mtime, and may read through a write-only handle:
    # upper files are opened O_RDWR without O_APPEND either way. Without it, O_APPEND is
    # the kernel's job too (it sends the end-of-file offset).
    enable_writeback_cache = True
    # The kernel checks and caches POSIX ACLs itself (from the system.posix_acl_* xattrs we
    # pass through): no GETXATTR of system.posix_acl_access before every `ls -l` line.
    enable_acl = True
    # Patched pyfuse3 (fusefeatures): INIT capabilities asked for and refused.
    init_want = fusefeatures.FUSE_CAP_CACHE_SYMLINKS
    init_clear = fusefeatures.FUSE_CAP_ATOMIC_O_TRUNC

    def __init__(self, union: Union, config: MountConfig) -> None:
        super().__init__()
        self.tree = union.tree
        self.config = config
        self.enable_writeback_cache = config.writeback  # read by pyfuse3 at INIT
        self.enable_acl = config.posix_acl  # read by pyfuse3 at INIT
        self.timeout = config.timeout
        self.handles = HandleTable()
        self.listings = Listings()  # READDIR without OPENDIR (fusefeatures "no_opendir")
        self.lock = trio.Lock()
        self.initialized = trio.Event()
        self.ids = IdMapper(config)
        self.mutations: Mutations | None = None
        self.copyup: CopyUp | None = None
        tree, work = union.tree, union.work
        opened = writers(union, config, run_in_thread)
        if opened is not None:
            self.copyup, self.mutations = opened
        self.quota: Quota | None = None
        if self.copyup is not None and work is not None and tree.upper is not None:
            self.quota = Quota.open(
                work.path,
                tree.upper.root_fd,
                config.quota_bytes,
                config.quota_inodes,
                remove=config.quota_remove,
            )
            self.copyup.quota = self.quota
            if self.quota is not None and config.writeback and not config.writeback_given:
                # With the write-back cache a write past the limit would fail only when the
                # kernel writes the page back (close() answers EIO, the page cache keeps data
                # the upper never got): with a quota write(2) itself answers EDQUOT.
                self.enable_writeback_cache = False
            elif self.quota is not None and config.writeback:
                log.warning(
                    "quota with writeback=1: a write past the limit fails at write-back "
                    "(fsync answers EDQUOT, close EIO) and the kernel may show data the upper "
                    "never got"
                )
        self.refresher = refresh.Refresher(tree)
        self.watcher: Watcher | None = None  # -o watch, once it follows the lower layers
        self.no_opendir = fusefeatures.has("no_opendir")
        self.cache_readdir = fusefeatures.has("opendir_fileinfo") and fusefeatures.has(
            "fileinfo_flags"
        )
        self.noflush = fusefeatures.has("fileinfo_flags")
        fusefeatures.adapt_directory_handlers(self)

    def init(self) -> None:
        """Called by pyfuse3 when the kernel's INIT request arrives."""
        if fusefeatures.has("init_flags"):
            pass  # init_want / init_clear are applied by pyfuse3 itself
        else:
            fuseconn.adjust_capabilities(want=self.init_want, clear=self.init_clear)
        self.initialized.set()

    def report_capabilities(self) -> None:
        """Log what INIT negotiated (patched pyfuse3; the stock fallback logs in fuseconn)."""
        if not fusefeatures.has("init_flags"):
            return
        capable, want = pyfuse3.connection_capabilities()
        if capable & fusefeatures.FUSE_CAP_ATOMIC_O_TRUNC and not (
            want & fusefeatures.FUSE_CAP_ATOMIC_O_TRUNC
        ):
            log.info("atomic O_TRUNC turned off: O_TRUNC arrives as SETATTR(size=0)")
        log.info("INIT capabilities: offered %#x, asked for %#x", capable, want)

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
            found = data.layer.try_lstat(data.path)  # (None: in no data-only layer, see stack)
            if found is not None:
                attributes.st_blocks = found.st_blocks
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
        node.looked_up()
        return self._attributes(node, st)

    def _node(self, inode: int) -> Node:
        return self.tree.inodes[inode]

    @staticmethod
    def _ready(node: Node, data: CopyUpMode) -> bool:
        """Whether ``prepare_change(node, data)`` has nothing to do (the node is in the upper
        layer with its data): then a change needs no copy-up and no await."""
        if not node.in_upper:
            return False
        return node.is_dir or not (node.metacopy and data != METADATA)

    # quota ---------------------------------------------------------------------------
    def _link_paths(self, links: Sequence[tuple[Node, bytes]]) -> list[RelPath]:
        paths = []
        for parent, name in links:
            try:
                paths.append(link_path(parent, name))
            except OSError:
                continue
        return paths

    def _upper_stats(self, paths: list[RelPath]) -> list[os.stat_result | None]:
        assert self.tree.upper is not None
        return lstat_upper(self.tree.upper.try_lstat, paths)

    def _counted(
        self,
        links: Sequence[tuple[Node, bytes]],
        need_bytes: int,
        need_inodes: int,
        work: Callable[[], R],
    ) -> Callable[[], R]:
        """``work`` (a namespace change at ``links``) refused when what it needs cannot fit
        the quota, then charged or credited with what changed at those names."""
        quota = self.quota
        if quota is None:
            return work

        def counted() -> R:
            quota.require(need_bytes, need_inodes)
            paths = self._link_paths(links)
            before = quota.begin(self._upper_stats(paths))
            try:
                return work()
            finally:
                quota.settle(before, quota.snapshot(self._upper_stats(paths)))

        return counted

    async def _counted_async(
        self, links: Sequence[tuple[Node, bytes]], work: Callable[[], Awaitable[R]]
    ) -> R:
        """``_counted`` for changes that await (unlink, rename: they need no new inode)."""
        quota = self.quota
        if quota is None:
            return await work()
        paths = self._link_paths(links)
        before = quota.begin(self._upper_stats(paths))
        try:
            return await work()
        finally:
            quota.settle(before, quota.snapshot(self._upper_stats(paths)))

    def _counted_xattr(self, dir_fd: int, entry: bytes | None, change: Callable[[], None]) -> None:
        """An xattr change of an upper object: the block it may take (or free) is charged
        (never refused: at most one block per inode on common filesystems)."""
        if self.quota is None:
            change()
            return

        def blocks() -> int:
            st = os.fstat(dir_fd) if entry is None else safeio.lstat(dir_fd, entry)
            return int(st.st_blocks)

        before = blocks()
        try:
            change()
        finally:
            self.quota.add((blocks() - before) * 512)

    def _exclusive(self, work: Callable[[], R]) -> Answer[R]:
        """``work()`` (which never awaits) under the namespace lock: now if the lock is free,
        else once it is."""
        if not self.lock.locked():
            return work()
        return self._after_lock(work)

    async def _after_lock(self, work: Callable[[], R]) -> R:
        async with self.lock:
            return work()

    def _changing(self, node: Node, data: CopyUpMode, work: Callable[[], R]) -> Answer[R]:
        """``work()`` after ``prepare_change(node, data)``, under the namespace lock: now if
        the lock is free and nothing needs copying up, else in a coroutine."""
        if not self.lock.locked() and self._ready(node, data):
            return work()
        return self._change_after_lock(node, data, work)

    async def _change_after_lock(self, node: Node, data: CopyUpMode, work: Callable[[], R]) -> R:
        async with self.lock:
            await self._writer().prepare_change(node, data)
            return work()

    # lookups and attributes ----------------------------------------------------------
    @boundary
    def lookup(
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
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.tree.inodes.forget(inode, count)

    @boundary
    def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    @boundary
    def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.tree.readlink(self._node(inode))

    @boundary
    def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Only asked without default_permissions: classic owner/group/other bits."""
        shown = self._attributes(self._node(inode))
        return may_access(
            shown.st_mode,
            (shown.st_uid, shown.st_gid),
            (ctx.uid, ctx.gid),
            lambda gid: gid in pyfuse3.get_sup_groups(ctx.pid),
            mode,
        )

    @boundary
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        layer = self.tree.upper if self.tree.upper is not None else self.tree.stack.layers[0]
        info = os.fstatvfs(layer.root_fd)
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
        quota = self.quota
        if quota is not None and quota.limit_bytes is not None:
            # df shows the quota as the filesystem (as XFS project quotas do)
            blocks = max(quota.limit_bytes // data.f_frsize, 1)
            free = max(quota.limit_bytes - quota.used.bytes, 0) // data.f_frsize
            data.f_blocks = blocks
            data.f_bfree = min(free, data.f_bfree)
            data.f_bavail = min(free, data.f_bavail)
        if quota is not None and quota.limit_inodes is not None:
            data.f_files = quota.limit_inodes
            free_inodes = max(quota.limit_inodes - quota.used.inodes, 0)
            data.f_ffree = min(free_inodes, data.f_ffree)
            data.f_favail = min(free_inodes, data.f_favail)
        return data

    # live lower layers ---------------------------------------------------------------
    async def refresh_caches(self, node: Node) -> bytes:
        """``unionfs refresh``: drop the daemon's caches of ``node`` (under the namespace
        lock: no copy-up holds a cached fd meanwhile), then the kernel's, from a worker
        thread (the kernel may wait for requests of ours while it invalidates)."""
        async with self.lock:
            out = self.refresher.refresh_node(node)
        await trio.to_thread.run_sync(invalidate, out)
        return refresh.describe(out).encode()

    async def follow_lower_changes(self, watcher: Watcher) -> None:
        """``-o watch``: watch every lower directory, then refresh what the events name."""
        try:
            await self._follow(watcher)
        finally:
            watcher.close()

    async def _follow(self, watcher: Watcher) -> None:
        self.watcher = watcher
        for layer in self.refresher.lowers:
            await trio.to_thread.run_sync(watcher.watch_tree, layer)
        log.info("watch: %d lower directories watched", len(watcher.watched))
        while True:
            await trio.lowlevel.wait_readable(watcher.fd)
            # a burst of changes (an archive unpacked into a layer) becomes one refresh
            await trio.sleep(WATCH_BATCH_SECONDS)
            async with self.lock:
                changes = watcher.read()
                if changes.overflow:
                    log.warning("watch: inotify queue overflowed: refreshing everything")
                    out = self.refresher.refresh_all()
                else:
                    out = self.refresher.refresh_entries(changes.names)
            if out:
                await trio.to_thread.run_sync(invalidate, out)

    # extended attributes -------------------------------------------------------------
    @boundary
    def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Answer[bytes]:
        attribute = os.fsdecode(name)
        if attribute == introspection.REFRESH:
            if ctx.uid not in (0, os.geteuid()):
                raise OSError(errno.EPERM, "only the mount's owner may refresh it")
            return self.refresh_caches(self._node(inode))
        if attribute.startswith(introspection.PREFIX):
            return introspection.answer(self, self._node(inode), attribute)
        self._xattrs_enabled()
        return self.tree.get_xattr(self._node(inode), attribute)

    @boundary
    def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._xattrs_enabled()
        return [os.fsencode(name) for name in self.tree.list_xattrs(self._node(inode))]

    @boundary
    def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> Answer[None]:
        attribute = os.fsdecode(name)
        self._xattrs_enabled()
        writer = self._writer()
        if attribute.startswith(introspection.PREFIX):
            raise OSError(errno.EPERM, "private attribute")
        stored = writer.stored_xattr(attribute)
        node = self._node(inode)

        def change() -> None:
            dir_fd, entry = writer.upper_location(node)
            self._counted_xattr(dir_fd, entry, lambda: writer.set_xattr(node, stored, value))

        return self._changing(node, METADATA, change)

    @boundary
    def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Answer[None]:
        attribute = os.fsdecode(name)
        self._xattrs_enabled()
        writer = self._writer()
        stored = writer.stored_xattr(attribute, removing=True)
        node = self._node(inode)
        if not self.lock.locked() and self._ready(node, METADATA):
            self.tree.get_xattr(node, attribute)  # ENODATA when absent
            dir_fd, entry = writer.upper_location(node)
            self._counted_xattr(dir_fd, entry, lambda: writer.remove_xattr(node, stored))
            return None
        return self._remove_xattr_after_lock(writer, node, attribute, stored)

    async def _remove_xattr_after_lock(
        self, writer: Mutations, node: Node, attribute: str, stored: str
    ) -> None:
        async with self.lock:
            self.tree.get_xattr(node, attribute)  # before copying up: absent changes nothing
            await writer.prepare_change(node, METADATA)
            dir_fd, entry = writer.upper_location(node)
            self._counted_xattr(dir_fd, entry, lambda: writer.remove_xattr(node, stored))

    # files ---------------------------------------------------------------------------
    @boundary
    def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> Answer[pyfuse3.FileInfo]:
        node = self._node(inode)
        copy_up = Mutations.copy_up_for_open(flags)
        if copy_up is None:
            fd = self.tree.open_for_read(node)
            number = self.handles.add_file(FileHandle(node, fd, node.generation, False))
            # noflush: closing a read-only file needs no FLUSH round trip (a writable one
            # keeps it: see flush()).
            if self.noflush:
                return pyfuse3.FileInfo(fh=number, keep_cache=True, noflush=True)
            return pyfuse3.FileInfo(fh=number, keep_cache=True)
        writer = self._writer()

        def open_upper() -> pyfuse3.FileInfo:
            fd = writer.open_upper(node, flags)
            number = self.handles.add_file(FileHandle(node, fd, node.generation, True))
            return pyfuse3.FileInfo(fh=number, keep_cache=True)

        return self._changing(node, copy_up, open_upper)

    def _current_fd(self, handle: FileHandle) -> int:
        if handle.generation != handle.node.generation and not handle.writable:
            self.handles.swap_fd(
                handle, self.tree.open_for_read(handle.node), handle.node.generation
            )
        return handle.fd

    @boundary
    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._current_fd(self.handles.file(fh)), size, off)

    @boundary
    def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles.file(fh)
        if self.quota is not None:
            return self.quota.write(handle.fd, buf, off)
        return os.pwrite(handle.fd, buf, off)

    @boundary
    def flush(self, fh: int) -> None:
        """Nothing to do, but answer (never ENOSYS): this round trip is what makes close() fail
        when the daemon has died. With the write-back cache the kernel writes a file's dirty
        pages back at close (or earlier, in its flusher); on a dead connection it drops them
        *without recording an error* (fs/fuse/file.c: fuse_send_writepage, "Fails on broken
        connection only"), so close() returned 0 for data that never reached the upper. After
        one ENOSYS the kernel never sends FLUSH again (fc->no_flush); answered, FLUSH comes after
        the write-back and fails with ENOTCONN on a dead connection, so close() reports the loss
        (test_regressions.py::test_close_reports_data_lost_when_the_daemon_dies). Read-only
        opens ask for no FLUSH at all (noflush, patched pyfuse3)."""

    @boundary
    def release(self, fh: int) -> None:
        self.handles.release_file(fh)

    @async_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.config.fsync:
            return
        fd = self.handles.file(fh).fd
        sync = os.fdatasync if datasync else os.fsync
        await trio.to_thread.run_sync(sync, fd)

    @boundary
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """Patched pyfuse3 only (stock: the kernel answers EOPNOTSUPP). The handle is open for
        writing (the kernel insists), so its file was copied up at open."""
        if mode & ~FALLOCATE_MODES:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode not supported")
        handle = self.handles.file(fh)
        if not handle.writable:
            raise OSError(errno.EBADF, "not open for writing")
        if self.quota is None:
            safeio.fallocate(handle.fd, mode, offset, length)
            return
        grows = not mode & safeio.FALLOC_FL_PUNCH_HOLE
        blocks = self.quota.before_data_change(handle.fd, offset, length, grows=grows)
        try:
            safeio.fallocate(handle.fd, mode, offset, length)
        finally:
            self.quota.after_data_change(handle.fd, blocks)

    @boundary
    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE on the file's current data (patched pyfuse3 only; stock: the
        kernel treats the whole file as data)."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE are asked")
        return os.lseek(self._current_fd(self.handles.file(fh)), offset, whence)

    # directories ---------------------------------------------------------------------
    @boundary
    def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        if self.no_opendir:
            # The kernel then opens directories itself (no OPENDIR/RELEASEDIR again), caches
            # listings (FOPEN_CACHE_DIR), and READDIR names the directory by inode.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        number = self.handles.add_dir(DirHandle(node, self.tree.list_dir(node)))
        if self.cache_readdir:
            return pyfuse3.FileInfo(fh=number, cache_readdir=True, keep_cache=True)
        return number

    @boundary
    def readdir(self, inode: int, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """``inode`` 0 (stock pyfuse3) means: the handle's directory."""
        handle = self.handles.dirs.get(fh) if fh else None
        if handle is not None:
            node = handle.node
            if start_id == 0 and handle.started:
                handle.entries = self.tree.list_dir(node)
            handle.started = True
            self._reply_entries(node, handle.entries, start_id, 0, token)
            return
        if not inode:
            raise OSError(errno.EBADF, "bad directory handle")
        node = self._node(inode)
        generation, position = Listings.split(start_id)
        entries = self.listings.get(inode, generation) if start_id else None
        if entries is None:  # a new listing (or one whose snapshot was dropped)
            entries = self.tree.list_dir(node)
            generation = self.listings.start(inode, entries)
        if position >= len(entries) + 2:
            # The end-of-listing request (an empty answer): the reader is done with it. Not
            # earlier: after the last entries the kernel still asks once more from there.
            self.listings.finish(inode, generation)
            return
        self._reply_entries(node, entries, position, generation, token)

    def _reply_entries(
        self,
        node: Node,
        entries: list[tuple[bytes, int]],
        position: int,
        generation: int,
        token: pyfuse3.ReaddirToken,
    ) -> None:
        """Answer entries from ``position`` on until the reply is full. Offsets name the
        snapshot's ``generation`` (0 for a handle's)."""
        while position < len(entries) + 2:
            if position < 2:
                if position == 0:
                    name, target = b".", node
                else:
                    link = node.primary_link()
                    name, target = b"..", (link[0] if link else self.tree.root)
                attributes = self._attributes(target)
                if not pyfuse3.readdir_reply(
                    token, name, attributes, Listings.offset(generation, position + 1)
                ):
                    return
            else:
                name, _kind = entries[position - 2]
                try:
                    found = self.tree.lookup(node, name)
                except OSError:
                    found = None
                if found is not None:
                    child, st = found
                    attributes = self._attributes(child, st)
                    if not pyfuse3.readdir_reply(
                        token, name, attributes, Listings.offset(generation, position + 1)
                    ):
                        return
                    child.looked_up()
            position += 1

    @boundary
    def releasedir(self, fh: int) -> None:
        self.handles.release_dir(fh)

    @async_boundary
    async def fsyncdir(self, inode: int, fh: int, datasync: bool) -> None:
        """``inode`` 0 (stock pyfuse3) means: the handle's directory."""
        if self.tree.upper is None or not self.config.fsync:
            return
        node = self._node(inode) if inode else self.handles.dir(fh).node
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
    def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> Answer[tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]]:
        writer = self._writer()
        owner = self._owner(ctx)

        def make() -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
            node, st, fd = writer.create(self._node(parent_inode), name, mode, *owner)
            number = self.handles.add_file(FileHandle(node, fd, node.generation, True))
            return pyfuse3.FileInfo(fh=number, keep_cache=True), self._entry(node, st)

        return self._exclusive(self._counted([(self._node(parent_inode), name)], 0, 1, make))

    @boundary
    def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> Answer[pyfuse3.EntryAttributes]:
        writer = self._writer()
        owner = self._owner(ctx)
        parent = self._node(parent_inode)
        block = self.quota.block if self.quota is not None else 0
        return self._exclusive(
            self._counted(
                [(parent, name)],
                block,
                1,
                lambda: self._entry(*writer.mkdir(parent, name, mode, *owner)),
            )
        )

    @boundary
    def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> Answer[pyfuse3.EntryAttributes]:
        writer = self._writer()
        owner = self._owner(ctx)
        parent = self._node(parent_inode)
        return self._exclusive(
            self._counted(
                [(parent, name)],
                0,
                1,
                lambda: self._entry(*writer.mknod(parent, name, mode, rdev, *owner)),
            )
        )

    @boundary
    def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> Answer[pyfuse3.EntryAttributes]:
        writer = self._writer()
        owner = self._owner(ctx)
        parent = self._node(parent_inode)
        # a target too long for the inode itself takes a block (ext4: 60 bytes inline)
        block = self.quota.block if self.quota is not None and len(target) >= 60 else 0
        return self._exclusive(
            self._counted(
                [(parent, name)],
                block,
                1,
                lambda: self._entry(*writer.symlink(parent, name, target, *owner)),
            )
        )

    @async_boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        writer = self._writer()
        async with self.lock:
            node, st = await writer.link(self._node(inode), self._node(new_parent_inode), new_name)
        return self._entry(node, st)

    @async_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        writer = self._writer()
        async with self.lock:
            parent = self._node(parent_inode)
            await self._counted_async([(parent, name)], lambda: writer.unlink(parent, name))

    @boundary
    def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Answer[None]:
        writer = self._writer()

        def remove() -> None:
            writer.rmdir(self._node(parent_inode), name)

        return self._exclusive(self._counted([(self._node(parent_inode), name)], 0, 0, remove))

    @async_boundary
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
            old_parent = self._node(parent_inode_old)
            new_parent = self._node(parent_inode_new)
            await self._counted_async(
                [(old_parent, name_old), (new_parent, name_new)],
                lambda: writer.rename(old_parent, name_old, new_parent, name_new, flags),
            )

    @boundary
    def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> Answer[pyfuse3.EntryAttributes]:
        writer = self._writer()
        change = self._attr_change(attr, fields)
        if self.lock.locked():
            return self._setattr_after_lock(writer, inode, change, fh)
        node = self._node(inode)
        if self._detached(node):
            return self._setattr_detached(writer, node, change, fh)
        if not self._ready(node, change.copy_up):
            return self._setattr_after_lock(writer, inode, change, fh)
        dir_fd, name = writer.upper_location(node)
        self._apply_setattr(writer, node, dir_fd, name, change, fh)
        return self._attributes(node)

    async def _setattr_after_lock(
        self, writer: Mutations, inode: int, change: AttrChange, fh: int | None
    ) -> pyfuse3.EntryAttributes:
        async with self.lock:
            node = self._node(inode)
            if self._detached(node):
                return self._setattr_detached(writer, node, change, fh)
            await writer.prepare_change(node, change.copy_up)
            dir_fd, name = writer.upper_location(node)
            self._apply_setattr(writer, node, dir_fd, name, change, fh)
            return self._attributes(node)

    @staticmethod
    def _attr_change(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> AttrChange:
        """SETATTR's arguments as plain values (None: not asked to change)."""
        return AttrChange(
            size=attr.st_size if fields.update_size else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mode=attr.st_mode if fields.update_mode else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )

    @staticmethod
    def _detached(node: Node) -> bool:
        return not node.in_upper and not node.lower and bool(node.open_fds)

    def _setattr_detached(
        self, writer: Mutations, node: Node, change: AttrChange, fh: int | None
    ) -> pyfuse3.EntryAttributes:
        """Unlinked while open (the kernel sets times at close): change the open file itself
        (test_xattrs_of_an_unlinked_open_file). Only through a handle open for writing: that
        fd is an upper file, never a lower one."""
        fd = self._detached_upper_fd(node)
        if fd is not None:
            self._apply_setattr(writer, node, fd, None, change, fh)
        elif change.beyond_times:
            raise OSError(errno.ENOENT, "deleted, and only open for reading")
        # else: times the kernel flushes at close of a deleted lower file: nothing to do
        return self._attributes(node)

    def _detached_upper_fd(self, node: Node) -> int | None:
        """An fd of an unlinked-but-open file that is safe to change: a writable handle's
        (always an upper file). A read-only handle may be a lower file: never that one."""
        for handle in self.handles.files.values():
            if handle.node is node and handle.writable:
                return handle.fd
        return None

    def _truncate(self, fd: int, size: int) -> None:
        """ftruncate, its freed blocks credited to the quota. Growing allocates no block
        (the new part is a hole) so it is never refused; writing into it is."""
        if self.quota is None:
            os.ftruncate(fd, size)
            return
        blocks = self.quota.before_data_change(fd, 0, 0, grows=False)
        try:
            os.ftruncate(fd, size)
        finally:
            self.quota.after_data_change(fd, blocks)

    def _apply_setattr(
        self,
        writer: Mutations,
        node: Node,
        dir_fd: int,
        name: bytes | None,
        change: AttrChange,
        fh: int | None,
    ) -> None:
        handle = self.handles.files.get(fh) if fh is not None else None
        writer.change_attributes(
            node,
            dir_fd,
            name,
            change,
            open_fd=handle.fd if handle is not None and handle.writable else None,
            chown=self.ids.chown,
            truncate=self._truncate,
        )

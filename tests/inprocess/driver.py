"""Drive ``unionfs.operations.Operations`` in-process, without a kernel: paths in, the handlers'
answers out, errors as ``OSError`` with the errno the kernel would have been given.

The union is opened by the same factory as the mount (``unionfs.assembly``); the handlers run
in the test's trio loop (pytest-trio). What the kernel would do itself is done here the way it
does it: walking a path is one LOOKUP per component, a negative entry (inode 0) is ENOENT, a
file is written through CREATE/OPEN + WRITE + RELEASE, and a listing is OPENDIR + READDIR.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pyfuse3

from unionfs.assembly import Union, open_union
from unionfs.config import MountConfig
from unionfs.operations import Operations

T = TypeVar("T")


@dataclass
class Context:
    """What pyfuse3's RequestContext tells a handler about the caller."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


@dataclass
class Fields:
    """pyfuse3.SetattrFields (its attributes are read-only there)."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


class _Listing:
    """The READDIR reply buffer: pyfuse3.readdir_reply appends here (see ``Driver.listdir``)."""

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, int]] = []
        self.next_id = 0


def _reply(token: _Listing, name: bytes, attributes: pyfuse3.EntryAttributes, next_id: int) -> bool:
    token.entries.append((name, attributes.st_ino))
    token.next_id = next_id
    return True


class Driver:
    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.union: Union = open_union(config)
        self.ops = Operations(self.union, config)
        self.ctx = cast(pyfuse3.RequestContext, Context(uid=os.geteuid(), gid=os.getegid()))
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ops.handles.close_all()
            self.union.close()

    # -- plumbing

    async def answer(self, result: T | Coroutine[Any, Any, T]) -> T:
        """A handler's answer: its value, or what its coroutine returns (slow path)."""
        try:
            if isinstance(result, Coroutine):
                return cast(T, await result)
            return result
        except pyfuse3.FUSEError as error:
            raise OSError(error.errno, os.strerror(error.errno)) from None

    async def call(self, handler: str, *args: object) -> Any:
        """``Operations.<handler>(*args)``: errors come back as ``OSError``."""
        try:
            result = getattr(self.ops, handler)(*args)
        except pyfuse3.FUSEError as error:
            raise OSError(error.errno, os.strerror(error.errno)) from None
        return await self.answer(result)

    @staticmethod
    def split(path: str) -> tuple[str, bytes]:
        parent, _, name = path.strip("/").rpartition("/")
        return parent, os.fsencode(name)

    async def inode(self, path: str) -> int:
        """Walk ``path`` one LOOKUP at a time; ENOENT where the kernel would get a negative
        entry."""
        inode = pyfuse3.ROOT_INODE
        for part in (p for p in path.strip("/").split("/") if p):
            entry = await self.call("lookup", inode, os.fsencode(part), self.ctx)
            if entry.st_ino == 0:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            inode = entry.st_ino
        return inode

    async def stat(self, path: str) -> pyfuse3.EntryAttributes:
        attributes = await self.call("getattr", await self.inode(path), self.ctx)
        return cast(pyfuse3.EntryAttributes, attributes)

    async def exists(self, path: str) -> bool:
        try:
            await self.inode(path)
        except FileNotFoundError:
            return False
        return True

    # -- namespace

    async def listdir(self, path: str = "") -> list[str]:
        """OPENDIR + READDIR until an empty answer + RELEASEDIR, as the kernel lists; without
        OPENDIR (patched pyfuse3: ENOSYS) the kernel names the directory by inode instead."""
        inode = await self.inode(path)
        try:
            opened = await self.call("opendir", inode, self.ctx)
        except OSError as error:
            if error.errno != errno.ENOSYS:
                raise
            fh = 0
        else:
            fh = opened if isinstance(opened, int) else opened.fh
        listing = _Listing()
        # READDIR answers through pyfuse3.readdir_reply into the kernel's buffer: collect here.
        real_reply = pyfuse3.readdir_reply
        setattr(pyfuse3, "readdir_reply", _reply)  # noqa: B010
        try:
            start = 0
            while True:
                before = len(listing.entries)
                if self.ops.dir_inode_arguments:
                    await self.call("readdir", inode, fh, start, listing)
                else:  # stock pyfuse3: READDIR names the handle only
                    await self.call("readdir", fh, start, listing)
                if len(listing.entries) == before:
                    break
                start = listing.next_id
        finally:
            setattr(pyfuse3, "readdir_reply", real_reply)  # noqa: B010
            if fh:
                await self.call("releasedir", fh)
        return sorted(os.fsdecode(name) for name, _ in listing.entries if name not in (b".", b".."))

    async def mkdir(self, path: str, mode: int = 0o755) -> int:
        parent, name = self.split(path)
        entry = await self.call("mkdir", await self.inode(parent), name, mode, self.ctx)
        return cast(int, entry.st_ino)

    async def mknod(self, path: str, mode: int, rdev: int = 0) -> int:
        parent, name = self.split(path)
        entry = await self.call("mknod", await self.inode(parent), name, mode, rdev, self.ctx)
        return cast(int, entry.st_ino)

    async def symlink(self, target: str, path: str) -> int:
        parent, name = self.split(path)
        entry = await self.call(
            "symlink", await self.inode(parent), name, os.fsencode(target), self.ctx
        )
        return cast(int, entry.st_ino)

    async def readlink(self, path: str) -> str:
        return os.fsdecode(await self.call("readlink", await self.inode(path), self.ctx))

    async def link(self, existing: str, path: str) -> int:
        parent, name = self.split(path)
        entry = await self.call(
            "link", await self.inode(existing), await self.inode(parent), name, self.ctx
        )
        return cast(int, entry.st_ino)

    async def unlink(self, path: str) -> None:
        parent, name = self.split(path)
        await self.call("unlink", await self.inode(parent), name, self.ctx)

    async def rmdir(self, path: str) -> None:
        parent, name = self.split(path)
        await self.call("rmdir", await self.inode(parent), name, self.ctx)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        old_parent, old_name = self.split(old)
        new_parent, new_name = self.split(new)
        await self.call(
            "rename",
            await self.inode(old_parent),
            old_name,
            await self.inode(new_parent),
            new_name,
            flags,
            self.ctx,
        )

    # -- data

    async def open(self, path: str, flags: int) -> int:
        info = await self.call("open", await self.inode(path), flags, self.ctx)
        return cast(int, info.fh)

    async def release(self, fh: int) -> None:
        await self.call("release", fh)

    async def create(self, path: str, data: bytes = b"", mode: int = 0o644) -> int:
        """A new file with ``data`` (create, write, release); its inode."""
        parent, name = self.split(path)
        info, entry = await self.call(
            "create", await self.inode(parent), name, stat.S_IFREG | mode, os.O_WRONLY, self.ctx
        )
        try:
            if data:
                await self.call("write", info.fh, 0, data)
        finally:
            await self.release(info.fh)
        return cast(int, entry.st_ino)

    async def read(self, path: str) -> bytes:
        fh = await self.open(path, os.O_RDONLY)
        try:
            chunks = []
            offset = 0
            while chunk := await self.call("read", fh, offset, 1 << 16):
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        finally:
            await self.release(fh)

    async def write(self, path: str, data: bytes, offset: int = 0, *, trunc: bool = False) -> None:
        # As the kernel sends it: O_TRUNC becomes SETATTR(size=0) after the open.
        fh = await self.open(path, os.O_WRONLY)
        try:
            if trunc:
                await self.truncate(path, 0, fh=fh)
            await self.call("write", fh, offset, data)
        finally:
            await self.release(fh)

    # -- attributes

    async def setattr(
        self, path: str, fields: Fields, *, fh: int | None = None, **values: int
    ) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        for name, value in values.items():
            setattr(attributes, name, value)
        result = await self.call(
            "setattr", await self.inode(path), attributes, fields, fh, self.ctx
        )
        return cast(pyfuse3.EntryAttributes, result)

    async def chmod(self, path: str, mode: int) -> None:
        await self.setattr(path, Fields(update_mode=True), st_mode=mode)

    async def chown(self, path: str, uid: int, gid: int) -> None:
        await self.setattr(path, Fields(update_uid=True, update_gid=True), st_uid=uid, st_gid=gid)

    async def truncate(self, path: str, size: int, *, fh: int | None = None) -> None:
        await self.setattr(path, Fields(update_size=True), fh=fh, st_size=size)

    async def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        await self.setattr(
            path,
            Fields(update_atime=True, update_mtime=True),
            st_atime_ns=atime_ns,
            st_mtime_ns=mtime_ns,
        )

    async def setxattr(self, path: str, name: str, value: bytes) -> None:
        await self.call("setxattr", await self.inode(path), os.fsencode(name), value, self.ctx)

    async def getxattr(self, path: str, name: str) -> bytes:
        value = await self.call("getxattr", await self.inode(path), os.fsencode(name), self.ctx)
        return cast(bytes, value)

    async def listxattr(self, path: str) -> list[str]:
        names = await self.call("listxattr", await self.inode(path), self.ctx)
        return sorted(os.fsdecode(name) for name in names)

    async def removexattr(self, path: str, name: str) -> None:
        await self.call("removexattr", await self.inode(path), os.fsencode(name), self.ctx)

    # -- errors

    async def errno_of(self, pending: Coroutine[Any, Any, object]) -> int:
        """The errno ``pending`` fails with (AssertionError when it succeeds)."""
        try:
            await pending
        except OSError as error:
            assert error.errno is not None
            return error.errno
        raise AssertionError("expected an error, the operation succeeded")

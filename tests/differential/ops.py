"""An operation language for differential write tests, applied through a mountpoint.

An `Op` is a plain value (printable, hashable) naming a filesystem operation on paths relative to
the mount root. `apply(root_fd, op)` performs it and returns an `Outcome`: the errno (0 on success)
and, for reading operations, a value (content digest, listing, stat summary).

`Op.user` != 0 runs the operation in a forked child with that uid and gid (no supplementary
groups), so permission checks are compared too.

Safety: the layers contain symlinks with absolute and `../..` targets, so an operation must never
follow a symlink out of the mount. Parent directories are walked one component at a time with
`O_PATH|O_NOFOLLOW|O_DIRECTORY` from the mount root's fd (a symlink component gives `ENOTDIR`), and
the last component is used with the `*at` call and its no-follow flag (`O_NOFOLLOW`,
`AT_SYMLINK_NOFOLLOW`). Where Linux has no no-follow variant (chmod, truncate by path, xattrs), the
target is opened `O_PATH|O_NOFOLLOW` and, if it is a symlink, the operation answers `ELOOP`
without calling the filesystem. Both mounts run the same code, so those synthetic answers are
identical on both sides and the comparison stays exact.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import os
import pickle
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

RelPath = tuple[str, ...]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def renameat2(old_dir: int, old: str, new_dir: int, new: str, flags: int) -> None:
    if _renameat2 is None:  # pragma: no cover - glibc < 2.28
        raise OSError(errno.ENOSYS, "renameat2 not in libc")
    result = _renameat2(
        ctypes.c_int(old_dir),
        ctypes.c_char_p(os.fsencode(old)),
        ctypes.c_int(new_dir),
        ctypes.c_char_p(os.fsencode(new)),
        ctypes.c_uint(flags),
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True)
class Op:
    """One operation. Fields not used by a kind keep their defaults."""

    kind: str
    path: RelPath
    other: RelPath = ()  # rename/link destination
    data: bytes = b""
    offset: int = 0  # write offset; truncate size
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    flags: int = 0  # rename flags
    name: str = ""  # xattr name; symlink target
    times_ns: tuple[int, int] = (0, 0)
    user: int = 0  # uid (and gid) of the calling process; 0 = root

    def __str__(self) -> str:
        text = self._text()
        return f"as {self.user}: {text}" if self.user else text

    def _data(self) -> str:
        if len(self.data) <= 24:
            return repr(self.data)
        return f"{self.data[:8]!r}...({len(self.data)} bytes)"

    def _text(self) -> str:
        path = "/".join(self.path)
        other = "/".join(self.other)
        kind = self.kind
        if kind == "write":
            return f"write {path} @{self.offset} {self._data()}"
        if kind in ("append", "create"):
            extra = f" mode={self.mode:o}" if kind == "create" else ""
            return f"{kind} {path}{extra} {self._data()}"
        if kind in ("truncate", "truncate_path"):
            return f"{kind} {path} {self.offset}"
        if kind in ("mkdir", "mkfifo", "chmod"):
            return f"{kind} {path} {self.mode:o}"
        if kind == "rename":
            flag = {0: "", RENAME_NOREPLACE: " NOREPLACE", RENAME_EXCHANGE: " EXCHANGE"}
            return f"rename{flag.get(self.flags, f' flags={self.flags}')} {path} -> {other}"
        if kind == "link":
            return f"link {path} -> new name {other}"
        if kind == "symlink":
            return f"symlink {path} (target {self.name!r})"
        if kind == "chown":
            return f"chown {path} {self.uid}:{self.gid}"
        if kind == "utime":
            return f"utime {path} atime={self.times_ns[0]} mtime={self.times_ns[1]}"
        if kind == "setxattr":
            return f"setxattr {path} {self.name}={self._data()}"
        if kind == "removexattr":
            return f"removexattr {path} {self.name}"
        return f"{kind} {path}"


@dataclass(frozen=True)
class Outcome:
    errno: int
    value: object = None

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno, str(self.errno)) if self.errno else "ok"
        return name if self.value is None else f"{name} {self.value!r}"


@contextmanager
def _parent(root_fd: int, path: RelPath) -> Iterator[int]:
    """An O_PATH fd of the parent directory of `path`, walked without following any symlink."""
    fds = []
    current = root_fd
    try:
        for component in path[:-1]:
            current = os.open(
                component,
                os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                dir_fd=current,
            )
            fds.append(current)
        yield current
    finally:
        for fd in fds:
            os.close(fd)


def _open_target_path(parent: int, name: str) -> int:
    """O_PATH fd of the last component itself (a symlink stays a symlink)."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _digest(fd: int) -> str:
    digest = hashlib.sha256()
    while chunk := os.read(fd, 1 << 16):
        digest.update(chunk)
    return digest.hexdigest()[:16]


_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _perform(root_fd: int, op: Op) -> object:
    kind = op.kind
    with _parent(root_fd, op.path) as parent:
        name = op.path[-1]
        if kind == "write":
            fd = os.open(name, _WRITE_FLAGS, dir_fd=parent)
            try:
                os.pwrite(fd, op.data, op.offset)
            finally:
                os.close(fd)
            return None
        if kind == "append":
            fd = os.open(name, _WRITE_FLAGS | os.O_APPEND, dir_fd=parent)
            try:
                os.write(fd, op.data)
            finally:
                os.close(fd)
            return None
        if kind == "truncate":  # ftruncate on an fd opened for writing
            fd = os.open(name, _WRITE_FLAGS, dir_fd=parent)
            try:
                os.ftruncate(fd, op.offset)
            finally:
                os.close(fd)
            return None
        if kind == "open_trunc":  # O_TRUNC on open
            os.close(os.open(name, _WRITE_FLAGS | os.O_TRUNC, dir_fd=parent))
            return None
        if kind == "create":
            fd = os.open(name, _WRITE_FLAGS | os.O_CREAT | os.O_EXCL, op.mode, dir_fd=parent)
            try:
                if op.data:
                    os.write(fd, op.data)
            finally:
                os.close(fd)
            return None
        if kind == "read":
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent)
            try:
                return _digest(fd)
            finally:
                os.close(fd)
        if kind == "listdir":
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=parent)
            try:
                return tuple(sorted(os.listdir(fd)))
            finally:
                os.close(fd)
        if kind == "stat":
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            nlink = st.st_nlink if not stat.S_ISDIR(st.st_mode) else None
            return (f"{st.st_mode:o}", st.st_uid, st.st_gid, size, nlink)
        if kind == "mkdir":
            os.mkdir(name, op.mode, dir_fd=parent)
            return None
        if kind == "rmdir":
            os.rmdir(name, dir_fd=parent)
            return None
        if kind == "unlink":
            os.unlink(name, dir_fd=parent)
            return None
        if kind == "mkfifo":
            os.mkfifo(name, op.mode, dir_fd=parent)
            return None
        if kind == "symlink":
            os.symlink(op.name, name, dir_fd=parent)
            return None
        if kind == "chown":
            os.chown(name, op.uid, op.gid, dir_fd=parent, follow_symlinks=False)
            return None
        if kind == "utime":
            os.utime(name, ns=op.times_ns, dir_fd=parent, follow_symlinks=False)
            return None
        if kind in ("rename", "link"):
            with _parent(root_fd, op.other) as other_parent:
                other = op.other[-1]
                if kind == "link":
                    os.link(
                        name, other, src_dir_fd=parent, dst_dir_fd=other_parent,
                        follow_symlinks=False,
                    )  # fmt: skip
                elif op.flags == 0:
                    os.rename(name, other, src_dir_fd=parent, dst_dir_fd=other_parent)
                else:
                    renameat2(parent, name, other_parent, other, op.flags)
            return None
        if kind in ("chmod", "truncate_path", "setxattr", "removexattr"):
            fd = _open_target_path(parent, name)
            try:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise OSError(errno.ELOOP, "harness: not applied to a symlink")
                if kind == "chmod":
                    os.chmod(_proc(fd), op.mode)
                elif kind == "truncate_path":  # truncate(2): setattr without an open file
                    os.truncate(_proc(fd), op.offset)
                elif kind == "setxattr":
                    os.setxattr(_proc(fd), op.name, op.data)
                else:
                    os.removexattr(_proc(fd), op.name)
            finally:
                os.close(fd)
            return None
    raise ValueError(f"unknown op kind {kind!r}")


def _apply_here(root_fd: int, op: Op) -> Outcome:
    try:
        return Outcome(0, _perform(root_fd, op))
    except OSError as error:
        return Outcome(error.errno or -1)


def _apply_as(root_fd: int, op: Op) -> Outcome:
    """Run the operation in a forked child with uid = gid = op.user and no supplementary groups."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(op.user, op.user, op.user)
            os.setresuid(op.user, op.user, op.user)
            os.write(write_end, pickle.dumps(_apply_here(root_fd, op)))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError(f"harness: child running {op} as {op.user} failed (status {status})")
    outcome = pickle.loads(data)
    assert isinstance(outcome, Outcome)
    return outcome


def apply(root_fd: int, op: Op) -> Outcome:
    """Perform `op` below the directory `root_fd`; the errno instead of an exception."""
    if not op.path or (op.kind in ("rename", "link") and not op.other):
        raise ValueError(f"op needs a non-empty path: {op}")
    if op.user:
        return _apply_as(root_fd, op)
    return _apply_here(root_fd, op)


@contextmanager
def root_fd_of(mountpoint: os.PathLike[str] | str) -> Iterator[int]:
    fd = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def parse_path(text: str) -> RelPath:
    return tuple(text.split("/"))


def as_user(uid: int, op: Op) -> Op:
    """The same operation, run by uid (and gid) `uid` instead of root."""
    return dataclasses.replace(op, user=uid)


# Small constructors so scenario tables read like shell scripts.
def write(path: str, data: bytes, offset: int = 0) -> Op:
    return Op("write", parse_path(path), data=data, offset=offset)


def append(path: str, data: bytes) -> Op:
    return Op("append", parse_path(path), data=data)


def truncate(path: str, size: int) -> Op:
    return Op("truncate", parse_path(path), offset=size)


def truncate_path(path: str, size: int) -> Op:
    return Op("truncate_path", parse_path(path), offset=size)


def open_trunc(path: str) -> Op:
    return Op("open_trunc", parse_path(path))


def create(path: str, data: bytes = b"", mode: int = 0o644) -> Op:
    return Op("create", parse_path(path), data=data, mode=mode)


def read(path: str) -> Op:
    return Op("read", parse_path(path))


def listdir(path: str) -> Op:
    return Op("listdir", parse_path(path))


def lstat(path: str) -> Op:
    return Op("stat", parse_path(path))


def mkdir(path: str, mode: int = 0o755) -> Op:
    return Op("mkdir", parse_path(path), mode=mode)


def rmdir(path: str) -> Op:
    return Op("rmdir", parse_path(path))


def unlink(path: str) -> Op:
    return Op("unlink", parse_path(path))


def rename(source: str, destination: str, flags: int = 0) -> Op:
    return Op("rename", parse_path(source), other=parse_path(destination), flags=flags)


def link(existing: str, new: str) -> Op:
    return Op("link", parse_path(existing), other=parse_path(new))


def symlink(path: str, target: str) -> Op:
    return Op("symlink", parse_path(path), name=target)


def chmod(path: str, mode: int) -> Op:
    return Op("chmod", parse_path(path), mode=mode)


def chown(path: str, uid: int, gid: int) -> Op:
    return Op("chown", parse_path(path), uid=uid, gid=gid)


def utime(path: str, atime_ns: int, mtime_ns: int) -> Op:
    return Op("utime", parse_path(path), times_ns=(atime_ns, mtime_ns))


def setxattr(path: str, name: str, value: bytes) -> Op:
    return Op("setxattr", parse_path(path), name=name, data=value)


def removexattr(path: str, name: str) -> Op:
    return Op("removexattr", parse_path(path), name=name)


def mkfifo(path: str, mode: int = 0o644) -> Op:
    return Op("mkfifo", parse_path(path), mode=mode)

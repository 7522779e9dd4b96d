"""Raw syscalls on layer contents, always relative to a directory fd.

This is the only module that touches files inside layers. Invariants:
- a name handed to these functions is a single path component (no ``/``, never ``.``/``..``);
- nothing here follows a symlink found inside a layer: directories are opened with
  ``O_NOFOLLOW | O_DIRECTORY``, stats are ``lstat``-like, xattrs are read with
  ``follow_symlinks=False`` through ``/proc/self/fd/DIRFD/NAME`` (the magic link is our own
  directory fd, and the last component is not followed);
- lower layers are opened ``O_RDONLY`` (plus ``O_NOATIME`` where the kernel allows it).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Callable

RelPath = tuple[bytes, ...]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

# The symbols the interpreter already has (libc's among them): ctypes.util.find_library("c")
# would import subprocess and tempfile and run ldconfig -p at every start.
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_name_to_handle_at.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MAX_HANDLE_SZ = 128
FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})


def check_name(name: bytes) -> bytes:
    """Reject anything that is not one plain path component."""
    if not name or b"/" in name or name in (b".", b"..") or b"\0" in name:
        raise OSError(errno.EINVAL, f"invalid name {name!r}")
    return name


def open_dir(dir_fd: int, name: bytes) -> int:
    """Open the subdirectory ``name`` of ``dir_fd`` without following a symlink."""
    return os.open(check_name(name), DIR_FLAGS, dir_fd=dir_fd)


def open_root(path: str) -> int:
    """Open a layer's root directory (the path comes from the user, not from a layer)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_lower_root(path: str) -> int:
    """Open a lower layer's root directory with ``O_NOATIME`` where permitted (listing it
    then leaves its atime alone, as every lower directory opened by ``open_lower_dir``)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        return open_root(path)


def open_lower_dir(dir_fd: int, name: bytes) -> int:
    """``open_dir`` for a lower layer: ``O_NOATIME`` where permitted."""
    try:
        return os.open(check_name(name), DIR_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return open_dir(dir_fd, name)


def open_file(dir_fd: int, name: bytes, flags: int, mode: int = 0o600) -> int:
    """Open ``name`` in ``dir_fd``; a symlink at ``name`` gives ``ELOOP``."""
    return os.open(check_name(name), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def open_lower_file(dir_fd: int, name: bytes) -> int:
    """Open a lower-layer file read-only without touching its atime where permitted."""
    try:
        return open_file(dir_fd, name, os.O_RDONLY | os.O_NOATIME)
    except PermissionError:
        # O_NOATIME needs ownership or CAP_FOWNER; without it the open may still work.
        return open_file(dir_fd, name, os.O_RDONLY)


def lstat(dir_fd: int, name: bytes) -> os.stat_result:
    return os.stat(check_name(name), dir_fd=dir_fd, follow_symlinks=False)


def try_lstat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return lstat(dir_fd, name)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def readlink(dir_fd: int, name: bytes) -> bytes:
    return os.readlink(check_name(name), dir_fd=dir_fd)


def proc_path(dir_fd: int, name: bytes | None = None) -> bytes:
    """``/proc/self/fd/N[/NAME]``: a path to reach an entry without re-walking the layer."""
    base = b"/proc/self/fd/%d" % dir_fd
    return base if name is None else base + b"/" + check_name(name)


def list_xattrs(dir_fd: int, name: bytes | None) -> list[str]:
    try:
        if name is None:
            return os.listxattr(dir_fd)
        return os.listxattr(proc_path(dir_fd, name), follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def get_xattr(dir_fd: int, name: bytes | None, attribute: str) -> bytes | None:
    """One xattr's value, or None when it is absent or unsupported."""
    try:
        if name is None:
            return os.getxattr(dir_fd, attribute)
        return os.getxattr(proc_path(dir_fd, name), attribute, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def fd_get_xattr(fd: int, attribute: str) -> bytes | None:
    try:
        return os.getxattr(fd, attribute)
    except OSError as error:
        if error.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def set_xattr(
    dir_fd: int, name: bytes | None, attribute: str, value: bytes, flags: int = 0
) -> None:
    if name is None:
        os.setxattr(dir_fd, attribute, value, flags)
    else:
        os.setxattr(proc_path(dir_fd, name), attribute, value, flags, follow_symlinks=False)


def remove_xattr(dir_fd: int, name: bytes | None, attribute: str) -> None:
    if name is None:
        os.removexattr(dir_fd, attribute)
    else:
        os.removexattr(proc_path(dir_fd, name), attribute, follow_symlinks=False)


def list_dir(dir_fd: int) -> list[tuple[bytes, int]]:
    """Names in a directory with their file type (``stat.S_IFMT`` bits, 0 when unknown).

    Uses the fd's own listing (``scandir`` on a dup so the caller's offset is untouched).
    Char devices are reported with type ``S_IFCHR`` so callers can check for whiteouts.
    """
    entries: list[tuple[bytes, int]] = []
    dup = os.dup(dir_fd)
    try:
        with os.scandir(dup) as iterator:
            for entry in iterator:
                name = os.fsencode(entry.name)
                if entry.is_dir(follow_symlinks=False):
                    kind = stat.S_IFDIR
                elif entry.is_file(follow_symlinks=False):
                    kind = stat.S_IFREG
                elif entry.is_symlink():
                    kind = stat.S_IFLNK
                else:
                    try:
                        kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                    except FileNotFoundError:
                        continue
                entries.append((name, kind))
    finally:
        # scandir(fd) closes nothing itself in CPython < 3.13? It does not close the fd; do it.
        try:
            os.close(dup)
        except OSError:
            pass
    return entries


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int = 0) -> None:
    if flags == 0:
        os.rename(check_name(old), check_name(new), src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)
        return
    result = _renameat2(old_dir_fd, check_name(old), new_dir_fd, check_name(new), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def file_handle(dir_fd: int, name: bytes) -> tuple[int, bytes]:
    """(handle type, handle bytes) of ``name`` (not followed if a symlink), as
    ``name_to_handle_at(2)`` gives them: the identity kernel overlayfs records as an origin."""
    buffer = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    ctypes.c_uint.from_buffer(buffer, 0).value = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    if _name_to_handle_at(dir_fd, check_name(name), buffer, ctypes.byref(mount_id), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    size = ctypes.c_uint.from_buffer(buffer, 0).value
    handle_type = ctypes.c_int.from_buffer(buffer, 4).value
    return handle_type, buffer.raw[8 : 8 + size]


def filesystem_uuid(fd: int) -> bytes:
    """The 16-byte UUID of the filesystem of ``fd`` (``FS_IOC_GETFSUUID``); zeros when the
    filesystem has none or the kernel cannot tell (what the kernel itself then records)."""
    answer = bytearray(17)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, answer)
    except OSError:
        return bytes(16)
    return bytes(answer[1 : 1 + min(answer[0], 16)]).ljust(16, b"\0")


def link_tmpfile(fd: int, dir_fd: int, name: bytes) -> None:
    """Give an ``O_TMPFILE`` file a name (``linkat`` through ``/proc/self/fd``)."""
    os.link(b"/proc/self/fd/%d" % fd, check_name(name), dst_dir_fd=dir_fd, follow_symlinks=True)


def copy_data(source_fd: int, target_fd: int, size: int) -> int:
    """Copy the data extents of ``source_fd`` into ``target_fd``; holes stay holes.

    Returns the number of bytes copied. The target gets the full size even when the file
    ends in a hole.
    """
    copied = 0
    offset = 0
    pair = (os.fstat(source_fd).st_dev, os.fstat(target_fd).st_dev)
    while offset < size:
        try:
            data_start = os.lseek(source_fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole is left
                break
            if error.errno == errno.EINVAL:  # no SEEK_DATA support: one extent
                data_start = offset
            else:
                raise
        try:
            data_end = os.lseek(source_fd, data_start, os.SEEK_HOLE)
        except OSError:
            data_end = size
        data_end = min(data_end, size)
        position = data_start
        while position < data_end:
            count = _copy_range(source_fd, target_fd, position, data_end - position, pair)
            if count == 0:
                break
            position += count
            copied += count
        offset = max(data_end, position)
    os.ftruncate(target_fd, size)
    return copied


# (source st_dev, target st_dev) pairs where copy_file_range is refused (e.g. EXDEV between
# different filesystem types): those copies go through sendfile, others keep copy_file_range.
_no_copy_file_range: set[tuple[int, int]] = set()


def _copy_range(
    source_fd: int, target_fd: int, offset: int, count: int, pair: tuple[int, int]
) -> int:
    """Copy up to ``count`` bytes at ``offset`` inside the kernel when it can; ``pair`` is
    the (source, target) st_dev, to remember where copy_file_range is refused."""
    chunk = min(count, 1 << 30)
    if pair not in _no_copy_file_range:
        try:
            return os.copy_file_range(source_fd, target_fd, chunk, offset, offset)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _no_copy_file_range.add(pair)
    try:
        os.lseek(target_fd, offset, os.SEEK_SET)
        return os.sendfile(target_fd, source_fd, offset, chunk)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(source_fd, min(chunk, 1 << 20), offset)
    if not data:
        return 0
    return os.pwrite(target_fd, data, offset)


def is_whiteout_device(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def remove_tree(dir_fd: int, name: bytes, *, make_writable: bool = False) -> None:
    """Remove ``name`` (a file or a whole directory tree) below ``dir_fd``, never following
    symlinks: each level is opened ``O_NOFOLLOW`` relative to its parent. ``make_writable``:
    directories are made writable first (an unpacked image's 0555 directories)."""
    st = try_lstat(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(check_name(name), dir_fd=dir_fd)
        return
    child_fd = open_dir(dir_fd, name)
    try:
        if make_writable:
            os.fchmod(child_fd, 0o700)
        for child, _kind in list_dir(child_fd):
            remove_tree(child_fd, child, make_writable=make_writable)
    finally:
        os.close(child_fd)
    os.rmdir(check_name(name), dir_fd=dir_fd)


def copy_xattrs(
    source_dir_fd: int,
    source_name: bytes | None,
    target_dir_fd: int,
    target_name: bytes | None,
    *,
    keep: Callable[[str], bool],
) -> None:
    """Copy every xattr ``keep`` accepts; unsupported ones are silently left out (an
    unprivileged copy cannot write trusted.* for example)."""
    for attribute in list_xattrs(source_dir_fd, source_name):
        if not keep(attribute):
            continue
        value = get_xattr(source_dir_fd, source_name, attribute)
        if value is None:
            continue
        try:
            set_xattr(target_dir_fd, target_name, attribute, value)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES, errno.EINVAL):
                raise


def add_oci_opaque_marker(dir_fd: int, name: bytes, marker: bytes) -> None:
    """Create the empty file ``marker`` (``.wh..wh..opq``) inside directory ``name``."""
    child_fd = open_dir(dir_fd, name)
    try:
        os.close(open_file(child_fd, marker, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.close(child_fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on an open (upper) file."""
    if _fallocate(fd, mode, offset, length) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


# Making and changing objects: a ``name`` is one component below ``dir_fd``; ``None`` means
# ``dir_fd`` itself (an open object). Nothing follows a symlink.


def mkdir(dir_fd: int, name: bytes, mode: int) -> None:
    os.mkdir(check_name(name), mode, dir_fd=dir_fd)


def mknod(dir_fd: int, name: bytes, mode: int, device: int = 0) -> None:
    os.mknod(check_name(name), mode, device, dir_fd=dir_fd)


def symlink(target: bytes, dir_fd: int, name: bytes) -> None:
    os.symlink(target, check_name(name), dir_fd=dir_fd)


def link(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes) -> None:
    os.link(
        check_name(old),
        check_name(new),
        src_dir_fd=old_dir_fd,
        dst_dir_fd=new_dir_fd,
        follow_symlinks=False,
    )


def unlink(dir_fd: int, name: bytes) -> None:
    os.unlink(check_name(name), dir_fd=dir_fd)


def rmdir(dir_fd: int, name: bytes) -> None:
    os.rmdir(check_name(name), dir_fd=dir_fd)


def open_tmpfile(dir_fd: int, flags: int, mode: int = 0o600) -> int:
    """An unnamed file in directory ``dir_fd`` (``O_TMPFILE``; link it with link_tmpfile)."""
    return os.open(b".", os.O_TMPFILE | flags, mode, dir_fd=dir_fd)


def chown(dir_fd: int, name: bytes | None, uid: int, gid: int) -> None:
    if name is None:
        os.chown(dir_fd, uid, gid)
    else:
        os.chown(check_name(name), uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def chmod(dir_fd: int, name: bytes | None, mode: int) -> None:
    if name is None:
        os.chmod(dir_fd, mode)
    else:
        os.chmod(check_name(name), mode, dir_fd=dir_fd, follow_symlinks=False)


def set_times(dir_fd: int, name: bytes | None, ns: tuple[int, int]) -> None:
    """atime and mtime in nanoseconds."""
    if name is None:
        os.utime(dir_fd, ns=ns)
    else:
        os.utime(check_name(name), ns=ns, dir_fd=dir_fd, follow_symlinks=False)


def open_dir_path(path: str | os.PathLike[str]) -> int:
    """Open a directory named by a path from the user (an image, a destination), the last
    component not followed if it is a symlink."""
    return os.open(path, DIR_FLAGS)


def open_below(dir_fd: int, parts: RelPath) -> int:
    """Open the directory ``parts`` below ``dir_fd`` one component at a time, never
    following a symlink; the caller closes the fd (a new one even for no ``parts``)."""
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            child = open_dir(fd, part)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd

"""The work directory: a private scratch area on the upper layer's filesystem.

Copy-ups and replacements are built here under temporary names and then renamed into the
upper layer, so no one can ever see a half-made object. Its subdirectory ``work`` is the
one kernel overlayfs uses for the same purpose (and empties at mount), so the two stay
compatible. Leftovers from a crash are removed when a mount starts. Its subdirectory
``index`` holds the hard-link index (see ``index``), also where the kernel keeps it.

A ``volatile`` mount (no syncs) marks the upper as possibly incomplete where kernel overlayfs
does, ``WORK/incompat/volatile/dirty``: a mount that finds ``WORK/incompat/volatile`` is
refused (``volatile_marker``), by the kernel too. Unlike the kernel, unionfs removes the mark
after a clean unmount, once ``syncfs`` of the upper's filesystem has succeeded. The ``dirty``
file names the daemon that wrote it (``process_token``: boot id, pid, start time): a daemon
removes only its own mark, and a mount that finds the mark of a daemon still running (one that
is finishing after its unmount, say) waits for it to exit before deciding.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os

from unionfs import safeio, whiteout

WORK_NAME = b"work"
INDEX_NAME = b"index"
TEMP_PREFIX = b"#unionfs."
INCOMPAT_NAME = b"incompat"
VOLATILE_NAME = b"volatile"
DIRTY_NAME = b"dirty"


def volatile_marker(workdir: str) -> str | None:
    """The path of the volatile mark a mount of this workdir must not ignore, if present."""
    path = os.path.join(workdir, "work", "incompat", "volatile")
    return path if os.path.lexists(path) else None


def process_token(pid: int | None = None) -> str:
    """``BOOT_ID PID STARTTIME`` naming one process for as long as the machine runs ("" when
    the process is gone)."""
    pid = os.getpid() if pid is None else pid
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            boot_id = boot.read().strip()
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
            fields = stat_file.read().rpartition(")")[2].split()
    except OSError:
        return ""
    if not fields or fields[0] == "Z":
        return ""
    return f"{boot_id} {pid} {fields[19]}"


def volatile_owner(mark: str) -> tuple[int, str] | None:
    """The running daemon that wrote the volatile mark ``mark`` (pid, its mountpoint), if any."""
    try:
        with open(os.path.join(mark, "dirty"), encoding="utf-8", errors="replace") as dirty:
            token, _, mountpoint = dirty.read().partition("\n")
    except OSError:
        return None
    fields = token.split()
    if len(fields) != 3 or not fields[1].isdigit():
        return None  # the kernel's mark (empty), or not ours
    pid = int(fields[1])
    return (pid, mountpoint.strip()) if process_token(pid) == token.strip() else None


class WorkDir:
    def __init__(self, path: str, upper_device: int, *, userxattr: bool = False) -> None:
        self.path = path
        self.userxattr = userxattr
        base_fd = safeio.open_root(path)
        try:
            if os.fstat(base_fd).st_dev != upper_device:
                raise OSError(errno.EXDEV, "workdir must be on the same filesystem as the upper")
            try:
                safeio.mkdir(base_fd, WORK_NAME, 0o700)
            except FileExistsError:
                pass
            self.fd = safeio.open_dir(base_fd, WORK_NAME)
            self.index_fd = self._open_index(base_fd)
        finally:
            os.close(base_fd)
        self._counter = itertools.count()
        self.clean()
        self.xattr_prefix = self._probe_xattr_prefix()

    @staticmethod
    def _open_index(base_fd: int) -> int | None:
        """The index directory (made if missing); None when it cannot be used."""
        with contextlib.suppress(FileExistsError):
            safeio.mkdir(base_fd, INDEX_NAME, 0o700)
        try:
            return safeio.open_dir(base_fd, INDEX_NAME)
        except OSError:
            return None

    def _probe_xattr_prefix(self) -> str:
        """``trusted.overlay.`` where the kernel lets us write trusted xattrs, else
        ``user.overlay.`` (kernel overlayfs's ``userxattr`` form). Root inside a user namespace
        has euid 0 but no trusted xattrs, so this is tried, not derived from the uid.
        ``-o userxattr`` asks for ``user.overlay.`` everywhere, as kernel overlayfs's does."""
        if self.userxattr:
            return whiteout.USER_PREFIX
        probe = whiteout.TRUSTED_PREFIX + "unionfs-probe"
        try:
            safeio.set_xattr(self.fd, None, probe, b"1")
        except OSError:
            return whiteout.USER_PREFIX
        with contextlib.suppress(OSError):
            safeio.remove_xattr(self.fd, None, probe)
        return whiteout.TRUSTED_PREFIX

    def temp_name(self) -> bytes:
        return b"%s%d.%d" % (TEMP_PREFIX, os.getpid(), next(self._counter))

    def clean(self) -> int:
        """Remove everything left in the work area (orphans of an interrupted operation)."""
        removed = 0
        for name, _kind in safeio.list_dir(self.fd):
            safeio.remove_tree(self.fd, name)
            removed += 1
        return removed

    def mark_volatile(self, mountpoint: str) -> None:
        """Leave the kernel's mark of a volatile mount: WORK/incompat/volatile/dirty (naming
        this daemon and its mountpoint)."""
        parent = self.fd
        opened: list[int] = []
        try:
            for name in (INCOMPAT_NAME, VOLATILE_NAME):
                with contextlib.suppress(FileExistsError):
                    safeio.mkdir(parent, name, 0o700)
                parent = safeio.open_dir(parent, name)
                opened.append(parent)
            fd = safeio.open_file(parent, DIRTY_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, f"{process_token()}\n{mountpoint}\n".encode())
            finally:
                os.close(fd)
            for fd in (*reversed(opened), self.fd):
                os.fsync(fd)  # the mark must be on disk before anything it warns about
        finally:
            for fd in opened:
                os.close(fd)

    def clear_volatile(self) -> bool:
        """After a clean unmount of a volatile mount: remove the mark (the caller has synced),
        unless another mount has made it since. True when it was ours and is gone."""
        try:
            incompat = safeio.open_dir(self.fd, INCOMPAT_NAME)
        except FileNotFoundError:
            return False
        try:
            volatile = safeio.open_dir(incompat, VOLATILE_NAME)
            try:
                fd = safeio.open_file(volatile, DIRTY_NAME, os.O_RDONLY)
                try:
                    token = os.read(fd, 8192).decode("utf-8", "replace").partition("\n")[0]
                finally:
                    os.close(fd)
            finally:
                os.close(volatile)
        except FileNotFoundError:
            return False
        finally:
            os.close(incompat)
        if token != process_token():
            return False
        safeio.remove_tree(self.fd, INCOMPAT_NAME)
        os.fsync(self.fd)
        return True

    def close(self) -> None:
        os.close(self.fd)
        if self.index_fd is not None:
            os.close(self.index_fd)

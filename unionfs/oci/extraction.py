"""Unpacking one layer tar stream into a directory, safely: every path component is opened
relative to its parent fd with ``O_NOFOLLOW``; OCI whiteouts become overlay whiteouts."""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Callable, Iterator

from unionfs import safeio
from unionfs.oci.common import (
    COPY_CHUNK,
    MEMBER_ERRNOS,
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    ImageError,
    SkipMember,
    is_image_private_xattr,
    split_member_name,
)


def can_mknod_whiteout(dir_fd: int) -> bool:
    """Whether a 0/0 char device can be created here (root, or unprivileged since Linux 5.8)."""
    name = b".unionfs-probe-%d" % os.getpid()
    try:
        safeio.mknod(dir_fd, name, stat.S_IFCHR | 0o600, 0)
    except OSError:
        return False
    safeio.unlink(dir_fd, name)
    return True


def remove_entry(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` whatever it is (a directory recursively, never following)."""
    safeio.remove_tree(dir_fd, os.fsencode(name), make_writable=True)


class LayerWriter:
    """Unpack one layer tar stream into the directory ``root_fd`` refers to, safely."""

    def __init__(
        self, root_fd: int, *, label: str, mknod_ok: bool, warn: Callable[[str], None]
    ) -> None:
        self.root_fd = root_fd
        self.label = label
        self.is_root = os.geteuid() == 0
        self.mknod_ok = mknod_ok
        self.warn = warn
        # In a user namespace euid 0 may not write trusted.* xattrs: fall back to user.*.
        self.opaque_xattrs = (
            ("trusted.overlay.opaque", "user.overlay.opaque")
            if self.is_root
            else ("user.overlay.opaque",)
        )
        self.chown_failures = 0
        self.directories: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
        self.extracted: set[tuple[str, ...]] = set()  # non-directories written by this layer
        self.members = 0
        self.skipped = 0
        self.xattr_failures: dict[str, int] = {}

    # -- walking

    def _open_parent(self, parts: tuple[str, ...], *, create: bool) -> int:
        """Open the directory holding ``parts[-1]``, component by component, never following."""
        fd = os.dup(self.root_fd)
        try:
            for part in parts[:-1]:
                try:
                    new = safeio.open_dir(fd, os.fsencode(part))
                except FileNotFoundError:
                    if not create:
                        raise
                    safeio.mkdir(fd, os.fsencode(part), 0o755)
                    new = safeio.open_dir(fd, os.fsencode(part))
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise SkipMember(
                            f"parent {part!r} is a symlink or not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = new
            return fd
        except BaseException:
            os.close(fd)
            raise

    # -- members

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self.members += 1
        try:
            self._add(member, tar)
        except SkipMember as reason:
            self.skipped += 1
            self.warn(f"{self.label}: skipped {member.name!r}: {reason}")
        except OSError as error:
            if error.errno not in MEMBER_ERRNOS:
                raise ImageError(f"{self.label}: {member.name!r}: {error}") from None
            self.skipped += 1
            self.warn(f"{self.label}: skipped {member.name!r}: {error.strerror or error}")

    def _add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        parts = split_member_name(member.name)
        if not parts:  # the layer root itself ("./"): keep our own root's metadata
            return
        name = parts[-1]
        if name == OPAQUE_MARKER:
            self._opaque(parts)
            return
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, name[len(WHITEOUT_PREFIX) :])
            return
        if member.isdir():
            self._directory(parts, member)
            return
        if member.islnk():
            self._hardlink(parts, member)
            return
        if not (
            member.isreg() or member.issym() or member.ischr() or member.isblk() or member.isfifo()
        ):
            raise SkipMember(f"unsupported member type {member.type!r}")
        if (member.ischr() or member.isblk()) and not self._device_allowed(member):
            raise SkipMember("device node not permitted for an unprivileged user")
        parent = self._open_parent(parts, create=True)
        try:
            remove_entry(parent, name)
            if member.isreg():
                self._regular(parent, name, member, tar)
            else:
                if member.issym():
                    safeio.symlink(os.fsencode(member.linkname), parent, os.fsencode(name))
                elif member.isfifo():
                    safeio.mknod(parent, os.fsencode(name), stat.S_IFIFO | 0o600)
                else:
                    kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                    device = os.makedev(member.devmajor, member.devminor)
                    safeio.mknod(parent, os.fsencode(name), kind | 0o600, device)
                self._metadata_by_name(parent, name, member)
            self.extracted.add(parts)
        finally:
            os.close(parent)

    def _device_allowed(self, member: tarfile.TarInfo) -> bool:
        if member.ischr() and member.devmajor == 0 and member.devminor == 0:
            return self.mknod_ok  # an overlay-format whiteout: allowed unprivileged since 5.8
        return self.is_root

    def _regular(
        self, parent: int, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        fd = safeio.open_file(parent, os.fsencode(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            source = tar.extractfile(member)
            if source is not None:
                remaining = member.size
                while remaining > 0:
                    chunk = source.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        raise SkipMember("truncated member data")
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    remaining -= len(chunk)
            self._metadata_fd(fd, member, name)
        finally:
            os.close(fd)

    def _hardlink(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        try:
            target = split_member_name(member.linkname)
        except SkipMember as reason:
            raise SkipMember(f"hard link target {member.linkname!r}: {reason}") from None
        if not target or target not in self.extracted:
            raise SkipMember(f"hard link to {member.linkname!r}, not a member extracted before")
        if target == parts:
            return
        target_parent = self._open_parent(target, create=False)
        try:
            parent = self._open_parent(parts, create=True)
            try:
                remove_entry(parent, parts[-1])
                safeio.link(target_parent, os.fsencode(target[-1]), parent, os.fsencode(parts[-1]))
                self.extracted.add(parts)
            finally:
                os.close(parent)
        finally:
            os.close(target_parent)

    def _directory(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        parent = self._open_parent(parts, create=True)
        try:
            name = parts[-1]
            st = safeio.try_lstat(parent, os.fsencode(name))
            if st is not None and not stat.S_ISDIR(st.st_mode):
                remove_entry(parent, name)
                st = None
            if st is None:
                safeio.mkdir(parent, os.fsencode(name), 0o755)
            fd = safeio.open_dir(parent, os.fsencode(name))
            try:
                self._xattrs(fd, None, member)
            finally:
                os.close(fd)
            self.extracted.discard(parts)
            self.directories.append((parts, member))
        finally:
            os.close(parent)

    def _whiteout(self, parts: tuple[str, ...], target: str) -> None:
        if target in ("", ".", ".."):
            raise SkipMember("malformed whiteout")
        parent = self._open_parent(parts, create=True)
        try:
            try:
                safeio.lstat(parent, os.fsencode(target))
            except FileNotFoundError:
                pass
            else:
                # OCI: a whiteout only hides lower layers, never this layer's own entry.
                return
            if self.mknod_ok:
                safeio.mknod(parent, os.fsencode(target), stat.S_IFCHR | 0o000, 0)
            else:
                name = WHITEOUT_PREFIX + target
                remove_entry(parent, name)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                os.close(safeio.open_file(parent, os.fsencode(name), flags, 0o000))
        finally:
            os.close(parent)

    def _opaque(self, parts: tuple[str, ...]) -> None:
        parent = self._open_parent(parts, create=True)
        try:
            for attribute in self.opaque_xattrs:
                try:
                    safeio.set_xattr(parent, None, attribute, b"y")
                    return
                except OSError as error:
                    if error.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                        raise
            remove_entry(parent, OPAQUE_MARKER)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            os.close(safeio.open_file(parent, os.fsencode(OPAQUE_MARKER), flags, 0o000))
        finally:
            os.close(parent)

    # -- metadata

    def _xattr_items(self, member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attribute = key[len("SCHILY.xattr.") :]
            if is_image_private_xattr(attribute):
                self.warn(
                    f"{self.label}: dropped overlay-private xattr {attribute} on {member.name!r}"
                )
                continue
            yield attribute, value.encode("utf-8", "surrogateescape")

    def _xattrs(self, fd: int, name: str | None, member: tarfile.TarInfo) -> None:
        for attribute, value in self._xattr_items(member):
            try:
                safeio.set_xattr(fd, None if name is None else os.fsencode(name), attribute, value)
            except OSError as error:
                key = (
                    f"{attribute.split('.')[0]}.* ({errno.errorcode.get(error.errno or 0, error)})"
                )
                self.xattr_failures[key] = self.xattr_failures.get(key, 0) + 1

    def _metadata_fd(self, fd: int, member: tarfile.TarInfo, name: str) -> None:
        self._xattrs(fd, None, member)
        if self.is_root:
            self._chown(lambda: os.fchown(fd, member.uid, member.gid))
        os.fchmod(fd, member.mode & 0o7777)
        ns = int(member.mtime * 1_000_000_000)
        safeio.set_times(fd, None, (ns, ns))

    def _chown(self, call: Callable[[], None]) -> None:
        # Root in a user namespace cannot give away unmapped ids (EINVAL/EPERM): keep ours.
        try:
            call()
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EPERM):
                raise
            self.chown_failures += 1

    def _metadata_by_name(self, parent: int, name: str, member: tarfile.TarInfo) -> None:
        self._xattrs(parent, name, member)
        if self.is_root:
            self._chown(lambda: safeio.chown(parent, os.fsencode(name), member.uid, member.gid))
        if not member.issym():  # a symlink has no mode of its own
            safeio.chmod(parent, os.fsencode(name), member.mode & 0o7777)
        ns = int(member.mtime * 1_000_000_000)
        safeio.set_times(parent, os.fsencode(name), (ns, ns))

    def finish(self) -> None:
        """Directory metadata last, deepest first, so modes like 0555 do not block children."""
        seen: set[tuple[str, ...]] = set()
        for parts, member in sorted(self.directories, key=lambda item: -len(item[0])):
            if parts in seen:
                continue
            seen.add(parts)
            try:
                parent = self._open_parent(parts, create=False)
            except (OSError, SkipMember):
                continue  # replaced by a later member
            try:
                fd = safeio.open_dir(parent, os.fsencode(parts[-1]))
            except OSError:
                os.close(parent)
                continue
            try:
                if self.is_root:
                    self._chown(lambda: os.fchown(fd, member.uid, member.gid))  # noqa: B023
                os.fchmod(fd, member.mode & 0o7777)
                ns = int(member.mtime * 1_000_000_000)
                safeio.set_times(fd, None, (ns, ns))
            except OSError as error:
                self.warn(f"{self.label}: metadata of {member.name!r}: {error.strerror}")
            finally:
                os.close(fd)
                os.close(parent)
        if self.chown_failures:
            self.warn(f"{self.label}: owner of {self.chown_failures} member(s) not kept (unmapped)")
        for key, count in sorted(self.xattr_failures.items()):
            self.warn(f"{self.label}: {count} xattr(s) {key} could not be set")

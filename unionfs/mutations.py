"""Union write rules: create, mkdir, mknod, symlink, link, unlink, rmdir, rename, setattr, xattrs.

Every change lands in the upper layer in kernel overlayfs's on-disk format: removing a name
that exists below leaves a whiteout (char device 0/0, or a ``.wh.`` file with the OCI format
or when the kernel refuses the device); a directory made over a whiteout is opaque; a
renamed directory with lower content gets an absolute ``overlay.redirect`` instead of a
recursive copy. Replacing a whiteout is atomic (the new object is built in the work
directory and renamed or exchanged into place). All methods run with the namespace lock held
(see operations) and only ``await`` for copy-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from unionfs import safeio, whiteout
from unionfs.copyup import EMPTY, FULL, METADATA, CopyUp, CopyUpMode
from unionfs.inodes import Node, link_path, merged_path
from unionfs.layer import Layer
from unionfs.safeio import RelPath
from unionfs.stack import Resolved
from unionfs.tree import MergedTree
from unionfs.workdir import WorkDir

Maker = Callable[[int, bytes], None]  # build an object named NAME in directory fd
Chown = Callable[[int, bytes | None, int, int], None]  # (dir fd, name or None, uid, gid)


@dataclass(frozen=True)
class AttrChange:
    """A SETATTR in plain values: None leaves that attribute as it is."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    @property
    def copy_up(self) -> CopyUpMode:
        """What a lower file must bring up first: only metadata, unless the size changes
        (no data at all when it becomes 0)."""
        if self.size is not None:
            return EMPTY if self.size == 0 else FULL
        return METADATA

    @property
    def beyond_times(self) -> bool:
        return (
            self.size is not None
            or self.mode is not None
            or self.uid is not None
            or self.gid is not None
        )


def _refuse_hidden_name(name: bytes) -> None:
    """A ``.wh.`` name would be read back as a whiteout or opaque marker (hiding lower
    files) and never shows: refuse to make one (test_names_starting_wh_cannot_be_made)."""
    if whiteout.is_hidden_name(name):
        raise OSError(errno.EINVAL, "names starting with .wh. are reserved")


class Mutations:
    def __init__(
        self,
        tree: MergedTree,
        upper: Layer,
        work: WorkDir,
        copyup: CopyUp,
        *,
        oci_whiteouts: bool,
        redirect_dir: bool = True,
    ) -> None:
        self.tree = tree
        self.redirect_dir = redirect_dir  # off: a directory with lower content cannot move
        self.upper = upper
        self.work = work
        self.copyup = copyup
        self.oci_whiteouts = oci_whiteouts
        prefix = work.xattr_prefix
        self.opaque_xattr = prefix + "opaque"
        self.redirect_xattr = prefix + "redirect"
        self.whiteouts_made = 0

    # helpers -------------------------------------------------------------------------
    def _upper_dir(self, node: Node) -> int:
        self.copyup.ensure_dir(node)
        return self.upper.dir_fd(merged_path(node))

    def _note_removal(self, parent: Node, name: bytes, *, whiteout_left: bool) -> None:
        """Keep the cached upper listing of ``parent`` exact after ``name`` went away."""
        if whiteout_left:
            self.upper.note_whiteout(merged_path(parent), name)
        else:
            self.upper.note_entry(merged_path(parent), name, None)

    def _upper_whiteout_at(self, parent: Node, name: bytes) -> bool:
        """Is there a whiteout for ``name`` in the upper copy of ``parent``?"""
        if not parent.in_upper:
            return False
        listing = self.upper.listing(merged_path(parent))
        return listing is not None and name in listing.whiteouts

    def _make_whiteout(self, dir_fd: int, name: bytes) -> None:
        self.whiteouts_made += 1
        if not self.oci_whiteouts:
            try:
                safeio.mknod(dir_fd, name, stat.S_IFCHR | 0o000, 0)
                return
            except PermissionError:
                pass  # no whiteout devices for us here: fall back to the OCI form
        fd = safeio.open_file(
            dir_fd, whiteout.oci_whiteout_name(name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600
        )
        os.close(fd)

    def _remove_oci_whiteout(self, dir_fd: int, name: bytes) -> None:
        if len(whiteout.oci_whiteout_name(name)) > 255:
            return  # no such name can exist (test_rename_to_a_255_byte_name)
        try:
            safeio.unlink(dir_fd, whiteout.oci_whiteout_name(name))
        except FileNotFoundError:
            pass

    def _mark_opaque(self, dir_fd: int, name: bytes) -> None:
        if not self.oci_whiteouts:
            try:
                safeio.set_xattr(dir_fd, name, self.opaque_xattr, b"y")
                return
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
        safeio.add_oci_opaque_marker(dir_fd, name, whiteout.OCI_OPAQUE_MARKER)

    def _place(self, parent: Node, name: bytes, make: Maker, *, kind: int) -> int:
        """Create a new object (of type ``kind``) at ``name`` in the upper copy of ``parent``,
        replacing a whiteout atomically; returns the upper parent fd."""
        is_dir = kind == stat.S_IFDIR
        parent_fd = self._upper_dir(parent)
        replacing = self._upper_whiteout_at(parent, name)
        device_whiteout = False
        if replacing:
            existing = safeio.try_lstat(parent_fd, name)
            device_whiteout = existing is not None and safeio.is_whiteout_device(existing)
        if device_whiteout:
            temp = self.work.temp_name()
            make(self.work.fd, temp)
            try:
                if is_dir:
                    self._mark_opaque(self.work.fd, temp)
                    safeio.renameat2(self.work.fd, temp, parent_fd, name, safeio.RENAME_EXCHANGE)
                else:
                    safeio.renameat2(self.work.fd, temp, parent_fd, name)
            finally:
                safeio.remove_tree(self.work.fd, temp)
        else:
            make(parent_fd, name)
            if replacing:
                if is_dir:
                    self._mark_opaque(parent_fd, name)
                self._remove_oci_whiteout(parent_fd, name)
        self.upper.note_entry(merged_path(parent), name, kind)
        return parent_fd

    def _chown_new(self, dir_fd: int, target: bytes | int, uid: int, gid: int) -> None:
        """Give a new object (``target``: its name in ``dir_fd``, or an open fd) to the
        caller, as the kernel would, when we may."""
        if os.fstat(dir_fd).st_mode & stat.S_ISGID:
            gid = -1  # the upper filesystem already gave it the parent's group
        if uid == os.geteuid() and gid in (-1, os.getegid()):
            return
        with contextlib.suppress(PermissionError):
            if isinstance(target, int):
                safeio.chown(target, None, uid, gid)
            else:
                safeio.chown(dir_fd, target, uid, gid)

    def _require_absent(self, parent: Node, name: bytes) -> None:
        _refuse_hidden_name(name)
        if self.tree.resolve(parent, name) is not None:
            raise FileExistsError(errno.EEXIST, "exists")

    def _adopt_new(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        found = self.tree.lookup(parent, name, created=True)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "vanished")
        return found

    # creation ------------------------------------------------------------------------
    def create(
        self, parent: Node, name: bytes, mode: int, uid: int, gid: int
    ) -> tuple[Node, os.stat_result, int]:
        """Create and open (O_RDWR; O_APPEND is the kernel's job) a new regular file."""
        self._require_absent(parent, name)
        opened: list[int] = []
        open_flags = os.O_CREAT | os.O_EXCL | os.O_RDWR

        def make(dir_fd: int, target: bytes) -> None:
            fd = safeio.open_file(dir_fd, target, open_flags, stat.S_IMODE(mode))
            opened.append(fd)
            self._chown_new(dir_fd, fd, uid, gid)

        try:
            self._place(parent, name, make, kind=stat.S_IFREG)
            node, st = self._adopt_new(parent, name)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return node, st, opened[0]

    def mkdir(
        self, parent: Node, name: bytes, mode: int, uid: int, gid: int
    ) -> tuple[Node, os.stat_result]:
        self._require_absent(parent, name)

        def make(dir_fd: int, target: bytes) -> None:
            safeio.mkdir(dir_fd, target, stat.S_IMODE(mode))
            self._chown_new(dir_fd, target, uid, gid)

        self._place(parent, name, make, kind=stat.S_IFDIR)
        return self._adopt_new(parent, name)

    def mknod(
        self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> tuple[Node, os.stat_result]:
        self._require_absent(parent, name)

        def make(dir_fd: int, target: bytes) -> None:
            safeio.mknod(dir_fd, target, mode, rdev)
            self._chown_new(dir_fd, target, uid, gid)

        self._place(parent, name, make, kind=stat.S_IFMT(mode))
        return self._adopt_new(parent, name)

    def symlink(
        self, parent: Node, name: bytes, target: bytes, uid: int, gid: int
    ) -> tuple[Node, os.stat_result]:
        self._require_absent(parent, name)

        def make(dir_fd: int, link_name: bytes) -> None:
            safeio.symlink(target, dir_fd, link_name)
            self._chown_new(dir_fd, link_name, uid, gid)

        self._place(parent, name, make, kind=stat.S_IFLNK)
        return self._adopt_new(parent, name)

    async def link(self, node: Node, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        if node.is_dir:
            raise PermissionError(errno.EPERM, "hard link to a directory")
        self._require_absent(parent, name)
        await self.copyup.ensure_file(node, data=FULL)
        source_fd, source_name = self.tree.upper_object(node)

        def make(dir_fd: int, target: bytes) -> None:
            safeio.link(source_fd, source_name, dir_fd, target)

        self._place(parent, name, make, kind=node.kind)
        node.add_link(parent, name, in_upper=True)
        return node, self.tree.stat(node)

    # removal -------------------------------------------------------------------------
    def _resolve_existing(self, parent: Node, name: bytes) -> tuple[Resolved, Node]:
        resolved = self.tree.resolve(parent, name)
        if resolved is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry")
        node, _ = self.tree.adopt(parent, name, resolved)
        return resolved, node

    async def unlink(self, parent: Node, name: bytes) -> Node:
        resolved, node = self._resolve_existing(parent, name)
        if node.is_dir:
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not resolved.in_upper and await self._record_lower_hard_link(node):
            resolved, node = self._resolve_existing(parent, name)  # may be up now
        if resolved.in_upper and node.index_name is None:
            await self._keep_upper_for_other_names(node, (parent, name))
        parent_fd = self._upper_dir(parent)
        left_whiteout = resolved.has_lower or not resolved.in_upper
        if resolved.in_upper:
            upper_st = safeio.lstat(parent_fd, name)
            if resolved.has_lower:
                self._replace_with_whiteout(parent_fd, name, is_dir=False)
            else:
                safeio.unlink(parent_fd, name)
            if upper_st.st_nlink <= 1:
                self.tree.inodes.drop_key((upper_st.st_dev, upper_st.st_ino), node)
                if not any(
                    in_upper for link, in_upper in node.links.items() if link != (parent, name)
                ):
                    node.set_in_upper(False)
        else:
            self._make_whiteout(parent_fd, name)
            self.tree.consume_lower_link(node)
        node.drop_link(parent, name)
        self.tree.release_index_entry(node)
        if not node.links and not node.in_upper:
            self._forget_lower_when_gone(node)
        self._note_removal(parent, name, whiteout_left=left_whiteout)
        return node

    @staticmethod
    def _forget_lower_when_gone(node: Node) -> None:
        """A file with no name left keeps its lower data only while other lower names of it
        may still show it."""
        if node.is_dir or node.lower_links_consumed >= node.lower_nlink:
            node.set_lower([])

    async def _record_lower_hard_link(self, node: Node) -> bool:
        """Before a lower name of a file with several names goes (unlink, or replaced by a
        rename), copy the file up into the hard-link index: the merged link count is
        recorded there, so the other names show the right count after a remount (as kernel
        overlayfs with index=on does)."""
        if (
            self.tree.index is not None
            and not node.in_upper
            and stat.S_ISREG(node.kind)
            and node.lower
            and max(node.lower_nlink - node.lower_links_consumed, 0) > 1
        ):
            await self.copyup.ensure_file(node, data=FULL)
            return True
        return False

    async def _keep_upper_for_other_names(self, node: Node, going: tuple[Node, bytes]) -> None:
        """Before the last upper name of a hard-linked file goes, link the upper object to one
        of its still-lower names: a copy-up made through one name must not be lost when that
        name is removed while another (known) name still shows the file."""
        others_up = [link for link, up in node.links.items() if up and link != going]
        others_down = [link for link, up in node.links.items() if not up and link != going]
        if others_up or not others_down:
            return
        await self.copyup.ensure_file(node, data=METADATA, via=others_down[0])

    def _check_whiteout_name(self, name: bytes) -> None:
        """Fail before changing anything when the OCI whiteout of ``name`` cannot exist
        (test_oci_whiteout_of_a_255_byte_name_changes_nothing)."""
        if self.oci_whiteouts and len(whiteout.oci_whiteout_name(name)) > 255:
            raise OSError(errno.ENAMETOOLONG, "no .wh. name that long can exist")

    def _replace_with_whiteout(self, parent_fd: int, name: bytes, *, is_dir: bool) -> None:
        """Atomically turn an upper entry into a whiteout (the old object is removed)."""
        self._check_whiteout_name(name)
        temp = self.work.temp_name()
        if self.oci_whiteouts:
            safeio.renameat2(parent_fd, name, self.work.fd, temp)
            self._make_whiteout(parent_fd, name)
            safeio.remove_tree(self.work.fd, temp)
            return
        try:
            safeio.mknod(self.work.fd, temp, stat.S_IFCHR, 0)
        except PermissionError:
            safeio.renameat2(parent_fd, name, self.work.fd, temp)
            self._make_whiteout(parent_fd, name)
            safeio.remove_tree(self.work.fd, temp)
            return
        self.whiteouts_made += 1
        if is_dir:
            safeio.renameat2(self.work.fd, temp, parent_fd, name, safeio.RENAME_EXCHANGE)
        else:
            safeio.renameat2(self.work.fd, temp, parent_fd, name)
        safeio.remove_tree(self.work.fd, temp)

    def rmdir(self, parent: Node, name: bytes) -> Node:
        resolved, node = self._resolve_existing(parent, name)
        if not node.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        if not self.tree.stack.is_empty(resolved.sources):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        parent_fd = self._upper_dir(parent)
        path = link_path(parent, name)
        if resolved.in_upper:
            upper_st = safeio.lstat(parent_fd, name)
            if resolved.has_lower:
                self._replace_with_whiteout(parent_fd, name, is_dir=True)
            else:
                self._remove_upper_dir(parent_fd, name)
            self.tree.inodes.drop_key((upper_st.st_dev, upper_st.st_ino), node)
        else:
            self._make_whiteout(parent_fd, name)
        # Empty in the merged view: below it the upper holds whiteouts at most, no directories.
        self.upper.forget_dir(path)
        node.forget_layers(names=True)
        self._note_removal(parent, name, whiteout_left=resolved.has_lower or not resolved.in_upper)
        return node

    def _remove_upper_dir(self, parent_fd: int, name: bytes) -> None:
        """Remove an upper directory that is empty in the merged view (it may still hold
        whiteouts): at once when it is empty on disk, else hidden first, then cleaned."""
        try:
            safeio.rmdir(parent_fd, name)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        temp = self.work.temp_name()
        safeio.renameat2(parent_fd, name, self.work.fd, temp)
        safeio.remove_tree(self.work.fd, temp)

    # rename --------------------------------------------------------------------------
    async def rename(
        self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes, flags: int
    ) -> Node | None:
        """Returns the node that lost its name at the target (if any)."""
        _refuse_hidden_name(new_name)
        source_resolved, source = self._resolve_existing(old_parent, old_name)
        target_resolved = self.tree.resolve(new_parent, new_name)
        exchange = bool(flags & safeio.RENAME_EXCHANGE)
        if flags & safeio.RENAME_NOREPLACE and target_resolved is not None:
            raise FileExistsError(errno.EEXIST, "target exists")
        if exchange and target_resolved is None:
            raise FileNotFoundError(errno.ENOENT, "no target to exchange with")
        target: Node | None = None
        if target_resolved is not None:
            target, _ = self.tree.adopt(new_parent, new_name, target_resolved)
            if target is source:
                return None
            if not exchange:
                if source.is_dir and not target.is_dir:
                    raise NotADirectoryError(errno.ENOTDIR, "target is not a directory")
                if not source.is_dir and target.is_dir:
                    raise IsADirectoryError(errno.EISDIR, "target is a directory")
                if target.is_dir and not self.tree.stack.is_empty(target_resolved.sources):
                    raise OSError(errno.ENOTEMPTY, "target directory not empty")
        if source.is_dir and self._is_ancestor(source, new_parent):
            raise OSError(errno.EINVAL, "cannot move a directory into itself")
        if not self.redirect_dir:
            for moving in (source, target if exchange else None):
                if moving is not None and moving.is_dir and moving.lower:
                    # -o redirect_dir=off: as kernel overlayfs, EXDEV (mv copies instead)
                    raise OSError(errno.EXDEV, "redirect_dir=off: directory has lower content")

        await self.copyup.ensure_file(source, data=METADATA, via=(old_parent, old_name))
        target_below = (
            target is not None
            and target_resolved is not None
            and not target.is_dir
            and not target_resolved.in_upper
        )
        if (
            target is not None
            and target_below
            and not exchange
            and await self._record_lower_hard_link(target)
        ):
            target_below = not target.links.get((new_parent, new_name), False)
        if exchange and target is not None:
            await self.copyup.ensure_file(target, data=METADATA, via=(new_parent, new_name))
        old_fd = self._upper_dir(old_parent)
        new_fd = self._upper_dir(new_parent)
        old_path = link_path(old_parent, old_name)
        new_path = link_path(new_parent, new_name)

        if exchange and target is not None:
            self._prepare_moved(source, old_parent, old_name, new_parent, new_name, old_fd)
            self._prepare_moved(target, new_parent, new_name, old_parent, old_name, new_fd)
            safeio.renameat2(old_fd, old_name, new_fd, new_name, safeio.RENAME_EXCHANGE)
            self._relink(source, old_parent, old_name, new_parent, new_name)
            self._relink(target, new_parent, new_name, old_parent, old_name)
            self._forget_moved(old_path, new_path, moved_dirs=source.is_dir or target.is_dir)
            self.upper.note_entry(merged_path(old_parent), old_name, target.kind)
            self.upper.note_entry(merged_path(new_parent), new_name, source.kind)
            return None

        self._prepare_moved(source, old_parent, old_name, new_parent, new_name, old_fd)
        replaced_st: os.stat_result | None = None
        target_upper = safeio.try_lstat(new_fd, new_name)
        if target_upper is not None and stat.S_ISDIR(target_upper.st_mode):
            # An empty-in-the-merged-view upper directory may still hold whiteouts: move it
            # out of the way first (the moved directory is already redirected or opaque).
            temp = self.work.temp_name()
            safeio.renameat2(new_fd, new_name, self.work.fd, temp)
            safeio.remove_tree(self.work.fd, temp)
            replaced_st = target_upper
            target_upper = None
        elif target_upper is not None and not safeio.is_whiteout_device(target_upper):
            replaced_st = target_upper
        moved_dir_over_device = (
            source.is_dir and target_upper is not None and safeio.is_whiteout_device(target_upper)
        )
        if moved_dir_over_device:
            safeio.renameat2(old_fd, old_name, new_fd, new_name, safeio.RENAME_EXCHANGE)
            if source_resolved.has_lower:
                self.whiteouts_made += 1  # the exchanged whiteout now hides the old name
            else:
                safeio.unlink(old_fd, old_name)
        elif source_resolved.has_lower:
            self._rename_leaving_whiteout(old_fd, old_name, new_fd, new_name)
        else:
            safeio.renameat2(old_fd, old_name, new_fd, new_name)
        if self.oci_whiteouts or not moved_dir_over_device:
            self._remove_oci_whiteout(new_fd, new_name)
        if replaced_st is not None and target is not None and replaced_st.st_nlink <= 1:
            self.tree.inodes.drop_key((replaced_st.st_dev, replaced_st.st_ino), target)
        if target is not None:
            target.drop_link(new_parent, new_name)
            if target_below:
                self.tree.consume_lower_link(target)
            if target.is_dir or (not any(target.links.values()) and target.index_name is None):
                target.set_in_upper(False)
            self.tree.release_index_entry(target)
            if not target.links and not target.in_upper:
                # No name left: an fd still open on it sees the file itself (detached).
                self._forget_lower_when_gone(target)
        self._relink(source, old_parent, old_name, new_parent, new_name)
        self._forget_moved(
            old_path, new_path, moved_dirs=source.is_dir or (target is not None and target.is_dir)
        )
        self._note_removal(old_parent, old_name, whiteout_left=source_resolved.has_lower)
        self.upper.note_entry(merged_path(new_parent), new_name, source.kind)
        return target

    def _forget_moved(self, old_path: RelPath, new_path: RelPath, *, moved_dirs: bool) -> None:
        """Cached upper fds and listings below moved directories name the wrong paths now."""
        if moved_dirs:
            self.upper.forget_dir(old_path, subtree=True)
            self.upper.forget_dir(new_path, subtree=True)

    def _rename_leaving_whiteout(
        self, old_fd: int, old_name: bytes, new_fd: int, new_name: bytes
    ) -> None:
        self._check_whiteout_name(old_name)
        self.whiteouts_made += 1
        if not self.oci_whiteouts:
            try:
                safeio.renameat2(old_fd, old_name, new_fd, new_name, safeio.RENAME_WHITEOUT)
                return
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EPERM, errno.ENOTSUP):
                    raise
        safeio.renameat2(old_fd, old_name, new_fd, new_name)
        self.whiteouts_made -= 1
        self._make_whiteout(old_fd, old_name)

    def _prepare_moved(
        self,
        node: Node,
        old_parent: Node,
        old_name: bytes,
        new_parent: Node,
        new_name: bytes,
        dir_fd: int,
    ) -> None:
        """Before an object moves (it is at ``old_name`` in upper directory ``dir_fd``): a
        directory with lower content, or a metadata-only file, gets a redirect to where its
        lower content is found (kernel overlayfs's ``ovl_set_redirect``); a pure upper
        directory landing where lower layers hold the name must hide them (opaque).

        Beyond the kernel: a regular file copied up with its data gets one too when it has an
        origin, so that its origin (and st_ino) is found by path after a remount even where
        ``open_by_handle_at`` is not permitted (unprivileged). Kernel overlayfs ignores a
        redirect on a file that holds its data (and leaves one itself on a metadata-only copy
        that got its data), and the origin's file handle is checked before it is used."""
        if node.is_dir:
            redirected = bool(node.lower)
        elif node.metacopy:
            redirected = True
        else:
            redirected = (
                stat.S_ISREG(node.kind)
                and node.in_upper
                and self.upper.overlay_file_xattrs(link_path(old_parent, old_name)).origin
                is not None
            )
        if redirected:
            samedir = old_parent is new_parent
            absolute = not samedir or (not node.is_dir and node.lower_nlink > 1)
            current = node.redirect
            if current is not None and (not absolute or current[0]):
                return  # still right: relative within the same directory, or absolute
            parts = self._redirect_path(node, old_parent, old_name) if absolute else (old_name,)
            value = whiteout.encode_redirect(parts) if absolute else old_name
            safeio.set_xattr(dir_fd, old_name, self.redirect_xattr, value)
            node.set_redirect((absolute, parts))
            return
        if not node.is_dir:
            return
        lower_sources = [s for s in self.tree.dir_sources(new_parent) if not s.layer.writable]
        if self.tree.stack.lower_positive(lower_sources, new_name):
            self._mark_opaque(dir_fd, old_name)

    def _redirect_path(self, node: Node, old_parent: Node, old_name: bytes) -> RelPath:
        """The absolute redirect of ``node``, now at ``old_parent``/``old_name``: its path in
        the merged namespace of the layers below the upper (the kernel's
        ``ovl_get_redirect``): each ancestor contributes its own redirect, else its name,
        up to the root or to an ancestor's absolute redirect."""
        current = node.redirect
        parts: list[bytes] = [current[1][0] if current is not None else old_name]
        directory = old_parent
        depth = 0
        while directory.ino != self.tree.root.ino and depth < 4096:
            redirect = directory.redirect
            if redirect is not None and redirect[0]:
                return (*redirect[1], *parts)
            link = directory.primary_link()
            if link is None:
                raise FileNotFoundError(errno.ENOENT, "directory has no name any more")
            parts.insert(0, redirect[1][0] if redirect is not None else link[1])
            directory = link[0]
            depth += 1
        return tuple(parts)

    def _relink(
        self, node: Node, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes
    ) -> None:
        if node.is_dir:
            node.set_only_link(new_parent, new_name, in_upper=True)
        else:
            node.move_link((old_parent, old_name), (new_parent, new_name))

    @staticmethod
    def _is_ancestor(node: Node, candidate: Node) -> bool:
        current: Node | None = candidate
        depth = 0
        while current is not None and depth < 4096:
            if current is node:
                return True
            link = current.primary_link()
            current = link[0] if link else None
            depth += 1
        return False

    # attributes ----------------------------------------------------------------------
    async def prepare_change(self, node: Node, data: CopyUpMode = METADATA) -> None:
        """Copy ``node`` up before changing it (see ``CopyUp.ensure_file`` for ``data``)."""
        await self.copyup.ensure_file(node, data=data)

    def change_attributes(
        self,
        node: Node,
        dir_fd: int,
        name: bytes | None,
        change: AttrChange,
        *,
        open_fd: int | None,
        chown: Chown,
        truncate: Callable[[int, int], None] = os.ftruncate,
    ) -> None:
        """Apply ``change`` to the node's upper object (``name`` in ``dir_fd``, or ``dir_fd``
        itself: an open upper file), after ``prepare_change(node, change.copy_up)``. The size
        changes through ``open_fd`` when the request came with a writable handle; owners are
        stored through ``chown`` (the mount's id mapping), sizes set through ``truncate`` (the
        mount's quota accounting)."""
        if change.size is not None:
            if open_fd is not None:
                truncate(open_fd, change.size)
            elif name is None:
                truncate(dir_fd, change.size)  # an open upper file
            else:
                fd = safeio.open_file(dir_fd, name, os.O_WRONLY)
                try:
                    truncate(fd, change.size)
                finally:
                    os.close(fd)
        if change.uid is not None or change.gid is not None:
            uid = -1 if change.uid is None else change.uid
            chown(dir_fd, name, uid, -1 if change.gid is None else change.gid)
        if change.mode is not None:
            if stat.S_ISLNK(node.kind):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            safeio.chmod(dir_fd, name, stat.S_IMODE(change.mode))
        if change.atime_ns is not None or change.mtime_ns is not None:
            current = self.tree.stat(node)
            atime = current.st_atime_ns if change.atime_ns is None else change.atime_ns
            mtime = current.st_mtime_ns if change.mtime_ns is None else change.mtime_ns
            safeio.set_times(dir_fd, name, (atime, mtime))

    @staticmethod
    def copy_up_for_open(flags: int) -> CopyUpMode | None:
        """What an open with ``flags`` needs copied up: nothing for reading (None), no data
        when it truncates (O_TRUNC arrives only if atomic O_TRUNC could not be turned off;
        normally the kernel strips it and sends SETATTR(size=0) after the open), else the
        data."""
        if not flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            return None
        return EMPTY if flags & os.O_TRUNC else FULL

    def open_upper(self, node: Node, flags: int) -> int:
        """Open the node's upper file for writing (after ``prepare_change``); O_TRUNC kept."""
        dir_fd, name = self.upper_location(node)
        assert name is not None
        return safeio.open_file(dir_fd, name, os.O_RDWR | (flags & os.O_TRUNC))

    @staticmethod
    def stored_xattr(shown: str, *, removing: bool = False) -> str:
        """Where xattr ``shown`` is stored in the upper; bookkeeping cannot be set (EPERM)
        and, never being shown, is never there to remove (ENODATA)."""
        stored = whiteout.stored_xattr_name(shown)
        if stored is None:
            if removing:
                raise OSError(errno.ENODATA, "private attribute")
            raise OSError(errno.EPERM, "private attribute")
        return stored

    def set_xattr(self, node: Node, stored: str, value: bytes) -> None:
        """Set an xattr on the node's upper object (after ``prepare_change``)."""
        dir_fd, entry = self.upper_location(node)
        safeio.set_xattr(dir_fd, entry, stored, value)

    def remove_xattr(self, node: Node, stored: str) -> None:
        """Remove an xattr from the node's upper object (after ``prepare_change``)."""
        dir_fd, entry = self.upper_location(node)
        safeio.remove_xattr(dir_fd, entry, stored)

    def upper_location(self, node: Node) -> tuple[int, bytes | None]:
        if node.ino == self.tree.root.ino:
            return self.upper.root_fd, None
        if not node.is_dir:
            return self.tree.upper_object(node)
        path = self.tree.upper_path(node)
        return self.upper.dir_fd(path[:-1]), path[-1]

"""The merged tree: layers + inode table, and the read side of every request.

``MergedTree`` turns (parent node, name) into nodes with stable inode numbers, gives each
node's current attributes (one ``lstat``), opens a node's data for reading and snapshots
merged directory listings. The write side (mutations, copyup) works on the same object.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence

from unionfs import safeio, whiteout
from unionfs.index import HardLinkIndex
from unionfs.inodes import InodeTable, Node, link_path, merged_path
from unionfs.layer import NO_OVERLAY_XATTRS, Layer, OverlayXattrs
from unionfs.origin import Origins
from unionfs.stack import Chain, Resolved, Source, Stack

log = logging.getLogger(__name__)

NAME_MAX = 255  # the longest name a local filesystem takes (bytes)


def check_name_length(name: bytes) -> None:
    """Any name longer than NAME_MAX is ENAMETOOLONG, in every operation (lookup first)."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name too long")


class MergedTree:
    def __init__(self, layers: list[Layer], data_layers: Sequence[Layer] = ()) -> None:
        self.stack = Stack(layers, data_layers)
        self.upper: Layer | None = self.stack.upper
        self.origins = Origins()
        self.inodes = InodeTable(self.stack.root_sources(), root_in_upper=self.upper is not None)
        self.index: HardLinkIndex | None = None  # set by the mount when it writes an index

    @property
    def root(self) -> Node:
        return self.inodes.root

    def close(self) -> None:
        for layer in [*self.stack.layers, *self.stack.data_layers]:
            layer.close()
        if self.index is not None:
            self.index.close()

    # sources -------------------------------------------------------------------------
    def dir_sources(self, node: Node) -> list[Source]:
        """The merged sources of a directory node, top first."""
        if not node.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        sources: list[Source] = []
        if node.in_upper and self.upper is not None:
            sources.append(Source(self.upper, merged_path(node)))
        sources.extend(node.lower)
        return sources

    def upper_path(self, node: Node) -> tuple[bytes, ...]:
        """Path of the node's upper object (it must have one)."""
        if node.is_dir:
            return merged_path(node)
        link = node.upper_link()
        if link is None:
            raise FileNotFoundError(errno.ENOENT, "no upper object")
        return link_path(*link)

    def upper_object(self, node: Node) -> tuple[int, bytes]:
        """(directory fd, name) of a non-directory's upper object: one of its upper names,
        else its hard-link index entry (only lower names of it are known)."""
        assert self.upper is not None
        link = node.upper_link()
        if link is not None:
            return self.upper.parent_and_name(link_path(*link))
        if node.index_name is not None and self.index is not None:
            return self.index.fd, node.index_name
        raise FileNotFoundError(errno.ENOENT, "no upper object")

    # lookup --------------------------------------------------------------------------
    def resolve(self, parent: Node, name: bytes) -> Resolved | None:
        check_name_length(name)
        return self.stack.resolve(self.dir_sources(parent), name)

    def lookup(
        self, parent: Node, name: bytes, *, created: bool = False
    ) -> tuple[Node, os.stat_result] | None:
        """The node of ``name`` in ``parent``; ``created``: an object just made by us (it has
        no overlay xattrs to read)."""
        resolved = self.resolve(parent, name)
        if resolved is None:
            return None
        return self.adopt(parent, name, resolved, created=created)

    def adopt(
        self, parent: Node, name: bytes, resolved: Resolved, *, created: bool = False
    ) -> tuple[Node, os.stat_result]:
        """Find or make the node for a resolved name and record the link."""
        top = resolved.top
        st = top.layer.lstat(top.path)
        key = (st.st_dev, st.st_ino)
        lower = [source for source in resolved.sources if not source.layer.writable]
        node = self.inodes.node_for_key(key)
        if node is not None and node.kind != resolved.kind:
            self.inodes.drop_key(key, node)
            node = None
        if node is None and not resolved.in_upper and self._may_be_indexed(st):
            node = self._adopt_indexed(top, st, key, lower)
        if node is None:
            node = self._new_node(parent, name, resolved, st, key, lower, created)
        if node.is_dir:
            node.set_lower(lower)
            node.set_in_upper(resolved.in_upper)
            node.set_only_link(parent, name, in_upper=resolved.in_upper)
        else:
            if resolved.in_upper:
                node.set_in_upper(True)
            elif not node.lower:
                node.set_lower(lower, lower_nlink=st.st_nlink)
            node.add_link(parent, name, in_upper=resolved.in_upper)
        if node.in_upper and not resolved.in_upper and not node.is_dir:
            # A lower hard link of a file already copied up shows the upper copy.
            st = self.stat(node)
        return node, st

    def _new_node(
        self,
        parent: Node,
        name: bytes,
        resolved: Resolved,
        st: os.stat_result,
        key: tuple[int, int],
        lower: list[Source],
        created: bool = False,
    ) -> Node:
        """The node of an object seen for the first time (or again after being forgotten).

        Its number follows the kernel's ``ovl_getattr``: a lower entry's own inode (the top
        one of a metadata-only chain); a merged directory's topmost lower directory; an
        upper non-directory's copy-up origin when it is found and has one name (or the copy
        is indexed); else the upper object's own inode."""
        top = resolved.top
        if resolved.kind == stat.S_IFDIR:
            identity = key
            if lower:
                first = lower[0].layer.lstat(lower[0].path)
                identity = (first.st_dev, first.st_ino)
            node = self.inodes.new_node(key, resolved.kind, lower, identity)
            node.set_in_upper(resolved.in_upper)
            if resolved.in_upper:
                listing = top.layer.listing(top.path)
                node.set_redirect(listing.redirect if listing is not None else None)
            return node
        regular = stat.S_ISREG(st.st_mode)
        if not resolved.in_upper:
            node = self.inodes.new_node(key, resolved.kind, lower)
            node.set_lower(lower, lower_nlink=st.st_nlink)
            if regular:
                self._take_chain(node, self.stack.chain(resolved, name), top)
            return node
        xattrs = NO_OVERLAY_XATTRS if created else top.layer.overlay_file_xattrs(top.path)
        chain: Chain | None = None
        if regular and st.st_size > 0 and xattrs.metacopy:
            chain = self.stack.chain(resolved, name, (True, xattrs.redirect))
        index_name = None
        if regular and st.st_nlink > 1 and self.index is not None and self.index.names:
            index_name = self._index_entry_of(parent, name, st)
        origin: tuple[int, int] | None = None
        if xattrs.origin is not None:
            origin = self._origin_identity(
                resolved, name, xattrs, chain, indexed=index_name is not None
            )
        node = self.inodes.new_node(key, resolved.kind, [], origin)
        node.set_in_upper(True)
        node.set_redirect(xattrs.redirect)
        if chain is not None:
            self._take_chain(node, chain, top)
        if index_name is not None:
            self._take_index_entry(node, parent, name, st, index_name)
        return node

    @staticmethod
    def _take_chain(node: Node, chain: Chain, top: Source) -> None:
        if not chain.metacopy:
            return
        node.set_data(metacopy=True, data=chain.data)
        if chain.data is None:
            log.warning(
                "metadata-only file %s (%s) has no data in any lower layer: reading it fails",
                b"/".join(top.path).decode(errors="replace"),
                top.layer.path,
            )

    def _origin_identity(
        self,
        resolved: Resolved,
        name: bytes,
        xattrs: OverlayXattrs,
        chain: Chain | None,
        *,
        indexed: bool,
    ) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the copy-up origin of an upper non-directory, when it can be
        found and is to be shown (one name, or the copy is indexed: the kernel's rule).
        Found by path first (its redirect or its name below), checked against the stored
        file handle; then, where permitted (root), by the handle itself. None: not found
        (unprivileged, and renamed after its data was copied up), or not to be shown."""
        assert xattrs.origin is not None
        if chain is not None:
            candidate = chain.below
        else:
            candidate = self.stack.origin_candidate(resolved, name, xattrs.redirect)
        if candidate is not None:
            found = candidate.layer.try_lstat(candidate.path)
            dir_fd, entry = candidate.layer.parent_and_name(candidate.path)
            if found is not None and self.origins.matches(xattrs.origin, dir_fd, entry, found):
                return (found.st_dev, found.st_ino) if found.st_nlink == 1 or indexed else None
        lowers = [layer.root_fd for layer in self.stack.layers if not layer.writable]
        found = self.origins.stat_by_handle(xattrs.origin, lowers) if lowers else None
        if found is not None and (found.st_nlink == 1 or indexed):
            return (found.st_dev, found.st_ino)
        return None

    # the hard-link index -------------------------------------------------------------
    def _may_be_indexed(self, st: os.stat_result) -> bool:
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_nlink > 1
            and self.index is not None
            and bool(self.index.names)
        )

    def _adopt_indexed(
        self, top: Source, st: os.stat_result, key: tuple[int, int], lower: list[Source]
    ) -> Node | None:
        """A lower hard link whose inode was copied up through another name (index entry):
        the node of that copy, found again after a remount."""
        assert self.index is not None
        dir_fd, name = top.layer.parent_and_name(top.path)
        origin = self.index.origin(dir_fd, name, st)
        found = self.index.find(origin) if origin is not None else None
        if found is None:
            return None
        index_name, index_st = found
        index_key = (index_st.st_dev, index_st.st_ino)
        node = self.inodes.node_for_key(index_key)
        if node is not None and node.kind != stat.S_IFREG:
            self.inodes.drop_key(index_key, node)  # a number reused since: not that node
            node = None
        if node is None:
            node = self.inodes.new_node(index_key, stat.S_IFREG, lower, key)
            node.set_in_upper(True)
            node.set_index(
                index_name,
                self.index.link_difference(self.index.fd, index_name, index_st, st.st_nlink),
            )
            if index_st.st_size and any(
                attribute in whiteout.METACOPY_XATTRS
                for attribute in safeio.list_xattrs(self.index.fd, index_name)
            ):
                # (the kernel's): the data is the origin, this inode
                node.set_data(metacopy=True, data=top)
        node.set_index(index_name)
        node.set_lower(node.lower or lower, lower_nlink=st.st_nlink)
        self.inodes.alias(key, node)
        return node

    def _index_entry_of(self, parent: Node, name: bytes, st: os.stat_result) -> bytes | None:
        """The index entry name of upper file ``name`` when it is an indexed copy."""
        assert self.upper is not None and self.index is not None
        dir_fd, entry = self.upper.parent_and_name(link_path(parent, name))
        return self.index.upper_entry_name(dir_fd, entry, st)

    def _take_index_entry(
        self, node: Node, parent: Node, name: bytes, st: os.stat_result, index_name: bytes
    ) -> None:
        """An upper file that is an indexed copy: take its merged link count record."""
        assert self.upper is not None and self.index is not None
        dir_fd, entry = self.upper.parent_and_name(link_path(parent, name))
        node.set_index(index_name, self.index.link_difference(dir_fd, entry, st, st.st_nlink))

    def consume_lower_link(self, node: Node) -> None:
        """One lower name of ``node`` stops showing it from below (copied up, linked up,
        whited out or replaced); an indexed file records its new merged link count."""
        node.consume_lower_link()
        if node.index_name is not None and node.in_upper:
            self.save_link_difference(node)

    def save_link_difference(self, node: Node) -> None:
        assert self.index is not None
        dir_fd, name = self.upper_object(node)
        self.index.set_link_difference(dir_fd, name, node.link_difference)

    def release_index_entry(self, node: Node) -> None:
        """After a name of an indexed file went: when it has no name left at all, remove
        the index entry (its data would otherwise live on, unreachable)."""
        if node.index_name is None or self.index is None:
            return
        try:
            st = safeio.lstat(*self.upper_object(node))
        except FileNotFoundError:
            return
        if st.st_nlink + node.link_difference > 0:
            return
        self.index.remove(node.index_name)
        self.inodes.drop_key((st.st_dev, st.st_ino), node)
        node.set_index(None)
        if node.upper_link() is None:
            node.forget_layers()  # no name anywhere: an fd still open sees the file itself

    # attributes ----------------------------------------------------------------------
    def stat(self, node: Node) -> os.stat_result:
        if node.in_upper and self.upper is not None:
            try:
                if node.is_dir:
                    return self.upper.lstat(self.upper_path(node))
                return safeio.lstat(*self.upper_object(node))
            except FileNotFoundError:
                if not node.open_fds:
                    raise
        elif node.lower:
            top = node.lower[0]
            return top.layer.lstat(top.path)
        for fd in node.open_fds:
            return os.fstat(fd)
        raise FileNotFoundError(errno.ENOENT, "node is gone")

    def nlink(self, node: Node, st: os.stat_result) -> int:
        if node.is_dir:
            return 1 if len(node.lower) + int(node.in_upper) > 1 else st.st_nlink
        if node.index_name is not None and node.in_upper:
            return max(st.st_nlink + node.link_difference, 1)
        remaining_lower = max(node.lower_nlink - node.lower_links_consumed, 0) if node.lower else 0
        if node.in_upper:
            return st.st_nlink + remaining_lower
        return remaining_lower  # 0: no name left (open, unlinked or renamed over)

    # data ----------------------------------------------------------------------------
    def open_for_read(self, node: Node) -> int:
        """An fd on the node's current data (upper copy if any, else the top lower file; a
        metadata-only one's data file)."""
        if node.metacopy:
            data = self.data_source(node)
            return safeio.open_lower_file(*data.layer.parent_and_name(data.path))
        if node.in_upper and self.upper is not None:
            parent_fd, name = self.upper_object(node)
            return safeio.open_file(parent_fd, name, os.O_RDONLY)
        if not node.lower:
            raise FileNotFoundError(errno.ENOENT, "node is gone")
        top = node.lower[0]
        parent_fd, name = top.layer.parent_and_name(top.path)
        return safeio.open_lower_file(parent_fd, name)

    def data_source(self, node: Node) -> Source:
        """Where a metadata-only node's data is; EIO when no lower layer has it (the chain
        of metacopy files and redirects ends nowhere: kernel overlayfs fails the lookup);
        ENOENT when its absolute redirect finds no regular file in the data-only layers
        (the kernel's lazy lookup fails the open so, see ``Stack.data_only``)."""
        if node.data is None:
            raise OSError(errno.EIO, "metadata-only file whose data is in no lower layer")
        data = node.data
        if self.stack.data_layers and not self.stack.holds_data(data):
            raise FileNotFoundError(errno.ENOENT, "data in no data-only layer")
        return data

    def readlink(self, node: Node) -> bytes:
        if not stat.S_ISLNK(node.kind):
            raise OSError(errno.EINVAL, "not a symlink")
        parent_fd, name = self.top_location(node)
        assert name is not None  # only the root has no name, and it is a directory
        return safeio.readlink(parent_fd, name)

    def get_xattr(self, node: Node, shown: str) -> bytes:
        """The value of xattr ``shown`` (its name in the merged view) on the node's top
        object; ENODATA when absent or overlay bookkeeping."""
        stored = whiteout.stored_xattr_name(shown)
        if stored is None:
            raise OSError(errno.ENODATA, "private")
        dir_fd, entry = self.top_location(node)
        value = safeio.get_xattr(dir_fd, entry, stored)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    def list_xattrs(self, node: Node) -> list[str]:
        """The node's xattrs as the merged view shows them (bookkeeping hidden, escaped
        ones unescaped)."""
        dir_fd, entry = self.top_location(node)
        shown = (whiteout.shown_xattr_name(stored) for stored in safeio.list_xattrs(dir_fd, entry))
        return [name for name in shown if name is not None]

    def top_location(self, node: Node) -> tuple[int, bytes | None]:
        """(directory fd, name) reaching the node's top object; name None means the fd
        itself (the root of a layer)."""
        if node.ino == self.root.ino:
            layer = self.upper if self.upper is not None else node.lower[0].layer
            return layer.root_fd, None
        if node.in_upper and self.upper is not None:
            if node.is_dir:
                return self.upper.parent_and_name(self.upper_path(node))
            return self.upper_object(node)
        if not node.lower:
            for fd in node.open_fds:
                return fd, None  # unlinked while open: the open file itself
            raise FileNotFoundError(errno.ENOENT, "node is gone")
        top = node.lower[0]
        return top.layer.parent_and_name(top.path)

    def list_dir(self, node: Node) -> list[tuple[bytes, int]]:
        return self.stack.list_merged(self.dir_sources(node))

"""FUSE inode numbers <-> merged nodes, lookup counts and stable identity.

A ``Node`` is one merged file or directory. Its FUSE inode number (also its ``st_ino``) is
chosen once per real object: the key is the (st_dev, st_ino) of the object in the layer it
comes from, so hard links inside a layer share one node, and a node keeps its number when it
is copied up (the upper copy's key is added as an alias), renamed or forgotten and looked up
again. Keys of upper objects are dropped when the object is deleted, because the upper
filesystem may reuse the number.

Links: a node knows the merged names (parent node, name) it was reached by. Directories
have exactly one. For non-directories the map says whether that name exists in the upper
layer; the upper data of a copied-up file is reached through any upper link, or through its
hard-link index entry when only lower names of it are known.
"""

from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass, field

from unionfs.stack import Source

ROOT_INODE = 1  # FUSE_ROOT_ID: the kernel's fixed inode number of a FUSE mount's root


class LinkMap(dict[tuple["Node", bytes], bool]):
    """A node's links, (parent, name) -> in upper, that keep each parent's count of the
    links naming it as parent (``Node.children``): a directory is forgotten only when no
    remembered node is reached through it."""

    def __setitem__(self, link: tuple[Node, bytes], in_upper: bool) -> None:
        if link not in self:
            link[0].children += 1
        super().__setitem__(link, in_upper)

    def __delitem__(self, link: tuple[Node, bytes]) -> None:
        super().__delitem__(link)
        link[0].children -= 1

    def pop(self, link: tuple[Node, bytes], default: bool | None = None) -> bool | None:  # type: ignore[override]
        if link not in self:
            return default
        in_upper = self[link]
        del self[link]
        return in_upper

    def clear(self) -> None:
        for link in list(self):
            del self[link]


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    kind: int
    lower: list[Source]  # lower sources, top first (directories: every merged lower dir)
    links: LinkMap = field(default_factory=LinkMap)  # (parent, name) -> in upper
    lookups: int = 0
    children: int = 0  # links of remembered nodes that name this node as their parent
    generation: int = 0  # bumped on copy-up so open handles switch to the upper copy
    lower_nlink: int = 0  # names the lower object had (hard links)
    lower_links_consumed: int = 0  # of those, names since copied up or deleted
    open_fds: set[int] = field(default_factory=set)  # fds of open handles (for unlinked files)
    in_upper: bool = False  # an upper object exists for this node
    metacopy: bool = False  # the upper object holds metadata only; data is in lower[0]
    index_name: bytes | None = None  # a lower hard link copied up: its hard-link index entry
    link_difference: int = 0  # indexed: merged link count minus the upper inode's count

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    def primary_link(self) -> tuple[Node, bytes] | None:
        upper = self.upper_link()
        if upper is not None:
            return upper
        for link in self.links:
            return link
        return None

    def upper_link(self) -> tuple[Node, bytes] | None:
        for link, in_upper in self.links.items():
            if in_upper:
                return link
        return None

    def upper_link_or_fail(self) -> tuple[Node, bytes]:
        link = self.upper_link()
        if link is None:
            raise FileNotFoundError(2, "no upper object")
        return link

    def set_only_link(self, parent: Node, name: bytes, *, in_upper: bool) -> None:
        self.links.clear()
        self.links[(parent, name)] = in_upper


def merged_path(node: Node) -> tuple[bytes, ...]:
    """The path of a directory (or of a node's primary link) in the merged tree.

    In the upper layer every object sits at its merged path, so this is also the upper path.
    """
    parts: list[bytes] = []
    current: Node | None = node
    seen = 0
    while current is not None and current.ino != ROOT_INODE:
        link = current.primary_link()
        if link is None:
            raise FileNotFoundError(2, "node has no name any more")
        parent, name = link
        parts.append(name)
        current = parent
        seen += 1
        if seen > 4096:
            raise OSError(40, "path too deep")
    parts.reverse()
    return tuple(parts)


def link_path(parent: Node, name: bytes) -> tuple[bytes, ...]:
    return (*merged_path(parent), name)


class InodeTable:
    def __init__(self, root_sources: list[Source], root_in_upper: bool) -> None:
        self._numbers = itertools.count(ROOT_INODE + 1)
        self.nodes: dict[int, Node] = {}
        self.keys: dict[tuple[int, int], int] = {}
        self.root = Node(
            ROOT_INODE, stat.S_IFDIR, [s for s in root_sources if not s.layer.writable]
        )
        self.root.in_upper = root_in_upper
        self.root.lookups = 1
        self.nodes[ROOT_INODE] = self.root
        for source in root_sources:
            st = os.fstat(source.layer.root_fd)
            self.keys[(st.st_dev, st.st_ino)] = ROOT_INODE

    def __getitem__(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise OSError(116, "stale inode")  # ESTALE
        return node

    def node_for_key(self, key: tuple[int, int]) -> Node | None:
        ino = self.keys.get(key)
        return None if ino is None else self.nodes.get(ino)

    def new_node(self, key: tuple[int, int], kind: int, lower: list[Source]) -> Node:
        ino = self.keys.get(key)
        if ino is None:
            ino = next(self._numbers)
            self.keys[key] = ino
        node = Node(ino, kind, lower)
        self.nodes[ino] = node
        return node

    def alias(self, key: tuple[int, int], node: Node) -> None:
        self.keys[key] = node.ino

    def drop_key(self, key: tuple[int, int], node: Node) -> None:
        if self.keys.get(key) == node.ino:
            del self.keys[key]

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references: forget the node once nothing needs it
        (its number stays reserved for its key, so it comes back with the same st_ino)."""
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups -= count
        pending = [node]
        while pending:
            node = pending.pop()
            if not self._unused(node):
                continue
            del self.nodes[node.ino]
            parents = [parent for parent, _name in node.links]
            node.links.clear()
            pending.extend(parents)

    def _unused(self, node: Node) -> bool:
        return (
            node.ino != ROOT_INODE
            and self.nodes.get(node.ino) is node
            and node.lookups <= 0
            and not node.open_fds
            and node.children <= 0
            # Lower hard links partly copied up or deleted without an index: that state
            # cannot be read back from the layers, keep it for the life of the mount.
            and not (node.lower_links_consumed and node.lower_nlink > 1 and node.index_name is None)
        )

"""FUSE inode numbers <-> merged nodes, lookup counts and stable identity.

A ``Node`` is one merged file or directory. pyfuse3 uses its ``st_ino`` as the FUSE node id,
so a node's number is both. It is chosen when the node is made, xino-style
(``InodeNumbers``): the real inode number of the object the node stands for (its identity:
the lower object for a lower entry, a merged directory or a copy-up whose origin is known;
the upper object otherwise), composed with the number of its filesystem when the layers sit
on several. So a file keeps its number across copy-up, rename, link and remounts, and all
layers on one filesystem show the real inode numbers, as kernel overlayfs does.

Node ids must stay unique among live nodes, non-zero, and 1 is the root's. A number already
used by a live node that is another object (an upper inode number reused by the upper
filesystem while the old file is still open, unlinked) gives the new node a per-mount number
from a range real numbers never reach. ``keys`` maps each layer object's (st_dev, st_ino) to
its node's number: hard links inside a layer share one node, and a copied-up node is also
found by its upper copy (an alias). Keys of upper objects are dropped when the object is
deleted, because the upper filesystem may reuse the number.

Links: a node knows the merged names (parent node, name) it was reached by. Directories
have exactly one. For non-directories the map says whether that name exists in the upper
layer; the upper data of a copied-up file is reached through any upper link, or through its
hard-link index entry when only lower names of it are known.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
from dataclasses import dataclass, field

from unionfs.stack import Source

log = logging.getLogger(__name__)

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
    # fds of open handles (for unlinked files); immutable, so every node shares the empty one
    # (a set per node cost 216 bytes of each of the tens of thousands a walk remembers)
    open_fds: frozenset[int] = frozenset()
    in_upper: bool = False  # an upper object exists for this node
    metacopy: bool = False  # the top object holds metadata only; its data is in ``data``
    data: Source | None = None  # metacopy: the lower regular file holding the data
    redirect: tuple[bool, tuple[bytes, ...]] | None = None  # the upper object's redirect
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

    # State changes: every module changes a node through these (tests/unit/test_core_rules.py).

    def looked_up(self) -> None:
        """The kernel got one more reference (an entry reply)."""
        self.lookups += 1

    def add_link(self, parent: Node, name: bytes, *, in_upper: bool) -> None:
        self.links[(parent, name)] = in_upper

    def drop_link(self, parent: Node, name: bytes) -> None:
        self.links.pop((parent, name), None)

    def move_link(self, old: tuple[Node, bytes], new: tuple[Node, bytes]) -> None:
        """A rename of a non-directory: the old name goes, the new one is in the upper."""
        self.links.pop(old, None)
        self.links[new] = True

    def opened(self, fd: int) -> None:
        self.open_fds = self.open_fds | {fd}

    def closed(self, fd: int) -> None:
        self.open_fds = self.open_fds - {fd}

    def set_lower(self, lower: list[Source], *, lower_nlink: int | None = None) -> None:
        """The node's lower sources (top first); ``lower_nlink``: the lower object's link
        count, kept at its highest."""
        self.lower = lower
        if lower_nlink is not None:
            self.lower_nlink = max(self.lower_nlink, lower_nlink)

    def set_in_upper(self, in_upper: bool) -> None:
        self.in_upper = in_upper

    def set_redirect(self, redirect: tuple[bool, tuple[bytes, ...]] | None) -> None:
        self.redirect = redirect

    def set_data(self, *, metacopy: bool, data: Source | None) -> None:
        """Metadata-only (``data``: the lower file holding the data) or not (None)."""
        self.metacopy = metacopy
        self.data = data

    def copied_up(self, parent: Node, name: bytes) -> None:
        """An upper object now exists for the node, at ``parent``/``name``."""
        self.in_upper = True
        self.links[(parent, name)] = True

    def new_generation(self) -> None:
        """The upper copy replaced what open handles read: they switch to it."""
        self.generation += 1

    def set_index(self, index_name: bytes | None, link_difference: int | None = None) -> None:
        """The node's hard-link index entry (None: none) and merged link count record."""
        self.index_name = index_name
        if link_difference is not None:
            self.link_difference = link_difference

    def consume_lower_link(self) -> None:
        """One lower name stops showing the node from below; an indexed copy's merged link
        count drops with it."""
        self.lower_links_consumed += 1
        if self.index_name is not None and self.in_upper:
            self.link_difference -= 1

    def forget_layers(self, *, names: bool = False) -> None:
        """Nothing in any layer stands for the node any more (``names``: nor any name)."""
        if names:
            self.links.clear()
        self.in_upper = False
        self.lower = []


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


class InodeNumbers:
    """Inode numbers from real ones, xino-style.

    With every layer on one filesystem a number is the real inode number itself. With layers
    on N > 1 filesystems the top B = bit_length(N - 1) bits hold the filesystem's index
    (the upper's filesystem first, then the lowers' from the top) and the real number must
    fit in the 63 - B bits below the next one. That bit, 1 << (63 - B), marks numbers made
    per mount (``fallback``), for a real number too big to fit (not stable across remounts,
    logged once), for a number already taken by a live node, and for 0 and 1 (the root is 1).
    """

    def __init__(self, devices: list[int]) -> None:
        self.filesystems: dict[int, int] = {}
        for device in devices:
            self.filesystems.setdefault(device, len(self.filesystems))
        self.bits = (len(self.filesystems) - 1).bit_length()
        self.limit = 1 << (63 - self.bits)  # real numbers must be below; also the fallback bit
        self._fallbacks = itertools.count(1)
        self.too_big = 0

    def persistent(self, key: tuple[int, int]) -> int | None:
        """The number of object ``key`` = (st_dev, st_ino), None when it has none."""
        device, ino = key
        filesystem = self.filesystems.get(device)
        if filesystem is None or ino <= ROOT_INODE:
            return None
        if ino >= self.limit:
            if not self.too_big:
                log.warning("inode number %d does not fit %d bits: numbered per mount", ino,
                            63 - self.bits)  # fmt: skip
            self.too_big += 1
            return None
        return (filesystem << (64 - self.bits)) | ino if self.bits else ino

    def fallback(self) -> int:
        return self.limit | next(self._fallbacks)


class InodeTable:
    def __init__(
        self,
        root_sources: list[Source],
        root_in_upper: bool,
        numbers: InodeNumbers | None = None,
    ) -> None:
        if numbers is None:
            numbers = InodeNumbers([os.fstat(s.layer.root_fd).st_dev for s in root_sources])
        self.numbers = numbers
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

    def new_node(
        self,
        key: tuple[int, int],
        kind: int,
        lower: list[Source],
        identity: tuple[int, int] | None = None,
    ) -> Node:
        """A node for object ``key`` (not known yet), numbered after object ``identity``
        (default: ``key`` itself); a number this key had before in this mount is kept."""
        ino = self.keys.get(key)
        if ino is None or ino in self.nodes:
            ino = self.numbers.persistent(identity if identity is not None else key)
            if ino is None or ino in self.nodes:
                ino = self.numbers.fallback()
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

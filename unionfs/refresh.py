"""Live lower layers: forget what the daemon cached of a changed lower path, and say which
kernel caches must go.

Lower layers are cached as if immutable (layer listings, stats and directory fds; the nodes'
lower sources; the kernel's dentries, attributes and page cache). When a lower layer changes
under a live mount, ``unionfs refresh`` (``refresh_node``) or ``-o watch`` (``refresh_entry``,
per inotify event) drops the daemon's caches here, re-resolves the names involved and returns
the kernel invalidations to make: ``(inode, None)`` for ``invalidate_inode`` (attributes and
data, or a directory's cached listing), ``(parent inode, name)`` for ``invalidate_entry``.
The FUSE adapter makes them from a worker thread (never inline in a request handler: the
kernel may wait for a request of ours while it invalidates).

What a user sees (README, "Live lower layers"):
- a name added to a lower layer shows, one removed goes, one replaced (new inode, e.g. a
  file renamed over it) shows the new object, one rewritten in place shows its new data;
- an open file keeps the object it opened: a replaced lower file keeps its old data for
  whoever has it open (an in-place rewrite is seen by them too: it is the same file);
- a copied-up file never changes: the upper copy hides the lower one;
- a whiteout keeps hiding the name, even when the lower layer adds it again; an opaque
  directory keeps hiding everything below.
Lower paths are matched to merged paths by name; a change under a directory reached through
a redirect (a renamed lower directory) is picked up by ``unionfs refresh`` of that directory.
"""

from __future__ import annotations

import os

from unionfs.inodes import Node, merged_path
from unionfs.layer import Layer
from unionfs.safeio import RelPath
from unionfs.stack import Source
from unionfs.tree import MergedTree

Invalidation = tuple[int, bytes | None]  # (inode, None) or (parent inode, name)
MAX_DEPTH = 4096


def _same_sources(one: list[Source], other: list[Source]) -> bool:
    return [(s.layer.index, s.path) for s in one] == [(s.layer.index, s.path) for s in other]


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


class Refresher:
    def __init__(self, tree: MergedTree) -> None:
        self.tree = tree
        self.refreshes = 0  # refresh requests and watch batches handled
        self.invalidations = 0  # kernel invalidations asked for

    @property
    def lowers(self) -> list[Layer]:
        return [layer for layer in self.tree.stack.layers if not layer.writable]

    def _children(self) -> dict[int, dict[bytes, Node]]:
        """Known nodes by (parent inode, name): one pass over the inode table."""
        children: dict[int, dict[bytes, Node]] = {}
        for node in self.tree.inodes.nodes.values():
            for parent, name in node.links:
                children.setdefault(parent.ino, {})[name] = node
        return children

    def _forget(self, path: RelPath, *, subtree: bool) -> None:
        for layer in self.lowers:
            layer.forget_path(path, subtree=subtree)

    # one name ------------------------------------------------------------------------
    @staticmethod
    def _old_stats(nodes: list[Node]) -> dict[int, os.stat_result | None]:
        """What the caches say of nodes whose top object is in a lower layer, before the
        caches are dropped."""
        old: dict[int, os.stat_result | None] = {}
        for node in nodes:
            if not node.in_upper and node.lower:
                top = node.lower[0]
                old[node.ino] = top.layer.cached_stat(top.path)
        return old

    def _entry(
        self,
        parent: Node,
        name: bytes,
        known: Node | None,
        out: list[Invalidation],
        old: dict[int, os.stat_result | None],
    ) -> None:
        """Re-resolve ``name`` in ``parent`` (its caches already dropped) against what the
        kernel may hold (``known``: the node it was given, if any; ``old``: lower stats
        cached before)."""
        try:
            resolved = self.tree.resolve(parent, name)
        except OSError:
            resolved = None
        if known is None:
            out.append((parent.ino, name))  # a new name (negative dentry), or nothing
            return
        st = None
        if resolved is not None:
            try:
                st = resolved.top.layer.lstat(resolved.top.path)
            except OSError:
                st = None
        if (
            resolved is None
            or st is None
            or resolved.kind != known.kind
            or self.tree.inodes.keys.get((st.st_dev, st.st_ino)) != known.ino
        ):
            # Gone, or another object now: a new lookup finds it. The old object's inode
            # number may be reused by the layer's filesystem for a new file anywhere: it
            # must no longer lead to this node.
            before = old.get(known.ino)
            if before is not None:
                self.tree.inodes.drop_key((before.st_dev, before.st_ino), known)
            out.append((parent.ino, name))
            return
        if known.is_dir:
            lower = [source for source in resolved.sources if not source.layer.writable]
            if not _same_sources(lower, known.lower):
                known.set_lower(lower)
                out.append((known.ino, None))
        elif not known.in_upper:
            before = old.get(known.ino)
            if before is None or _changed(before, st):
                # Rewritten in place (or unknown). The kernel keeps a cached inode's size
                # when it owns sizes (write-back cache): the new content gets a node (and
                # inode number) of its own; whoever has the old one open keeps it.
                self.tree.inodes.drop_key((st.st_dev, st.st_ino), known)
                out.append((parent.ino, name))
                out.append((known.ino, None))
        elif known.metacopy:
            out.append((known.ino, None))  # its data is a lower file

    def _directory(
        self,
        directory: Node,
        children: dict[int, dict[bytes, Node]],
        out: list[Invalidation],
        old: dict[int, os.stat_result | None],
    ) -> None:
        known = children.get(directory.ino, {})
        try:
            names = {name for name, _kind in self.tree.list_dir(directory)}
        except OSError:
            names = set()
        for name in names | set(known):
            self._entry(directory, name, known.get(name), out, old)
        out.append((directory.ino, None))

    # entry points --------------------------------------------------------------------
    def refresh_node(self, node: Node) -> list[Invalidation]:
        """``unionfs refresh`` of ``node``: a directory with everything known below it, or
        one non-directory."""
        self.refreshes += 1
        out: list[Invalidation] = []
        children = self._children()
        path = merged_path(node)
        below = self._below(node, children)
        old = self._old_stats([node, *below])
        self._forget(path, subtree=True)
        if path:
            self._forget(path[:-1], subtree=False)
            link = node.primary_link()
            if link is not None:
                self._entry(link[0], link[1], node, out, old)
        if node.is_dir:
            for directory in [node, *below]:
                if directory.is_dir:
                    self._directory(directory, children, out, old)
        self.invalidations += len(out)
        return out

    @staticmethod
    def _below(node: Node, children: dict[int, dict[bytes, Node]]) -> list[Node]:
        """Every known node below directory ``node`` (parents before children)."""
        found: list[Node] = []
        pending: list[tuple[Node, int]] = [(node, 0)]
        seen = {node.ino}
        while pending:
            directory, depth = pending.pop()
            if depth >= MAX_DEPTH:
                continue
            for child in children.get(directory.ino, {}).values():
                if child.ino in seen:
                    continue
                seen.add(child.ino)
                found.append(child)
                if child.is_dir:
                    pending.append((child, depth + 1))
        return found

    def find_dir(self, path: RelPath, children: dict[int, dict[bytes, Node]]) -> Node | None:
        """The known directory node at merged ``path`` (None: the kernel knows nothing there)."""
        node = self.tree.root
        for name in path:
            child = children.get(node.ino, {}).get(name)
            if child is None or not child.is_dir:
                return None
            node = child
        return node

    def refresh_entries(self, changes: dict[RelPath, set[bytes]]) -> list[Invalidation]:
        """``-o watch``: names changed in lower directories (lower path -> names)."""
        self.refreshes += 1
        out: list[Invalidation] = []
        children = self._children()
        for path, names in changes.items():
            directory = self.find_dir(path, children)
            known = children.get(directory.ino, {}) if directory is not None else {}
            old = self._old_stats([known[name] for name in names if name in known])
            self._forget(path, subtree=False)
            for name in names:
                self._forget((*path, name), subtree=True)
            if directory is None:
                continue
            for name in names:
                self._entry(directory, name, known.get(name), out, old)
            out.append((directory.ino, None))
        self.invalidations += len(out)
        return out

    def refresh_all(self) -> list[Invalidation]:
        """Everything (the watch's event queue overflowed)."""
        return self.refresh_node(self.tree.root)


def describe(out: list[Invalidation]) -> str:
    """What a refresh asked of the kernel, in a few words (``unionfs refresh`` prints it)."""
    entries = sum(1 for _ino, name in out if name is not None)
    return f"{entries} names and {len(out) - entries} inodes invalidated"

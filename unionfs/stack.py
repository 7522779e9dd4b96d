"""Union read rules: resolve a name top->bottom the way kernel overlayfs's lookup does.

A merged directory is a list of ``Source`` (layer, path in that layer), top first. Looking up a
child walks those sources (``fs/overlayfs/namei.c``, ``ovl_lookup``; only read to understand it):

- the first layer holding the name decides its type; a whiteout stops the search;
- a directory continues into lower layers until an opaque directory, a whiteout or a
  non-directory; its ``overlay.redirect`` sends the search in the layers below elsewhere: a
  relative one to another name in the same parent, an absolute one to a path walked from the
  root of each lower layer (itself following the redirects and stopping at the opaque
  directories met on the way, so a path names a place in the merged lower namespace);
- a non-directory ends the search, unless it carries ``overlay.metacopy``: then it holds
  metadata only and its data is the first regular file without it found further down, by
  the same rules, following each metadata-only file's own redirect (chains several
  generations deep: an upper rotated into the lowers keeps its metacopy files). That chain is
  followed only on demand (``chain``), when a node is made, so a plain lookup reads no xattr.
- data-only layers (the kernel's ``lowerdir=A::DATA``, Linux 6.5+, the composefs design) are
  no part of the merged namespace: never listed, never found by a lookup. When a
  metadata-only chain still has no data after the last regular lower layer and its last
  redirect was absolute, that path is walked from each data-only layer's root in turn
  (component by component, no whiteout, opaque or redirect read there, as the kernel's
  ``ovl_lookup_data_layers``) and the first regular file found holds the data.

Everything here is synchronous and only reads layers.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass

from unionfs import whiteout
from unionfs.layer import Layer
from unionfs.safeio import RelPath

Redirect = tuple[bool, RelPath]  # (absolute, components), see whiteout.parse_redirect


@dataclass(frozen=True, slots=True)
class Source:
    layer: Layer
    path: RelPath


@dataclass(slots=True)
class Resolved:
    """The result of looking up one name in a merged directory."""

    kind: int  # S_IFMT of the top entry
    sources: list[Source]  # top first; directories: every merged layer; others: just the top
    has_lower: bool  # some lower layer holds this name (removing it needs a whiteout)
    # Non-directories: the parent's sources and the position after the top's source, where
    # the search would go on below the top (metadata-only chains, origin candidates).
    parent_sources: Sequence[Source] = ()
    position: int = 0

    @property
    def top(self) -> Source:
        return self.sources[0]

    @property
    def in_upper(self) -> bool:
        return self.sources[0].layer.writable


@dataclass(slots=True)
class Chain:
    """What lies below a non-directory's top entry."""

    metacopy: bool  # the top entry holds metadata only
    redirect: Redirect | None  # the top entry's own ``overlay.redirect``
    below: Source | None  # the first entry found below the top (the kernel's lower stack[0])
    data: Source | None  # metacopy: the regular file holding the data (None: chain broken)


@dataclass(slots=True)
class _Search:
    """The state of one lookup walking down the layers (the kernel's ``ovl_lookup_data``)."""

    parts: RelPath  # relative: one name in the parent; absolute: a path from each layer root
    absolute: bool = False
    stop: bool = False  # nothing below may contribute any more
    is_dir: bool = False  # the entry found first is a directory
    metacopy: bool = False  # the last non-directory found holds metadata only
    inspect: bool = False  # read the xattrs of non-directories (metacopy, redirect)

    def follow(self, redirect: Redirect, index: int) -> None:
        """Apply a redirect found on component ``index`` of ``parts``."""
        absolute, target = redirect
        suffix = self.parts[index + 1 :]
        if absolute:
            self.parts = (*target, *suffix)
            self.absolute = True
            self.stop = False  # an absolute redirect lifts an opaque ancestor's stop
        else:
            self.parts = (*self.parts[:index], target[0], *suffix)


class Stack:
    """The ordered layers (top first: the upper, if any, then lowers top to bottom)."""

    def __init__(self, layers: Sequence[Layer], data_layers: Sequence[Layer] = ()) -> None:
        self.layers = list(layers)
        self.data_layers = list(data_layers)
        self.upper: Layer | None = layers[0] if layers and layers[0].writable else None
        for layer in self.layers:
            layer.share_budget(len(self.layers))

    def root_sources(self) -> list[Source]:
        """Every layer's root merges (an opaque marker on a layer root is ignored, as the
        kernel does)."""
        return [Source(layer, ()) for layer in self.layers]

    def _roots_below(self, index: int) -> list[Source]:
        """The roots of the layers below the layer numbered ``index`` (-1: all of them)."""
        return [Source(lower, ()) for lower in self.layers if lower.index > index]

    # one layer ------------------------------------------------------------------------
    def _find(
        self, layer: Layer, directory: RelPath | None, search: _Search
    ) -> tuple[Source, int] | None:
        """The entry ``search`` names in ``layer`` (under ``directory`` for a relative
        search, from the layer root for an absolute one), with its type."""
        if not search.absolute:
            assert directory is not None
            return self._find_one(layer, directory, search, len(search.parts) - 1, last=True)
        path: RelPath = ()
        remaining = len(search.parts)
        found = None
        while remaining:
            # Counted from the end: a redirect met on the way rewrites the prefix of
            # ``parts`` (for the layers below), never the components still to walk here.
            index = len(search.parts) - remaining
            remaining -= 1
            found = self._find_one(layer, path, search, index, last=not remaining)
            if found is None:
                return None
            path = found[0].path
        return found

    def _find_one(
        self, layer: Layer, directory: RelPath, search: _Search, index: int, *, last: bool
    ) -> tuple[Source, int] | None:
        name = search.parts[index]
        listing = layer.listing(directory)
        if listing is None:
            return None
        kind = listing.entries.get(name)
        # A whiteout ends the search; an entry beside its own .wh. file (a create or mkdir
        # over an OCI whiteout half done) still shows itself, and hides what is below.
        hidden = name in listing.whiteouts
        if kind is None:
            search.stop = search.stop or hidden
            return None
        path = (*directory, name)
        if last and search.metacopy and kind != stat.S_IFREG:
            search.stop = True
            return None
        if kind != stat.S_IFDIR:
            search.stop = True
            if search.is_dir or not last:
                return None
            if search.inspect and kind == stat.S_IFREG:
                metacopy, redirect = self.file_metadata(layer, path)
                search.metacopy = metacopy
                if metacopy:
                    search.stop = hidden
                    if redirect is not None:
                        search.follow(redirect, index)
            return Source(layer, path), kind
        if last:
            search.is_dir = True
        child = layer.listing(path)
        if child is None or child.opaque:  # unreadable here: nothing below can be known
            search.stop = True
        elif child.redirect is not None:
            search.follow(child.redirect, index)
        search.stop = search.stop or hidden
        return Source(layer, path), kind

    @staticmethod
    def file_metadata(layer: Layer, path: RelPath) -> tuple[bool, Redirect | None]:
        """(metadata only?, its redirect) of regular file ``path`` in ``layer``. An empty
        file is never taken for a metadata-only one (there is no data to find)."""
        st = layer.try_lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return False, None
        xattrs = layer.overlay_file_xattrs(path)
        return xattrs.metacopy, xattrs.redirect

    # lookups --------------------------------------------------------------------------
    def resolve(self, parent_sources: Sequence[Source], name: bytes) -> Resolved | None:
        """Look ``name`` up in the merged directory made of ``parent_sources``.

        The common case (no redirect met) is walked here directly; a directory's redirect
        hands the rest of the search to ``_resolve_redirected``."""
        if whiteout.is_hidden_name(name):
            return None
        sources: list[Source] = []
        kind = 0
        position = 0
        count = len(parent_sources)
        while position < count:
            source = parent_sources[position]
            position += 1
            layer = source.layer
            listing = layer.listing(source.path)
            if listing is None:
                continue
            entry_kind = listing.entries.get(name)
            if entry_kind is None:
                if name in listing.whiteouts:
                    break
                continue
            path = (*source.path, name)
            if not sources:
                kind = entry_kind
                if kind != stat.S_IFDIR:
                    sources.append(Source(layer, path))
                    has_lower = not layer.writable or self.lower_positive(parent_sources, name)
                    return Resolved(kind, sources, has_lower, parent_sources, position)
            elif entry_kind != stat.S_IFDIR:
                break  # a non-directory below a directory ends the stack
            sources.append(Source(layer, path))
            child = layer.listing(path)
            if child is None or child.opaque or name in listing.whiteouts:
                break  # (unreadable here: nothing below it can be known)
            if child.redirect is not None:
                search = _Search((name,), is_dir=True)
                search.follow(child.redirect, 0)
                self._resolve_redirected(parent_sources, position, layer, search, sources)
                break
        if not sources:
            return None
        has_lower = not sources[0].layer.writable or self.lower_positive(parent_sources, name)
        return Resolved(kind, sources, has_lower)

    def _resolve_redirected(
        self,
        queue: Sequence[Source],
        position: int,
        layer: Layer,
        search: _Search,
        sources: list[Source],
    ) -> None:
        """Go on merging a directory below ``layer`` after a redirect (relative: another name
        in the parent's sources; absolute: a path from each lower layer's root)."""
        if search.absolute:
            queue = self._roots_below(layer.index)
            position = 0
        rooted = search.absolute
        while position < len(queue) and not search.stop:
            source = queue[position]
            position += 1
            found = self._find(source.layer, None if search.absolute else source.path, search)
            if found is not None:
                sources.append(found[0])
            if search.absolute and not rooted:
                rooted = True
                queue = self._roots_below(source.layer.index)
                position = 0

    @staticmethod
    def lower_positive(parent_sources: Sequence[Source], name: bytes) -> bool:
        """Does a lower layer show ``name`` in this directory (so removing it needs a
        whiteout)? The first lower layer holding the name or a whiteout of it decides."""
        for source in parent_sources:
            if source.layer.writable:
                continue
            listing = source.layer.listing(source.path)
            if listing is None:
                continue
            if name in listing.entries:
                return True
            if name in listing.whiteouts:
                return False
        return False

    def chain(
        self,
        resolved: Resolved,
        name: bytes,
        metadata: tuple[bool, Redirect | None] | None = None,
    ) -> Chain:
        """Read a non-directory's top entry (unless its ``metadata`` is given, see
        ``file_metadata``) and, when it holds metadata only, find its data below
        (``below`` is then the first entry met on the way)."""
        top = resolved.top
        if metadata is None:
            metadata = self.file_metadata(top.layer, top.path)
        metacopy, redirect = metadata
        if not metacopy:
            return Chain(False, redirect, None, None)
        below, data = self._search_below(
            resolved.parent_sources, resolved.position, top.layer.index, name, redirect,
            metacopy=True,
        )  # fmt: skip
        return Chain(True, redirect, below, data)

    def origin_candidate(
        self, resolved: Resolved, name: bytes, redirect: Redirect | None
    ) -> Source | None:
        """Where a copied-up non-directory came from, by path: the first non-directory below
        it at its name or at its redirect (a completed metadata-only copy keeps its
        redirect, as the kernel leaves it). Only a candidate: its file handle must match."""
        below, _ = self._search_below(
            resolved.parent_sources, resolved.position, resolved.top.layer.index, name,
            redirect, metacopy=False,
        )  # fmt: skip
        return below

    def data_below(
        self, parent_sources: Sequence[Source], name: bytes, redirect: Redirect | None
    ) -> Source | None:
        """The data of a metadata-only file ``name`` (with ``redirect``) kept above this
        whole stack, whose parent directory merges ``parent_sources`` here (offline tools:
        ``unionfs diff`` and ``check`` give an upper's lowers as this stack)."""
        _, data = self._search_below(parent_sources, 0, -1, name, redirect, metacopy=True)
        return data

    def _search_below(
        self,
        queue: Sequence[Source],
        position: int,
        top_index: int,
        name: bytes,
        redirect: Redirect | None,
        *,
        metacopy: bool,
    ) -> tuple[Source | None, Source | None]:
        """Go on with a non-directory's search below its top entry (in layer ``top_index``;
        ``queue[position:]`` are the parent directory's sources below it): (the first entry
        met, the first regular file holding data). ``metacopy``: follow a metadata-only
        chain (each entry's metacopy and redirect xattrs are read); else stop at the first
        entry."""
        search = _Search((name,), metacopy=metacopy, inspect=metacopy)
        if redirect is not None:
            search.follow(redirect, 0)
        if search.absolute:
            queue = self._roots_below(top_index)
            position = 0
        rooted = search.absolute
        below: Source | None = None
        while position < len(queue) and not search.stop:
            source = queue[position]
            position += 1
            found = self._find(source.layer, None if search.absolute else source.path, search)
            if found is not None:
                if not metacopy:
                    return (found[0] if found[1] != stat.S_IFDIR else None), None
                if below is None:
                    below = found[0]
                if not search.metacopy:
                    return below, found[0]
            if search.absolute and not rooted:
                rooted = True
                queue = self._roots_below(source.layer.index)
                position = 0
        if metacopy and search.absolute and not search.stop and self.data_layers:
            return below, self.data_only(search.parts)
        return below, None

    def holds_data(self, source: Source) -> bool:
        """Whether ``source`` (a chain's data) is really there: always for a regular lower;
        for a data-only layer, only a regular file (``data_only`` may name a missing one)."""
        if source.layer not in self.data_layers:
            return True
        st = source.layer.try_lstat(source.path)
        return st is not None and stat.S_ISREG(st.st_mode)

    def data_only(self, path: RelPath) -> Source:
        """The first regular file at ``path`` in the data-only layers. The kernel looks them
        up lazily, at the first open: a file whose data is in none of them still shows, and
        opening (or copying up) it fails with ENOENT. So when none holds it, the answer is
        ``path`` in the first data-only layer, where the open fails just so."""
        for layer in self.data_layers:
            st = layer.try_lstat(path)
            if st is not None and stat.S_ISREG(st.st_mode):
                return Source(layer, path)
        return Source(self.data_layers[0], path)

    def walk(self, path: RelPath) -> list[Source] | None:
        """The merged sources of the directory at ``path`` in this stack's merged namespace
        (None when it is no directory)."""
        sources = self.root_sources()
        for name in path:
            resolved = self.resolve(sources, name)
            if resolved is None or resolved.kind != stat.S_IFDIR:
                return None
            sources = resolved.sources
        return sources

    def list_merged(self, sources: Sequence[Source]) -> list[tuple[bytes, int]]:
        """Visible names of a merged directory (no duplicates, upper first), with types."""
        seen: set[bytes] = set()
        hidden: set[bytes] = set()
        names: list[tuple[bytes, int]] = []
        for source in sources:
            listing = source.layer.listing(source.path)
            if listing is None:
                continue
            for name, kind in listing.entries.items():
                if name in seen or name in hidden:
                    continue
                seen.add(name)
                names.append((name, kind))
            hidden |= listing.whiteouts
        return names

    def is_empty(self, sources: Sequence[Source]) -> bool:
        return not self.list_merged(sources)

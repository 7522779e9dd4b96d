"""Union read rules: resolve a name top->bottom, honour whiteouts, opaque dirs and redirects.

A merged directory is a list of ``Source`` (layer, path in that layer), top first. Looking up a
child walks those sources: the first layer holding the name decides its type; a non-directory
ends the search; a directory continues into lower layers until an opaque directory, a
whiteout, or a non-directory. An ``overlay.redirect`` on a directory sends the search in the
layers below to another path (kernel overlayfs ``redirect_dir`` semantics). Everything here is
synchronous and only reads layers.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass

from unionfs import whiteout
from unionfs.layer import Layer
from unionfs.safeio import RelPath


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

    @property
    def top(self) -> Source:
        return self.sources[0]

    @property
    def in_upper(self) -> bool:
        return self.sources[0].layer.writable


class Stack:
    """The ordered layers (top first: the upper, if any, then lowers top to bottom)."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)
        self.upper: Layer | None = layers[0] if layers and layers[0].writable else None

    def root_sources(self) -> list[Source]:
        """Every layer's root merges (an opaque marker on a layer root is ignored, as the
        kernel does)."""
        return [Source(layer, ()) for layer in self.layers]

    def resolve(self, parent_sources: Sequence[Source], name: bytes) -> Resolved | None:
        """Look ``name`` up in the merged directory made of ``parent_sources``."""
        if whiteout.is_hidden_name(name):
            return None
        search = list(parent_sources)
        sources: list[Source] = []
        kind = 0
        has_lower = False
        lookup_name = name
        absolute_path: RelPath | None = None
        position = 0
        while position < len(search):
            source = search[position]
            position += 1
            layer = source.layer
            if absolute_path is not None:
                path = absolute_path
            else:
                path = (*source.path, lookup_name)
            listing = layer.listing(path[:-1])
            if listing is None:
                continue
            entry_kind = listing.entries.get(path[-1])
            if entry_kind is not None:
                if sources and not layer.writable:
                    has_lower = True
                if not sources:
                    kind = entry_kind
                    sources.append(Source(layer, path))
                    if not layer.writable:
                        has_lower = True
                elif entry_kind == stat.S_IFDIR and kind == stat.S_IFDIR:
                    sources.append(Source(layer, path))
                else:
                    break  # a non-directory below ends the stack
                if kind != stat.S_IFDIR:
                    if layer.writable:
                        has_lower = self._lower_has(search[position:], path[-1], absolute_path)
                    break
                child = layer.listing(path)
                if child is None:
                    break
                if child.opaque:
                    if layer.writable:  # an opaque upper dir may still cover a lower name
                        has_lower = self._lower_has(search[position:], path[-1], absolute_path)
                    break
                if child.redirect is not None:
                    absolute, parts = child.redirect
                    if absolute:
                        absolute_path = parts
                        search = [
                            Source(lower, ()) for lower in self.layers if lower.index > layer.index
                        ]
                        position = 0
                    else:
                        lookup_name = parts[0]
            if path[-1] in listing.whiteouts:
                break
        if not sources:
            return None
        return Resolved(kind, sources, has_lower)

    @staticmethod
    def _lower_has(rest: Sequence[Source], name: bytes, absolute_path: RelPath | None) -> bool:
        for source in rest:
            path = absolute_path if absolute_path is not None else (*source.path, name)
            listing = source.layer.listing(path[:-1])
            if listing is None:
                continue
            if path[-1] in listing.entries:
                return True
            if path[-1] in listing.whiteouts:
                return False
        return False

    def data_source(
        self, parent_lower: Sequence[Source], name: bytes, redirect: RelPath | None
    ) -> Source | None:
        """Where the data of a metadata-only upper file lives: the absolute ``redirect`` path
        in the highest lower layer holding a regular file there, else the same name in the
        parent's lower directories (stopping at a whiteout)."""
        if redirect is not None:
            for layer in self.layers:
                if layer.writable:
                    continue
                listing = layer.listing(redirect[:-1])
                if listing is not None and listing.entries.get(redirect[-1]) == stat.S_IFREG:
                    return Source(layer, redirect)
            return None
        for source in parent_lower:
            path = (*source.path, name)
            listing = source.layer.listing(source.path)
            if listing is None:
                continue
            kind = listing.entries.get(name)
            if kind is not None:
                return Source(source.layer, path) if kind == stat.S_IFREG else None
            if name in listing.whiteouts:
                return None
        return None

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

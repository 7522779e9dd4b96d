"""One layer: a directory tree behind a root fd, read-only (lower) or writable (upper).

A layer caches open directory fds (LRU, bounded) and per-directory listings. Lower layers
are immutable, so their listings are kept until evicted; the mutation code keeps the upper
layer's cached listings exact as it changes them (``note_entry``/``note_whiteout``), and drops
whole subtrees when directories move (``forget_dir``), so a busy directory is never rescanned.
Paths are ``RelPath`` tuples of single components, walked one ``openat`` at a time with
``O_NOFOLLOW`` (see safeio), so a symlink inside a layer can never lead outside it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field

from unionfs import safeio, whiteout
from unionfs.safeio import RelPath

# Budgets of a whole stack, shared out among its layers (Layer.share_budget): a 100-layer stack
# holds no more open directory fds or cached objects than a 2-layer one. Each layer keeps at
# least the MIN_ share (the directories a deep path walk needs stay open).
MAX_CACHED_FDS = 512
MAX_CACHED_LISTINGS = 4096
# Lower layers only (their attributes never change); ~550 bytes each. The kernel caches
# attributes itself, so this only saves the lstat of a repeated lookup: a few thousand suffice.
MAX_CACHED_STATS = 8192
MIN_CACHED_FDS = 64
MIN_CACHED_LISTINGS = 64
MIN_CACHED_STATS = 256


@dataclass(slots=True)
class Listing:
    """What one layer's directory contributes to the merged view."""

    entries: dict[bytes, int] = field(default_factory=dict)  # visible name -> S_IFMT
    whiteouts: set[bytes] = field(default_factory=set)  # names hidden in lower layers
    opaque: bool = False  # lower layers contribute nothing below this directory
    redirect: tuple[bool, RelPath] | None = None  # where lower content of this dir lives


@dataclass(frozen=True, slots=True)
class OverlayXattrs:
    """What a non-directory's overlay xattrs say."""

    metacopy: bool = False  # overlay.metacopy: metadata only, the data is below
    redirect: tuple[bool, RelPath] | None = None  # overlay.redirect, parsed
    origin: bytes | None = None  # overlay.origin: the copy-up origin's file handle record


NO_OVERLAY_XATTRS = OverlayXattrs()


class Layer:
    def __init__(self, path: str, index: int, *, writable: bool) -> None:
        self.path = path
        self.index = index
        self.writable = writable
        self.root_fd = safeio.open_root(path) if writable else safeio.open_lower_root(path)
        self.device = os.fstat(self.root_fd).st_dev
        self._fds: OrderedDict[RelPath, int] = OrderedDict()
        self._listings: OrderedDict[RelPath, Listing] = OrderedDict()
        self._stats: OrderedDict[RelPath, os.stat_result] = OrderedDict()
        self.max_fds = MAX_CACHED_FDS
        self.max_listings = MAX_CACHED_LISTINGS
        self.max_stats = MAX_CACHED_STATS

    def share_budget(self, layer_count: int) -> None:
        """Bound this layer's caches to its share of a stack of ``layer_count`` layers."""
        count = max(1, layer_count)
        self.max_fds = max(MIN_CACHED_FDS, MAX_CACHED_FDS // count)
        self.max_listings = max(MIN_CACHED_LISTINGS, MAX_CACHED_LISTINGS // count)
        self.max_stats = max(MIN_CACHED_STATS, MAX_CACHED_STATS // count)
        for cache, bound in (
            (self._fds, self.max_fds),
            (self._listings, self.max_listings),
            (self._stats, self.max_stats),
        ):
            while len(cache) > bound:
                _, value = cache.popitem(last=False)
                if isinstance(value, int):
                    os.close(value)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root_fd)

    # directory fds -------------------------------------------------------------------
    def dir_fd(self, path: RelPath) -> int:
        """An fd of directory ``path`` (owned by the cache: do not close it)."""
        if not path:
            return self.root_fd
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        parent_fd = self.dir_fd(path[:-1])
        if self.writable:
            fd = safeio.open_dir(parent_fd, path[-1])
        else:  # lower layers are never changed, not even their atimes
            fd = safeio.open_lower_dir(parent_fd, path[-1])
        self._fds[path] = fd
        if len(self._fds) > self.max_fds:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def forget_dir(self, path: RelPath, *, subtree: bool = False) -> None:
        """Drop cached fds and listings of ``path`` (and below it when ``subtree``)."""
        for cache in (self._fds, self._listings):
            if subtree:
                doomed = [key for key in cache if key[: len(path)] == path]
            else:
                doomed = [path] if path in cache else []
            for key in doomed:
                value = cache.pop(key)
                if isinstance(value, int):
                    os.close(value)

    def forget_path(self, path: RelPath, *, subtree: bool) -> None:
        """A lower layer changed at ``path`` under a live mount (unionfs.refresh): drop its
        cached fds, listings and stats (and everything below when ``subtree``)."""
        self.forget_dir(path, subtree=subtree)
        if subtree:
            doomed = [key for key in self._stats if key[: len(path)] == path]
        else:
            doomed = [path] if path in self._stats else []
        for key in doomed:
            del self._stats[key]

    def cached_stat(self, path: RelPath) -> os.stat_result | None:
        """The stat cached for ``path`` (lower layers), None when none is."""
        return self._stats.get(path)

    def note_entry(self, path: RelPath, name: bytes, kind: int | None) -> None:
        """Directory ``path`` now holds ``name`` of type ``kind`` (None: nothing), no whiteout."""
        listing = self._listings.get(path)
        if listing is None:
            return
        if kind is None:
            listing.entries.pop(name, None)
        else:
            listing.entries[name] = kind
        listing.whiteouts.discard(name)

    def note_whiteout(self, path: RelPath, name: bytes) -> None:
        """Directory ``path`` now holds a whiteout for ``name`` (in either format)."""
        listing = self._listings.get(path)
        if listing is None:
            return
        listing.entries.pop(name, None)
        listing.whiteouts.add(name)

    # entries -------------------------------------------------------------------------
    def lstat(self, path: RelPath) -> os.stat_result:
        if not path:
            return os.fstat(self.root_fd)
        if self.writable:
            return safeio.lstat(self.dir_fd(path[:-1]), path[-1])
        cached = self._stats.get(path)
        if cached is not None:
            return cached
        st = safeio.lstat(self.dir_fd(path[:-1]), path[-1])
        self._stats[path] = st
        if len(self._stats) > self.max_stats:
            self._stats.popitem(last=False)
        return st

    def try_lstat(self, path: RelPath) -> os.stat_result | None:
        try:
            return self.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:  # a symlink where a directory was expected
                return None
            raise

    def overlay_file_xattrs(self, path: RelPath) -> OverlayXattrs:
        """The overlay bookkeeping of the non-directory ``path`` (metacopy, redirect,
        origin), read in either the trusted or the user form with one ``listxattr``."""
        parent_fd, name = self.parent_and_name(path)
        attributes = safeio.list_xattrs(parent_fd, name)
        if not attributes:
            return NO_OVERLAY_XATTRS
        metacopy = any(attribute in whiteout.METACOPY_XATTRS for attribute in attributes)
        redirect = origin = None
        for attribute in whiteout.REDIRECT_XATTRS:
            if attribute in attributes:
                redirect = whiteout.parse_redirect(safeio.get_xattr(parent_fd, name, attribute))
                break
        for attribute in whiteout.ORIGIN_XATTRS:
            if attribute in attributes:
                origin = safeio.get_xattr(parent_fd, name, attribute) or None
                break
        return OverlayXattrs(metacopy, redirect, origin)

    def parent_and_name(self, path: RelPath) -> tuple[int, bytes]:
        return self.dir_fd(path[:-1]), path[-1]

    def listing(self, path: RelPath) -> Listing | None:
        """The listing of directory ``path``, None when it is not a directory here."""
        cached = self._listings.get(path)
        if cached is not None:
            self._listings.move_to_end(path)
            return cached
        try:
            fd = self.dir_fd(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            # ELOOP: a symlink where a directory was. EACCES: a directory an unprivileged
            # daemon may not read; its name must still show (the kernel refuses the access
            # itself with default_permissions), see test_user_sees_what_the_kernel_allows.
            if error.errno in (errno.ELOOP, errno.EACCES):
                return None
            raise
        listing = self._read_listing(fd)
        self._listings[path] = listing
        if len(self._listings) > self.max_listings:
            self._listings.popitem(last=False)
        return listing

    def _read_listing(self, fd: int) -> Listing:
        listing = Listing()
        attributes = safeio.list_xattrs(fd, None)
        xattr_whiteouts = False
        for attribute in attributes:
            if attribute in whiteout.OPAQUE_XATTRS:
                value = safeio.fd_get_xattr(fd, attribute)
                if whiteout.opaque_value_means_opaque(value):
                    listing.opaque = True
                elif whiteout.opaque_value_allows_xattr_whiteouts(value):
                    xattr_whiteouts = True
            elif attribute in whiteout.REDIRECT_XATTRS:
                listing.redirect = whiteout.parse_redirect(safeio.fd_get_xattr(fd, attribute))
        for name, kind in safeio.list_dir(fd):
            if name == whiteout.OCI_OPAQUE_MARKER:
                listing.opaque = True
                continue
            target = whiteout.oci_whiteout_target(name)
            if target is not None:
                listing.whiteouts.add(target)
                continue
            if whiteout.is_hidden_name(name):
                continue
            if kind == stat.S_IFCHR:
                st = safeio.try_lstat(fd, name)
                if st is not None and safeio.is_whiteout_device(st):
                    listing.whiteouts.add(name)
                    continue
            if kind == stat.S_IFREG and xattr_whiteouts and self._is_xattr_whiteout(fd, name):
                listing.whiteouts.add(name)
                continue
            listing.entries[name] = kind
        return listing

    @staticmethod
    def _is_xattr_whiteout(fd: int, name: bytes) -> bool:
        st = safeio.try_lstat(fd, name)
        if st is None or st.st_size != 0:
            return False
        return any(
            safeio.get_xattr(fd, name, attr) is not None for attr in whiteout.WHITEOUT_XATTRS
        )

"""What the installed pyfuse3 offers, and the adapter that runs unionfs on stock pyfuse3.

unionfs runs on stock pyfuse3 3.5.0 and, better, on the patched build that ``scripts/setup``
makes (``scripts/pyfuse3/``: version ``3.5.0+unionfs.1``). The patch lists what it adds in
``pyfuse3.UNIONFS_FEATURES``; stock pyfuse3 has no such attribute. Everything here falls back
to stock behaviour, on which the whole test suite passes too.

``UNIONFS_PYFUSE3_DISABLE`` (comma-separated feature names, or ``all``) turns features off on a
patched build: a measuring knob (before/after request counts and daemon CPU on one build), and
how the tests run the stock code paths against the patched library. Besides the library's own
features it knows ``no_opendir``: answer OPENDIR with ENOSYS (the kernel then caches listings
and sends no OPENDIR/RELEASEDIR); without it, opendir asks for ``cache_readdir``.

On stock pyfuse3, unionfs's plain handlers (they answer at once and return a coroutine only
for their slow path) become coroutine functions in ``operations.boundary``, since stock
pyfuse3 awaits every handler; ``adapt_directory_handlers`` gives ``readdir``/``fsyncdir`` the
stock argument lists (no directory inode: the handle's node is used).
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import Any

import pyfuse3

DISABLE_VARIABLE = "UNIONFS_PYFUSE3_DISABLE"
OWN_FEATURES = frozenset({"no_opendir"})  # unionfs's choices that need library features

# FUSE_CAP_* bits of libfuse 3 (fuse_common.h), for Operations.init_want / init_clear
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
FUSE_CAP_POSIX_ACL = 1 << 19
FUSE_CAP_CACHE_SYMLINKS = 1 << 23


def _disabled() -> frozenset[str]:
    value = os.environ.get(DISABLE_VARIABLE, "")
    names = {name.strip() for name in value.split(",") if name.strip()}
    if "all" in names:
        return frozenset({"all"})
    return frozenset(names)


def _available() -> frozenset[str]:
    library: frozenset[str] = frozenset(getattr(pyfuse3, "UNIONFS_FEATURES", ()))
    disabled = _disabled()
    if "all" in disabled:
        return frozenset()
    offered = library - disabled
    own = set()
    if {"dir_inode_arguments", "sync_handlers"} <= offered:
        own.add("no_opendir")
    return offered | (frozenset(own) - disabled)


VERSION: str = pyfuse3.__version__
LIBRARY_FEATURES: frozenset[str] = frozenset(getattr(pyfuse3, "UNIONFS_FEATURES", ()))
PATCHED: bool = bool(LIBRARY_FEATURES)
FEATURES: frozenset[str] = _available()


def has(feature: str) -> bool:
    """Whether the installed pyfuse3 offers ``feature`` (and it is not turned off)."""
    return feature in FEATURES


def describe() -> str:
    """One line for logs and ``unionfs --version``-style reports."""
    build = "patched" if PATCHED else "stock"
    used = ",".join(sorted(FEATURES)) or "none"
    return f"pyfuse3 {VERSION} ({build}; features in use: {used})"


def _as_coroutine_function(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def handler(*args: Any) -> Any:
        result = method(*args)
        if type(result) is types.CoroutineType:
            result = await result
        return result

    return handler


def adapt_directory_handlers(operations: Any) -> None:
    """Give readdir/fsyncdir the stock argument lists (no directory inode: 0, the handle's
    node is used) unless the installed pyfuse3 passes the inode."""
    if has("dir_inode_arguments"):
        operations.dir_inode_arguments = True
        return
    readdir = operations.readdir
    fsyncdir = operations.fsyncdir

    def stock_readdir(fh: int, start_id: int, token: Any) -> Any:
        return readdir(0, fh, start_id, token)

    def stock_fsyncdir(fh: int, datasync: bool) -> Any:
        return fsyncdir(0, fh, datasync)

    operations.readdir = _as_coroutine_function(stock_readdir)
    operations.fsyncdir = _as_coroutine_function(stock_fsyncdir)
    operations.dir_inode_arguments = False

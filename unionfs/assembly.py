"""Opening a union: the one factory that turns a ``MountConfig`` into what serves it.

``open_union(config)`` opens the layers (top first: the upper, then the lowers top to
bottom), the work directory (with its volatile mark), the hard-link index and the merged
tree; ``writers(...)`` adds copy-up and the mutations when the union is writable. The mount
(``unionfs.mount``, through detached clones of the layers' mounts) and ``Operations`` use
them, and so do the in-process tests (tests/inprocess: ``Operations`` without a kernel), so
both run the same union.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from unionfs.config import MountConfig
from unionfs.copyup import CopyUp
from unionfs.index import HardLinkIndex
from unionfs.layer import Layer
from unionfs.mutations import Mutations
from unionfs.tree import MergedTree
from unionfs.workdir import WorkDir


@dataclass
class Union:
    """The open layers of one union: its merged tree and work directory (None: read-only)."""

    tree: MergedTree
    work: WorkDir | None

    def close(self) -> None:
        self.tree.close()
        if self.work is not None:
            self.work.close()


def _same(path: str) -> str:
    return path


def open_union(
    config: MountConfig,
    *,
    upper_and_work: Callable[[str, str], tuple[str, str]] | None = None,
    lower_path: Callable[[str], str] = _same,
) -> Union:
    """Open every layer of ``config``. ``upper_and_work`` and ``lower_path`` give the path to
    open for a configured one (the mount opens layers through detached clones of their
    mounts); each layer keeps the configured path for ``status`` and ``which``."""
    layers: list[Layer] = []
    data_layers: list[Layer] = []
    upper_path, work_path = config.upper, config.workdir
    if upper_and_work is not None and upper_path is not None and work_path is not None:
        upper_path, work_path = upper_and_work(upper_path, work_path)
    try:
        if config.upper is not None and upper_path is not None:
            layers.append(_layer(upper_path, config.upper, len(layers), config.writable))
        for path in reversed(config.lowers):
            layers.append(_layer(lower_path(path), path, len(layers), False))
        # data-only lower layers: they hold metadata-only copies' data and are never listed
        for path in config.data_layers:
            data_layers.append(
                _layer(lower_path(path), path, len(layers) + len(data_layers), False)
            )
        work = None
        if config.upper is not None and work_path is not None and config.writable:
            work = WorkDir(work_path, layers[0].device, userxattr=config.userxattr)
            work.path = config.workdir or work_path
            if config.volatile:
                work.mark_volatile(os.path.realpath(config.mountpoint))
    except BaseException:
        for layer in layers + data_layers:
            layer.close()
        raise
    if config.upper is not None and not config.writable:
        layers[0].writable = False
    tree = MergedTree(layers, data_layers)
    if work is not None and work.index_fd is not None and config.index:
        tree.index = HardLinkIndex(os.dup(work.index_fd), work.xattr_prefix)
    return Union(tree, work)


def _layer(open_path: str, shown_path: str, index: int, writable: bool) -> Layer:
    layer = Layer(open_path, index, writable=writable)
    layer.path = shown_path  # what status and which show: the user's path, not the clone's
    return layer


def writers(
    union: Union,
    config: MountConfig,
    run_in_thread: Callable[[Callable[[], int]], Awaitable[int]],
) -> tuple[CopyUp, Mutations] | None:
    """Copy-up and the mutations of a writable union (None: read-only). ``run_in_thread``
    runs a long copy off the request loop."""
    tree, work = union.tree, union.work
    if tree.upper is None or work is None or not config.writable:
        return None
    copyup = CopyUp(tree, tree.upper, work, run_in_thread, metacopy=config.metacopy)
    mutations = Mutations(
        tree,
        tree.upper,
        work,
        copyup,
        oci_whiteouts=config.whiteout_format == "oci",
        redirect_dir=config.redirect_dir,
    )
    return copyup, mutations

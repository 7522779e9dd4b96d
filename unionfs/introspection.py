"""Live introspection of a mount through virtual xattrs (no files, works unprivileged).

``user.unionfs.status`` on the mount root answers a JSON document (pid, layers, upper,
counters); ``user.unionfs.origin`` on any entry says which layer its top object comes from.
Neither is listed by listxattr nor settable. ``unionfs status`` and ``unionfs which`` read them.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Protocol

from unionfs import compiled
from unionfs.config import MountConfig
from unionfs.copyup import CopyUp
from unionfs.handles import HandleTable
from unionfs.inodes import Node
from unionfs.mutations import Mutations
from unionfs.quota import Quota
from unionfs.refresh import Refresher
from unionfs.tree import MergedTree
from unionfs.watch import Watcher


class Operations(Protocol):
    """What introspection reads of the FUSE adapter (kept abstract: imports point down)."""

    config: MountConfig
    copyup: CopyUp | None
    mutations: Mutations | None
    tree: MergedTree
    handles: HandleTable
    quota: Quota | None
    refresher: Refresher
    watcher: Watcher | None


PREFIX = "user.unionfs."
STATUS = PREFIX + "status"
ORIGIN = PREFIX + "origin"
# getxattr of this name on an entry of the mount drops every cached view of it (and below
# it) after its lower layers changed: ``unionfs refresh`` (see operations.refresh_caches)
REFRESH = PREFIX + "refresh"


def status_document(operations: Operations) -> dict[str, Any]:
    config = operations.config
    copyup = operations.copyup
    mutations = operations.mutations
    return {
        "pid": os.getpid(),
        "mountpoint": os.path.abspath(config.mountpoint),
        "lowers": [os.path.abspath(layer) for layer in config.lowers],
        "data_layers": [os.path.abspath(layer) for layer in config.data_layers],
        "upper": os.path.abspath(config.upper) if config.upper else None,
        "workdir": os.path.abspath(config.workdir) if config.workdir else None,
        "writable": config.writable,
        "whiteout_format": config.whiteout_format,
        "copy_ups": copyup.copies if copyup else 0,
        "bytes_copied": copyup.bytes_copied if copyup else 0,
        "whiteouts": mutations.whiteouts_made if mutations else 0,
        "nodes": len(operations.tree.inodes.nodes),
        "open_files": len(operations.handles.files),
        "quota": operations.quota.document() if operations.quota is not None else None,
        "refreshes": operations.refresher.refreshes,
        "invalidations": operations.refresher.invalidations,
        "watched": len(operations.watcher.watched) if operations.watcher is not None else None,
        "watch_limited": operations.watcher.limited if operations.watcher is not None else False,
        # Which build of the hot modules this daemon runs (unionfs/compiled.py).
        "build": compiled.build,
        "modules": compiled.running(),
    }


def origin_document(operations: Operations, node: Node) -> dict[str, Any]:
    if node.in_upper and operations.tree.upper is not None and (node.is_dir or node.upper_link()):
        layer, path = operations.tree.upper, operations.tree.upper_path(node)
    elif node.lower:
        layer, path = node.lower[0].layer, node.lower[0].path
    else:
        raise OSError(errno.ENOENT, "no layer holds this entry any more")
    return {
        "layer": os.path.abspath(layer.path),
        "upper": layer.writable,
        "path": "/" + "/".join(os.fsdecode(part) for part in path),
        "layers": [os.path.abspath(source.layer.path) for source in node.lower]
        if node.is_dir
        else None,
    }


def answer(operations: Operations, node: Node, attribute: str) -> bytes:
    if attribute == STATUS and node.ino == operations.tree.root.ino:
        document = status_document(operations)
    elif attribute == ORIGIN:
        document = origin_document(operations, node)
    else:
        raise OSError(errno.ENODATA, "no such attribute")
    return json.dumps(document).encode()

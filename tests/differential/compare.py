"""How two views of a union are compared, and the explicit list of what is not compared.

`compare_views(expected, got)` is the single comparison every differential test uses: every field
of `tests.support.tree.Entry`, mtimes of non-directories (exactly when either side is older than
`GENERATED_MTIME_LIMIT_NS`, i.e. set on purpose; see `diff_snapshots`), hard-link grouping, and the
mount root's own mode/owner/xattrs. `ALLOWED_DIFFERENCES` is everything deliberately left out,
each with its reason; nothing else may differ.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.differential.layers import GENERATED_MTIME_LIMIT_NS
from tests.support.tree import (
    Entry,
    Snapshot,
    diff_link_groups,
    diff_snapshots,
    root_entry,
    snapshot,
)

#: Only host-set (LSM) xattrs are ignored when reading through a mount: a private overlay xattr
#: (`trusted.overlay.*`, `user.overlay.*`) showing up through a mount is a difference.
MOUNT_EXCLUDED_XATTRS = (b"security.",)

#: What is deliberately not compared, and why. Nothing else may differ.
ALLOWED_DIFFERENCES: dict[str, str] = {
    "st_ino and st_dev values": (
        "each filesystem numbers inodes its own way (kernel overlayfs passes through the lower "
        "inode number, a FUSE filesystem chooses its own); what must match is which paths are the "
        "same file, so hard-link grouping is compared instead"
    ),
    "st_size of directories": "a directory's size is filesystem-specific (ext4 blocks vs FUSE)",
    "st_nlink of directories": (
        "kernel overlayfs reports 1 for merged directories; a directory's link count is not "
        "meaningful across union implementations"
    ),
    "atime and ctime": (
        "set by the clock at the moment of each access/change, which differs between two mounts "
        "run one after the other; lower layers' own times are checked by lower_fingerprint"
    ),
    "mtime of directories": (
        "every create/unlink in a directory sets it to now, and kernel overlayfs also changes "
        "parent mtimes when it copies up or writes whiteouts in ways that are not POSIX-visible "
        "semantics; file mtimes (incl. their preservation by copy-up) are compared"
    ),
    "mtime after an empty write into a metadata-only copy (not generated)": (
        "kernel overlayfs copies the data of a metadata-only file up when it is opened for "
        "writing and leaves the mtime at that moment even if nothing is written; unionfs keeps "
        "it (nothing changed); the random sequences write at least one byte (README)"
    ),
    "renaming a directory that exists in a lower layer": (
        "unionfs always allows it (no EXDEV); the kernel oracle runs with redirect_dir=on, which "
        "allows it too, so no difference is expected or tolerated"
    ),
}


def view_of(mountpoint: Path | str) -> tuple[Snapshot, Entry]:
    """Snapshot of a mounted tree and of its root directory."""
    return (
        snapshot(mountpoint, excluded_xattr_prefixes=MOUNT_EXCLUDED_XATTRS),
        root_entry(mountpoint, excluded_xattr_prefixes=MOUNT_EXCLUDED_XATTRS),
    )


def compare_views(
    expected: tuple[Snapshot, Entry],
    got: tuple[Snapshot, Entry],
    names: tuple[str, str] = ("kernel", "sut"),
) -> list[str]:
    """Readable differences (empty: same view), honouring exactly `ALLOWED_DIFFERENCES`."""
    (expected_tree, expected_root), (got_tree, got_root) = expected, got
    problems = diff_snapshots(
        expected_tree, got_tree, names=names, mtime_since_ns=GENERATED_MTIME_LIMIT_NS
    )
    problems += diff_link_groups(expected_tree, got_tree, names=names)
    root_problems = diff_snapshots({os.curdir: expected_root}, {os.curdir: got_root}, names=names)
    problems += [f"(mount root) {line}" for line in root_problems]
    return problems

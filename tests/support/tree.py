"""Snapshots of directory trees, for comparing what two mounts (or two layer dirs) show.

`snapshot(root)` walks a tree with `os.scandir`/`os.lstat` and never follows a symlink: a symlink in
a layer (absolute, `../..`, a loop) is recorded as data (its target), never walked through. Every
path is recorded relative to `root` as a `str` (non-UTF-8 bytes kept via surrogateescape).

An `Entry` holds what must match between two views of the same union: type, full mode, owner,
size and sha256 of regular files, symlink targets, rdev of devices, xattrs (minus the private ones
of overlay implementations and `security.*`), nlink of non-directories, and mtime (compared only
on request; see `diff_snapshots`). Inode numbers are never compared directly; `link_groups` turns
them into "which paths are the same file", which is what must match.

`lower_fingerprint(layer_dirs)` is stricter: it keeps every xattr (including `trusted.*`), mtime and
ctime of every entry of every layer, so a test can assert that lower layers never change.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = [
    "DEFAULT_EXCLUDED_XATTR_PREFIXES",
    "Entry",
    "Snapshot",
    "assert_same_tree",
    "diff_fingerprints",
    "diff_link_groups",
    "diff_snapshots",
    "link_groups",
    "lower_fingerprint",
    "snapshot",
]

#: Xattr name prefixes that are implementation-private (overlay markers) or set by the host (LSMs).
DEFAULT_EXCLUDED_XATTR_PREFIXES: tuple[bytes, ...] = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"user.fuseoverlayfs.",
    b"security.",
)

_TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


def type_name(mode: int) -> str:
    return _TYPE_NAMES.get(stat.S_IFMT(mode), f"unknown({stat.S_IFMT(mode):o})")


@dataclass(frozen=True)
class Entry:
    """What one path looks like. `None` means "not applicable to this type"."""

    type: str
    mode: int  # full st_mode: type bits + permission bits (incl. setuid/setgid/sticky)
    uid: int
    gid: int
    size: int | None = None  # regular files and symlinks
    sha256: str | None = None  # regular files
    target: bytes | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # char/block devices: (major, minor)
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    nlink: int | None = None  # non-directories only
    mtime_ns: int = field(default=0, compare=False)  # compared only on request
    ino: tuple[int, int] = field(default=(0, 0), compare=False, repr=False)  # (st_dev, st_ino)

    def describe(self) -> str:
        parts = [self.type, f"mode={self.mode:o}", f"owner={self.uid}:{self.gid}"]
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.sha256 is not None:
            parts.append(f"sha256={self.sha256[:12]}")
        if self.target is not None:
            parts.append(f"target={self.target!r}")
        if self.rdev is not None:
            parts.append(f"rdev={self.rdev[0]}:{self.rdev[1]}")
        if self.nlink is not None:
            parts.append(f"nlink={self.nlink}")
        if self.xattrs:
            parts.append(
                "xattrs=" + ",".join(f"{k.decode(errors='replace')}" for k, _ in self.xattrs)
            )
        return " ".join(parts)


Snapshot = dict[str, Entry]


def _xattrs(path: str, is_link: bool, excluded: Sequence[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=not is_link)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    result = []
    for name in names:
        raw = os.fsencode(name)
        if any(raw.startswith(prefix) for prefix in excluded):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=not is_link)
        except OSError as error:
            if error.errno == errno.ENODATA:  # removed between list and get
                continue
            raise
        result.append((raw, value))
    return tuple(sorted(result))


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _entry(path: str, st: os.stat_result, excluded: Sequence[bytes]) -> Entry:
    kind = type_name(st.st_mode)
    is_dir = stat.S_ISDIR(st.st_mode)
    is_link = stat.S_ISLNK(st.st_mode)
    return Entry(
        type=kind,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if (stat.S_ISREG(st.st_mode) or is_link) else None,
        sha256=_sha256_of(path) if stat.S_ISREG(st.st_mode) else None,
        target=os.fsencode(os.readlink(path)) if is_link else None,
        rdev=(
            (os.major(st.st_rdev), os.minor(st.st_rdev))
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else None
        ),
        xattrs=_xattrs(path, is_link, excluded),
        nlink=None if is_dir else st.st_nlink,
        mtime_ns=st.st_mtime_ns,
        ino=(st.st_dev, st.st_ino),
    )


def _walk(
    root: str, *, tolerate_errors: bool = False
) -> Iterable[tuple[str, str, os.stat_result | OSError]]:
    """Yield (relative path, absolute path, lstat) depth first, sorted, never following links.

    With `tolerate_errors`, an entry that cannot be stat'ed (or a directory that cannot be
    listed) is yielded with the OSError instead of its lstat, and the walk goes on.
    """
    stack = [""]
    while stack:
        relative_dir = stack.pop()
        absolute_dir = os.path.join(root, relative_dir) if relative_dir else root
        try:
            with os.scandir(absolute_dir) as iterator:
                entries = sorted(iterator, key=lambda item: item.name)
        except OSError as error:
            if not tolerate_errors or not relative_dir:
                raise
            yield relative_dir + "/(listing)", absolute_dir, error
            continue
        for item in entries:
            relative = os.path.join(relative_dir, item.name) if relative_dir else item.name
            try:
                st = item.stat(follow_symlinks=False)
            except OSError as error:
                if not tolerate_errors:
                    raise
                yield relative, item.path, error
                continue
            yield relative, item.path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(relative)


def _error_entry(error: OSError, path: str) -> Entry:
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    # A unique fake inode, so that unreadable entries are never grouped as hard links.
    return Entry(type=f"error({name})", mode=0, uid=-1, gid=-1, ino=(-1, hash(path)))


def snapshot(
    root: Path | str,
    *,
    excluded_xattr_prefixes: Sequence[bytes] = DEFAULT_EXCLUDED_XATTR_PREFIXES,
) -> Snapshot:
    """Map every path below `root` (relative, `root` itself excluded) to its `Entry`.

    An entry that cannot be read (stat, listing, content or xattrs fail) is recorded as an
    `Entry` of type `error(ENAME)`, so that it shows up as a readable difference.
    """
    root_str = os.fspath(root)
    result: Snapshot = {}
    for relative, absolute, st in _walk(root_str, tolerate_errors=True):
        if isinstance(st, OSError):
            result[relative] = _error_entry(st, relative)
            continue
        try:
            result[relative] = _entry(absolute, st, excluded_xattr_prefixes)
        except OSError as error:
            result[relative] = _error_entry(error, relative)
    return result


def root_entry(
    root: Path | str,
    *,
    excluded_xattr_prefixes: Sequence[bytes] = DEFAULT_EXCLUDED_XATTR_PREFIXES,
) -> Entry:
    """The `Entry` of the root directory itself (mode, owner, xattrs)."""
    root_str = os.fspath(root)
    return _entry(root_str, os.lstat(root_str), excluded_xattr_prefixes)


def link_groups(tree: Snapshot | Path | str) -> set[frozenset[str]]:
    """Groups (size >= 2) of non-directory paths that are the same file (same st_dev, st_ino).

    Accepts a snapshot (uses the inode numbers recorded in it) or a directory to walk.
    """
    entries = tree if isinstance(tree, Mapping) else snapshot(tree)
    by_inode: dict[tuple[int, int], set[str]] = {}
    for path, entry in entries.items():
        if entry.type == "dir":
            continue
        by_inode.setdefault(entry.ino, set()).add(path)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def _field_diffs(a: Entry, b: Entry, ignore: frozenset[str]) -> list[str]:
    out = []
    for item in fields(Entry):
        if not item.compare or item.name in ignore:
            continue
        left, right = getattr(a, item.name), getattr(b, item.name)
        if left != right:
            if item.name == "mode":
                out.append(f"mode {left:o} != {right:o}")
            elif item.name == "xattrs":
                out.append(f"xattrs {dict(left)!r} != {dict(right)!r}")
            else:
                out.append(f"{item.name} {left!r} != {right!r}")
    return out


def diff_snapshots(
    a: Snapshot,
    b: Snapshot,
    *,
    names: tuple[str, str] = ("a", "b"),
    ignore: Iterable[str] = (),
    mtime_since_ns: int | None = None,
    compare_dir_mtime: bool = False,
) -> list[str]:
    """Readable differences between two snapshots (empty list: same tree).

    `ignore`: Entry field names not to compare (e.g. {"nlink"}).
    `mtime_since_ns`: when given, also compare mtimes of non-directories (and of directories if
    `compare_dir_mtime`): an mtime older than this instant was set deliberately (by the layer
    generator, by copy-up preserving it, or by an explicit utime) and must match exactly; a newer
    one comes from "now" at the time of some write, so it only has to be newer on both sides.
    """
    left_name, right_name = names
    ignored = frozenset(ignore)
    out: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        left, right = a.get(path), b.get(path)
        if left is None:
            assert right is not None
            out.append(f"{path}: only in {right_name} ({right.describe()})")
            continue
        if right is None:
            out.append(f"{path}: only in {left_name} ({left.describe()})")
            continue
        if left.type != right.type:
            out.append(
                f"{path}: type {left.type} in {left_name} != {right.type} in {right_name} "
                f"({left.describe()} | {right.describe()})"
            )
            continue
        problems = _field_diffs(left, right, ignored)
        if mtime_since_ns is not None and (left.type != "dir" or compare_dir_mtime):
            left_old = left.mtime_ns < mtime_since_ns
            right_old = right.mtime_ns < mtime_since_ns
            if (left_old or right_old) and left.mtime_ns != right.mtime_ns:
                problems.append(f"mtime_ns {left.mtime_ns} != {right.mtime_ns}")
        if problems:
            out.append(f"{path}: " + "; ".join(problems) + f"  [{left_name} != {right_name}]")
    return out


def diff_link_groups(
    a: Snapshot | set[frozenset[str]],
    b: Snapshot | set[frozenset[str]],
    *,
    names: tuple[str, str] = ("a", "b"),
) -> list[str]:
    """Differences in hard-link structure (which paths are the same file)."""
    left = a if isinstance(a, set) else link_groups(a)
    right = b if isinstance(b, set) else link_groups(b)
    out = []
    for group in sorted(left - right, key=sorted):
        out.append(f"hard links {sorted(group)} only in {names[0]}")
    for group in sorted(right - left, key=sorted):
        out.append(f"hard links {sorted(group)} only in {names[1]}")
    return out


def assert_same_tree(
    a: Snapshot, b: Snapshot, *, names: tuple[str, str] = ("a", "b"), **kwargs: object
) -> None:
    problems = diff_snapshots(a, b, names=names, **kwargs)  # type: ignore[arg-type]
    problems += diff_link_groups(a, b, names=names)
    assert not problems, "trees differ:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- lower fingerprints


@dataclass(frozen=True)
class FingerprintEntry:
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    ino: int
    sha256: str | None
    target: bytes | None
    rdev: int
    xattrs: tuple[tuple[bytes, bytes], ...]


Fingerprint = dict[str, dict[str, FingerprintEntry]]


def _fingerprint_sha256(path: str) -> str:
    digest = hashlib.sha256()
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_NOATIME)  # do not disturb atime either
    except PermissionError:
        fd = os.open(path, flags)
    try:
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _fingerprint_entry(path: str, st: os.stat_result) -> FingerprintEntry:
    is_link = stat.S_ISLNK(st.st_mode)
    return FingerprintEntry(
        type=type_name(st.st_mode),
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        nlink=st.st_nlink,
        ino=st.st_ino,
        sha256=_fingerprint_sha256(path) if stat.S_ISREG(st.st_mode) else None,
        target=os.fsencode(os.readlink(path)) if is_link else None,
        rdev=st.st_rdev,
        xattrs=_xattrs(path, is_link, excluded=()),
    )


def lower_fingerprint(layer_dirs: Iterable[Path | str]) -> Fingerprint:
    """Everything about the given layer directories that a union mount must never change.

    Content hashes, type, mode, owner, size, mtime and ctime (ctime catches any metadata change even
    if it was undone), nlink, inode numbers, symlink targets, rdev, and *all* xattrs including
    `trusted.*` and `security.*`, for every entry and for each layer root itself. Files are read
    with O_NOATIME where allowed so that fingerprinting does not itself change the layer.
    """
    result: Fingerprint = {}
    for layer in layer_dirs:
        layer_str = os.fspath(layer)
        entries = {".": _fingerprint_entry(layer_str, os.lstat(layer_str))}
        for relative, absolute, st in _walk(layer_str):
            assert not isinstance(st, OSError)
            entries[relative] = _fingerprint_entry(absolute, st)
        result[layer_str] = entries
    return result


def diff_fingerprints(before: Fingerprint, after: Fingerprint) -> list[str]:
    """Readable differences between two `lower_fingerprint` results (empty: nothing changed)."""
    out: list[str] = []
    for layer in sorted(before.keys() | after.keys()):
        left, right = before.get(layer, {}), after.get(layer, {})
        for path in sorted(left.keys() | right.keys()):
            old, new = left.get(path), right.get(path)
            if old is None:
                out.append(f"{layer}: {path} appeared")
            elif new is None:
                out.append(f"{layer}: {path} disappeared")
            elif old != new:
                changed = [
                    f"{item.name} {getattr(old, item.name)!r} -> {getattr(new, item.name)!r}"
                    for item in fields(FingerprintEntry)
                    if getattr(old, item.name) != getattr(new, item.name)
                ]
                out.append(f"{layer}: {path}: " + "; ".join(changed))
    return out

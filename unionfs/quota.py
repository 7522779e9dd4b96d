"""The upper layer's quota (``-o quota=SIZE,quota_inodes=N``): limit, usage, the record.

Usage is what the upper layer holds: the sum of ``st_blocks * 512`` and the number of inodes
(files, directories, symlinks, devices, whiteouts; a hard-linked inode counts once; the upper's
root does not count). A mount computes it once with a walk of the upper (dirfd-relative,
``O_NOFOLLOW``, bounded in depth), then keeps it as it changes the upper:

- before anything lands, ``require`` refuses (EDQUOT) what would pass the limit: a write
  whose new blocks would not fit is refused whole (``write_need``), a copy-up whose data and
  inode would not fit is refused before its first byte is written, as are a new file,
  directory, symlink, device or hard link when no inode is left;
- after the change, the real difference is measured (``fstat``/``lstat`` before and after)
  and charged, so usage never drifts from what the filesystem allocated for what we did;
- removals (unlink, rmdir, rename over a file) are credited; whiteouts are counted but never
  refused: deleting must work at the limit.

The record ``WORKDIR/unionfs-quota`` (JSON: limits and the usage at the last mount or
unmount) keeps the limit across remounts; ``unionfs check`` compares its usage with a walk
and rewrites a stale one. This module only makes syscalls on the upper through fds the
caller gives it (and ``safeio``); it knows nothing of FUSE.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from unionfs import safeio
from unionfs.safeio import RelPath

RECORD_NAME = b"unionfs-quota"
MAX_DEPTH = 4096
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class QuotaError(ValueError):
    pass


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``100k``, ``4096`` (binary units, an optional trailing ``B``/``iB``)."""
    value = text.strip().lower()
    for suffix in ("ib", "b"):
        if value.endswith(suffix) and len(value) > len(suffix):
            value = value[: -len(suffix)]
            break
    unit = value[-1:] if value[-1:] in UNITS and value[-1:] else ""
    number = value[: len(value) - len(unit)]
    try:
        amount = float(number)
    except ValueError:
        raise QuotaError(f"bad size {text!r} (want a number with K, M, G or T)") from None
    if not 0 < amount < 1 << 62 or amount * UNITS[unit] >= 1 << 62:
        raise QuotaError(f"size {text!r} is out of range")
    return int(amount * UNITS[unit])


@dataclass
class Usage:
    bytes: int = 0
    inodes: int = 0


def _charge(st: os.stat_result) -> Usage:
    return Usage(st.st_blocks * 512, 1)


def walk_usage(root_fd: int) -> Usage:
    """What the upper behind ``root_fd`` holds (its root excluded). Iterative, one fd per
    level at most, never following a symlink; hard-linked inodes count once."""
    usage = Usage()
    seen_links: set[int] = set()
    stack: list[tuple[int, list[tuple[bytes, int]], bool]] = [
        (root_fd, safeio.list_dir(root_fd), False)
    ]
    try:
        while stack:
            fd, entries, owned = stack[-1]
            if not entries:
                stack.pop()
                if owned:
                    os.close(fd)
                continue
            name, _kind = entries.pop()
            st = safeio.try_lstat(fd, name)
            if st is None:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if st.st_ino in seen_links:
                    continue
                seen_links.add(st.st_ino)
            usage.bytes += st.st_blocks * 512
            usage.inodes += 1
            if stat.S_ISDIR(st.st_mode) and len(stack) < MAX_DEPTH:
                try:
                    child = safeio.open_dir(fd, name)
                except OSError:
                    continue
                try:
                    stack.append((child, safeio.list_dir(child), True))
                except OSError:
                    os.close(child)
    finally:
        for fd, _entries, owned in stack:
            if owned:
                os.close(fd)
    return usage


def read_record(base_fd: int) -> dict[str, int | None] | None:
    """The record in the workdir behind ``base_fd`` (None when there is none)."""
    try:
        fd = safeio.open_file(base_fd, RECORD_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        document = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(document, dict):
        return {}
    return {
        key: value if isinstance(value, int) else None
        for key, value in document.items()
        if key in ("limit_bytes", "limit_inodes", "used_bytes", "used_inodes")
    }


def write_record(base_fd: int, record: dict[str, int | None]) -> None:
    """Replace the record atomically (a temp file renamed over it)."""
    temp = RECORD_NAME + b".tmp"
    fd = safeio.open_file(base_fd, temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
    finally:
        os.close(fd)
    safeio.renameat2(base_fd, temp, base_fd, RECORD_NAME)


def remove_record(base_fd: int) -> None:
    try:
        safeio.unlink(base_fd, RECORD_NAME)
    except FileNotFoundError:
        pass


def _round_up(value: int, block: int) -> int:
    return -(-value // block) * block


def write_need(st: os.stat_result, offset: int, length: int) -> int:
    """Bytes a write of ``length`` at ``offset`` may newly allocate in the file ``st``: the
    blocks of the range beyond the allocated end, or (a sparse file: it may hit holes) every
    block of the range."""
    if length <= 0:
        return 0
    block = st.st_blksize or 4096
    start = offset - offset % block
    end = _round_up(offset + length, block)
    allocated_end = _round_up(st.st_size, block)
    if st.st_blocks * 512 >= allocated_end:  # dense: no holes below the end
        return max(0, end - max(start, allocated_end))
    return end - start


class Quota:
    """The limit and usage of one mount's upper (see the module docstring)."""

    def __init__(
        self, limit_bytes: int | None, limit_inodes: int | None, usage: Usage, base_fd: int
    ) -> None:
        self.limit_bytes = limit_bytes
        self.limit_inodes = limit_inodes
        self.used = usage
        self.base_fd = base_fd  # the workdir (for the record); owned by this object
        self.refused = 0  # requests answered EDQUOT
        self.block = 4096  # what a new directory (or long symlink) may take: st_blksize
        # inodes copy-ups charged during this namespace change -> the bytes charged for them
        self.fresh: dict[int, int] = {}

    @classmethod
    def open(
        cls,
        workdir: str,
        upper_root_fd: int,
        limit_bytes: int | None,
        limit_inodes: int | None,
        *,
        remove: bool = False,
    ) -> Quota | None:
        """The quota a mount of this upper has: the limits given (they replace the record's),
        else the record's; None when there is none. ``remove``: forget the record."""
        base_fd = safeio.open_root(workdir)
        try:
            if remove:
                remove_record(base_fd)
                os.close(base_fd)
                return None
            record = read_record(base_fd) or {}
            if limit_bytes is None and limit_inodes is None:
                limit_bytes = record.get("limit_bytes")
                limit_inodes = record.get("limit_inodes")
            if limit_bytes is None and limit_inodes is None:
                os.close(base_fd)
                return None
            quota = cls(limit_bytes, limit_inodes, walk_usage(upper_root_fd), base_fd)
            quota.block = os.fstat(upper_root_fd).st_blksize or 4096
            quota.save()
        except BaseException:
            os.close(base_fd)
            raise
        return quota

    def record(self) -> dict[str, int | None]:
        return {
            "limit_bytes": self.limit_bytes,
            "limit_inodes": self.limit_inodes,
            "used_bytes": self.used.bytes,
            "used_inodes": self.used.inodes,
        }

    def save(self) -> None:
        write_record(self.base_fd, self.record())

    def close(self) -> None:
        """Write the final usage and let go of the workdir."""
        try:
            self.save()
        finally:
            os.close(self.base_fd)

    # checks ------------------------------------------------------------------------------
    def require(self, need_bytes: int, need_inodes: int) -> None:
        """Refuse (EDQUOT) when ``need_*`` more would pass a limit; nothing is charged."""
        over_bytes = (
            need_bytes > 0
            and self.limit_bytes is not None
            and self.used.bytes + need_bytes > self.limit_bytes
        )
        over_inodes = (
            need_inodes > 0
            and self.limit_inodes is not None
            and self.used.inodes + need_inodes > self.limit_inodes
        )
        if over_bytes or over_inodes:
            self.refused += 1
            what = "bytes" if over_bytes else "inodes"
            raise OSError(errno.EDQUOT, f"quota of the upper layer reached ({what})")

    def add(self, delta_bytes: int, delta_inodes: int = 0) -> None:
        self.used.bytes = max(0, self.used.bytes + delta_bytes)
        self.used.inodes = max(0, self.used.inodes + delta_inodes)

    # data ---------------------------------------------------------------------------------
    def write(self, fd: int, data: bytes, offset: int) -> int:
        """``pwrite`` refused whole when its new blocks would pass the limit, then charged."""
        before = os.fstat(fd)
        self.require(write_need(before, offset, len(data)), 0)
        written = os.pwrite(fd, data, offset)
        self.add((os.fstat(fd).st_blocks - before.st_blocks) * 512)
        return written

    def before_data_change(self, fd: int, offset: int, length: int, *, grows: bool) -> int:
        """Before a truncate or fallocate of ``fd``: refuse what cannot fit; the blocks now."""
        before = os.fstat(fd)
        if grows:
            self.require(write_need(before, offset, length), 0)
        return int(before.st_blocks)

    def after_data_change(self, fd: int, blocks_before: int) -> None:
        self.add((os.fstat(fd).st_blocks - blocks_before) * 512)

    # namespace ----------------------------------------------------------------------------
    def snapshot(self, upper_lstat: Iterable[os.stat_result | None]) -> dict[int, os.stat_result]:
        """The upper objects at some names (by inode), before or after a namespace change."""
        return {st.st_ino: st for st in upper_lstat if st is not None}

    def begin(self, upper_lstat: Iterable[os.stat_result | None]) -> dict[int, os.stat_result]:
        """``snapshot`` before a namespace change (copy-ups from now on are charged apart)."""
        self.fresh.clear()
        return self.snapshot(upper_lstat)

    def settle(self, before: dict[int, os.stat_result], after: dict[int, os.stat_result]) -> None:
        """Charge what appeared at the names, credit what went with its last name, and charge
        what an object that stayed (or was copied up meanwhile) grew or shrank by (an xattr
        such as a redirect may take a block of its own)."""
        for ino, st in after.items():
            now = st.st_blocks * 512
            if ino in self.fresh:
                self.add(now - self.fresh[ino])
            elif ino in before:
                self.add(now - before[ino].st_blocks * 512)
            else:
                self.add(now, 1)
        for ino, st in before.items():
            if ino not in after and (st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode)):
                self.add(-st.st_blocks * 512, -1)

    def charge_new(self, dir_fd: int, name: bytes) -> None:
        """An object a copy-up just placed at ``name`` in ``dir_fd``."""
        st = safeio.try_lstat(dir_fd, name)
        if st is not None:
            self.add(st.st_blocks * 512, 1)
            self.fresh[st.st_ino] = st.st_blocks * 512

    def document(self) -> dict[str, int | None]:
        return {**self.record(), "refused": self.refused}


def lstat_upper(
    upper_lstat: Callable[[RelPath], os.stat_result | None], paths: Iterable[RelPath]
) -> list[os.stat_result | None]:
    """``upper_lstat`` (a Layer's ``try_lstat``) of each path; missing parents count as none."""
    results: list[os.stat_result | None] = []
    for path in paths:
        try:
            results.append(upper_lstat(path))
        except OSError:
            results.append(None)
    return results

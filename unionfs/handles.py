"""Open file fds and directory snapshots, by handle number.

A file handle remembers the node's copy-up generation: when the node is copied up while the
handle is open (by another writer), the next read reopens the upper copy, so a reader never
keeps seeing stale lower data. A directory handle holds a snapshot of the merged listing,
taken at opendir and again on rewind, so offsets stay stable while entries come and go.

Without OPENDIR (the patched pyfuse3: the kernel opens directories itself, caches their
listings and sends READDIR with the directory's inode and no handle) ``Listings`` keeps the
snapshots instead: offset 0 takes a new one, and every offset handed out names its snapshot
(``SNAPSHOT_BITS`` high bits: the snapshot's generation; low bits: the position), so a
listing read in several requests, or by several readers at once, never skips or repeats an
entry while others change the directory. Offsets stay below 2**31 (32-bit ``getdents`` and
``telldir`` keep working). Snapshots are dropped when the reader asks past their last entry (the
kernel has the listing by then) and are bounded in number (least recently used first);
a READDIR naming a dropped snapshot is answered from a fresh one at the same position.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from dataclasses import dataclass, field

from unionfs.inodes import Node


@dataclass(eq=False, slots=True)
class FileHandle:
    node: Node
    fd: int
    generation: int
    writable: bool


@dataclass(eq=False, slots=True)
class DirHandle:
    node: Node
    entries: list[tuple[bytes, int]] = field(default_factory=list)
    started: bool = False  # a readdir has been answered (offset 0 again means rewind)


class HandleTable:
    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}

    def add_file(self, handle: FileHandle) -> int:
        number = next(self._numbers)
        self.files[number] = handle
        handle.node.open_fds = handle.node.open_fds | {handle.fd}
        return number

    def file(self, number: int) -> FileHandle:
        try:
            return self.files[number]
        except KeyError:
            raise OSError(9, "bad file handle") from None

    def swap_fd(self, handle: FileHandle, fd: int, generation: int) -> None:
        handle.node.open_fds = (handle.node.open_fds - {handle.fd}) | {fd}
        os.close(handle.fd)
        handle.fd = fd
        handle.generation = generation

    def release_file(self, number: int) -> FileHandle | None:
        handle = self.files.pop(number, None)
        if handle is not None:
            handle.node.open_fds = handle.node.open_fds - {handle.fd}
            os.close(handle.fd)
        return handle

    def add_dir(self, handle: DirHandle) -> int:
        number = next(self._numbers)
        self.dirs[number] = handle
        return number

    def dir(self, number: int) -> DirHandle:
        try:
            return self.dirs[number]
        except KeyError:
            raise OSError(9, "bad directory handle") from None

    def release_dir(self, number: int) -> None:
        self.dirs.pop(number, None)

    def close_all(self) -> None:
        for number in list(self.files):
            self.release_file(number)
        self.dirs.clear()


POSITION_BITS = 24  # up to 16,777,214 entries per directory listing
SNAPSHOT_BITS = 7  # generations per directory, modulo 128
POSITION_MASK = (1 << POSITION_BITS) - 1
GENERATION_MASK = (1 << SNAPSHOT_BITS) - 1
MAX_SNAPSHOTS = 64

Entries = list[tuple[bytes, int]]


class Listings:
    """Listing snapshots of directories read without a handle, by (inode, generation)."""

    def __init__(self, limit: int = MAX_SNAPSHOTS) -> None:
        assert limit < GENERATION_MASK
        self.limit = limit
        self._snapshots: OrderedDict[tuple[int, int], Entries] = OrderedDict()
        self._generation = 0  # one counter for all: a key comes back only after 127 others,
        # long after the LRU (limit < 127) dropped its snapshot

    def __len__(self) -> int:
        return len(self._snapshots)

    def start(self, inode: int, entries: Entries) -> int:
        """Keep a new snapshot of ``inode``'s listing; returns its generation (1..127)."""
        if len(entries) + 2 > POSITION_MASK:
            raise OSError(75, "directory too large to list without a handle")  # EOVERFLOW
        self._generation = self._generation % GENERATION_MASK + 1
        key = (inode, self._generation)
        self._snapshots.pop(key, None)
        self._snapshots[key] = entries
        while len(self._snapshots) > self.limit:
            self._snapshots.popitem(last=False)
        return self._generation

    def get(self, inode: int, generation: int) -> Entries | None:
        key = (inode, generation)
        entries = self._snapshots.get(key)
        if entries is not None:
            self._snapshots.move_to_end(key)
        return entries

    def finish(self, inode: int, generation: int) -> None:
        """The reader asked past the snapshot's last entry: drop it."""
        self._snapshots.pop((inode, generation), None)

    @staticmethod
    def offset(generation: int, position: int) -> int:
        return (generation << POSITION_BITS) | position

    @staticmethod
    def split(offset: int) -> tuple[int, int]:
        """(generation, position) of an offset handed out by ``offset``."""
        return (offset >> POSITION_BITS) & GENERATION_MASK, offset & POSITION_MASK

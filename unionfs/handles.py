"""Open file fds and directory snapshots, by handle number.

A file handle remembers the node's copy-up generation: when the node is copied up while the
handle is open (by another writer), the next read reopens the upper copy, so a reader never
keeps seeing stale lower data. A directory handle holds a snapshot of the merged listing,
taken at opendir and again on rewind, so offsets stay stable while entries come and go.
"""

from __future__ import annotations

import itertools
import os
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
        handle.node.open_fds.add(handle.fd)
        return number

    def file(self, number: int) -> FileHandle:
        try:
            return self.files[number]
        except KeyError:
            raise OSError(9, "bad file handle") from None

    def swap_fd(self, handle: FileHandle, fd: int, generation: int) -> None:
        handle.node.open_fds.discard(handle.fd)
        os.close(handle.fd)
        handle.fd = fd
        handle.generation = generation
        handle.node.open_fds.add(fd)

    def release_file(self, number: int) -> FileHandle | None:
        handle = self.files.pop(number, None)
        if handle is not None:
            handle.node.open_fds.discard(handle.fd)
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

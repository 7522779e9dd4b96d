"""The mount table of this process's namespace (``/proc/self/mountinfo``): the one parser.

A line is ``ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER``
(proc(5)). The kernel writes space, tab, newline and backslash in ROOT, MOUNTPOINT and SOURCE as
``\\ooo`` octal escapes (``\\040``, ``\\011``, ``\\012``, ``\\134``); nothing else is escaped, so
every other byte (UTF-8 or not) is kept as it is. Reading the table never touches a mount (a
``stat`` of our own mount point from the daemon before it serves would wait for ourselves).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PATH = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One mount: the fields unionfs and its tests use."""

    mountpoint: str  # unescaped
    device: str  # MAJOR:MINOR of the mounted filesystem (for FUSE, MINOR names its connection)
    fstype: str
    source: str = ""  # unescaped
    options: str = ""  # per-mount options, then the superblock's


def unescape(field: str) -> str:
    """Undo mountinfo's ``\\ooo`` octal escapes."""
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line, or None when it is not one."""
    before, separator, after = line.partition(" - ")
    fields = before.split()
    tail = after.split(maxsplit=2)
    if not separator or len(fields) < 6 or len(tail) < 2:
        return None
    super_options = tail[2].strip() if len(tail) > 2 else ""
    return MountEntry(
        mountpoint=unescape(fields[4]),
        device=fields[2],
        fstype=tail[0],
        source=unescape(tail[1]),
        options=f"{fields[5]},{super_options}" if super_options else fields[5],
    )


def parse(lines: Iterable[str]) -> list[MountEntry]:
    return [entry for entry in map(parse_line, lines) if entry is not None]


def mount_table(path: str = PATH) -> list[MountEntry]:
    """The mounts this process sees, in mount order (empty when the table cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as table:
            return parse(table)
    except OSError:
        return []


def mount_points() -> list[str]:
    """Mount points this process sees, in mount order."""
    return [entry.mountpoint for entry in mount_table()]


def mounted_paths() -> set[str]:
    """Mount points this process sees."""
    return {entry.mountpoint for entry in mount_table()}

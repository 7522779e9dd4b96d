"""This process's command line as ``ps`` and ``/proc/PID/cmdline`` show it.

The kernel shows the bytes of the original argument area (from ``arg_start`` to ``arg_end`` in
``/proc/self/stat``) as they are now. The interpreter keeps its own copy of its arguments, so
that area can be rewritten in place with other NUL-separated arguments: a mount child of the
mount server shows its client's command line there (``python -m unionfs mount ... MOUNTPOINT``),
as a daemon forked by that command would. The area cannot grow: the server is started with
spare room (``unionfs.client.TITLE_SPACE``), and a longer command line keeps its first
arguments and its last one (the mountpoint). The area's last byte stays NUL, so the kernel
never reads on into the environment.
"""

from __future__ import annotations

import ctypes

_used: int | None = None
"""Bytes of the area that may hold something other than NUL (None: all of it). A fork
inherits it, so a child rewrites only what it must (fewer pages made private)."""


def _argument_area() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as file:
        fields = file.read().rpartition(b")")[2].split()
    # Fields after the command name start at field 3; arg_start and arg_end are fields 48, 49.
    return int(fields[45]), int(fields[46])


def fit(arguments: list[bytes], space: int) -> bytes:
    """``arguments`` NUL-terminated in at most ``space`` bytes, NUL-padded to exactly that."""
    data = b"".join(argument + b"\0" for argument in arguments)
    if len(data) > space and arguments:
        last = arguments[-1][: space - 1] + b"\0"
        head = b""
        for argument in arguments[:-1]:
            if len(head) + len(argument) + 1 + len(last) > space:
                break
            head += argument + b"\0"
        data = head + last
    return data[:space].ljust(space, b"\0")


def set_command_line(arguments: list[bytes]) -> bool:
    """Show ``arguments`` as this process's command line; False if the area is unknown."""
    try:
        start, end = _argument_area()
    except (OSError, IndexError, ValueError):
        return False
    if start <= 0 or end <= start:
        return False
    global _used
    data = fit(arguments, end - start)
    used = len(data.rstrip(b"\0")) + 1
    length = len(data) if _used is None else min(len(data), max(used, _used))
    ctypes.memmove(start, data, length)
    _used = used
    return True


def set_name(name: str) -> None:
    """The short name (``comm``: ``ps -o comm``, ``top``, ``pgrep``), at most 15 bytes."""
    try:
        with open("/proc/self/comm", "w", encoding="utf-8", errors="replace") as file:
            file.write(name[:15])
    except OSError:
        pass

"""INIT capabilities stock pyfuse3 gives no way to ask for or refuse (the patched pyfuse3 does
it itself: ``Operations.init_want``/``init_clear``; this is the stock fallback).

Refused: FUSE_CAP_ATOMIC_O_TRUNC. Asked for: FUSE_CAP_CACHE_SYMLINKS (the kernel keeps symlink
targets in its page cache: one READLINK per link instead of one per resolution), which libfuse
3.14 copies into its INIT reply when ``want`` has it.

Why: libfuse 3 asks the kernel for atomic O_TRUNC by default. The kernel then truncates an
existing file opened with O_TRUNC in two steps: the OPEN request (the daemon truncates, the
kernel sets i_size to 0, under the inode lock), and later, after dropping that lock, a local
``i_size = 0`` plus page-cache truncation that is never sent to the daemon (fuse_do_setattr,
ATTR_OPEN). Another opener can write and flush data in between: the daemon's file then holds
it while the kernel believes the file is empty (or shorter), and with the write-back cache the
kernel never takes st_size from the daemon again for that inode (without it, until the cached
attributes expire). Without atomic O_TRUNC the kernel sends an ordinary SETATTR(size=0) at
that second step instead, which the daemon performs: both sides agree.

How: pyfuse3's INIT callback calls ``Operations.init()`` synchronously while libfuse's
``struct fuse_session`` holds the ``fuse_conn_info`` that becomes the INIT reply. The session
pointer is a static of the pyfuse3 extension (found through its ELF symbol table); the
``fuse_conn_info`` inside it is found by content (its layout is public, its offset is not),
and the bit is cleared only when exactly one candidate matches. Anything unexpected leaves
the connection as it was and says so in the log. A ``want`` bit the kernel does not offer is
left out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct

import pyfuse3

log = logging.getLogger(__name__)

FUSE_KERNEL_VERSION = 7
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"


class _ConnInfo(ctypes.Structure):
    """The head of libfuse 3's public ``struct fuse_conn_info``."""

    _fields_ = [
        ("proto_major", ctypes.c_uint),
        ("proto_minor", ctypes.c_uint),
        ("max_write", ctypes.c_uint),
        ("max_read", ctypes.c_uint),
        ("max_readahead", ctypes.c_uint),
        ("capable", ctypes.c_uint),
        ("want", ctypes.c_uint),
    ]


def _symbol_offset(path: str, wanted: bytes) -> int | None:
    """st_value of a symbol in an ELF64 little-endian shared object's .symtab."""
    with open(path, "rb") as elf:
        data = elf.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 2 or not entsize:  # SHT_SYMTAB
            continue
        strtab_offset = sections[link][4]
        for start in range(offset, offset + size, entsize):
            name_index, _info_b, _other, _shndx, value, _size = struct.unpack_from(
                "<IBBHQQ", data, start
            )
            end = data.index(b"\0", strtab_offset + name_index)
            if data[strtab_offset + name_index : end] == wanted:
                return int(value)
    return None


def _load_base(path: str) -> int | None:
    real = os.path.realpath(path)
    base = None
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(fields[2], 16) == 0:
                start = int(fields[0].split("-")[0], 16)
                base = start if base is None else min(base, start)
    return base


def adjust_capabilities(want: int, clear: int) -> bool:
    """Ask for the ``want`` bits (those the kernel offers) and clear the ``clear`` bits in the
    INIT reply being built; FUSE_CAP_ATOMIC_O_TRUNC must be among ``clear`` (the record is
    recognised by it). Call only from ``Operations.init()``. Returns whether it was done."""
    assert clear & FUSE_CAP_ATOMIC_O_TRUNC
    path = pyfuse3.__file__
    try:
        offset = _symbol_offset(path, SESSION_SYMBOL)
        base = _load_base(path)
    except (OSError, ValueError, struct.error) as error:
        log.warning("atomic O_TRUNC left on: cannot read %s: %s", path, error)
        return False
    if offset is None or base is None:
        log.warning("atomic O_TRUNC left on: no pyfuse3 session symbol in %s", path)
        return False
    session = ctypes.c_void_p.from_address(base + offset).value
    if not session:
        log.warning("atomic O_TRUNC left on: no pyfuse3 session")
        return False
    libc = ctypes.CDLL(None)
    libc.malloc_usable_size.restype = ctypes.c_size_t
    libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
    size = libc.malloc_usable_size(session)  # the session is one malloc'd block: stay in it
    matches = []
    for shift in range(0, size - ctypes.sizeof(_ConnInfo) + 1, ctypes.alignment(ctypes.c_uint)):
        conn = _ConnInfo.from_address(session + shift)
        if (
            conn.proto_major == FUSE_KERNEL_VERSION
            and 12 <= conn.proto_minor < 1000
            and conn.max_write >= 4096
            and conn.capable & FUSE_CAP_ATOMIC_O_TRUNC
            and conn.want & FUSE_CAP_ATOMIC_O_TRUNC
            and not conn.want & ~conn.capable
        ):
            matches.append(conn)
    if len(matches) != 1:
        log.warning("atomic O_TRUNC left on: %d candidate connection records", len(matches))
        return False
    conn = matches[0]
    conn.want = (conn.want | (want & conn.capable)) & ~clear
    log.info(
        "atomic O_TRUNC turned off: O_TRUNC arrives as SETATTR(size=0) (INIT want %#x, "
        "refused %#x)",
        conn.want,
        clear,
    )
    return True

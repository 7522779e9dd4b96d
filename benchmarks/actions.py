"""Timed actions run in a child process: ``python -m benchmarks.actions ACTION ARG...``.

Each prints the seconds its own work took as the last line of stdout, so interpreter start-up is
not part of the measurement and a hung filesystem hangs only the child (the runner kills it at
its timeout). Keep imports to the standard library: this runs once per sample.
"""

from __future__ import annotations

import errno
import os
import sys
import time


def stat_all(root: str, path_list: str) -> float:
    """lstat every path of PATH_LIST (relative to ROOT)."""
    with open(path_list) as handle:
        paths = [os.path.join(root, line.rstrip("\n")) for line in handle if line.strip()]
    started = time.perf_counter()
    for path in paths:
        os.lstat(path)
    return time.perf_counter() - started


def walk(root: str) -> float:
    """Walk the whole tree, lstat every entry (what a container runtime's scan does)."""
    started = time.perf_counter()
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            os.lstat(os.path.join(directory, name))
    return time.perf_counter() - started


def null_requests(path: str, count: str) -> float:
    """COUNT getxattr calls of an xattr PATH does not have: each is one GETXATTR request that
    the daemon answers ENODATA without touching a layer (the cost of a request itself)."""
    started = time.perf_counter()
    for _ in range(int(count)):
        try:
            os.getxattr(path, "user.unionfs-bench.missing", follow_symlinks=False)
        except OSError as error:
            if error.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return time.perf_counter() - started


def read_file(path: str) -> float:
    """Read PATH sequentially in 1 MiB requests."""
    buffer = bytearray(1 << 20)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    return time.perf_counter() - started


def append_byte(path: str) -> float:
    """Append one byte to PATH and close it (a lower file: this is the copy-up)."""
    started = time.perf_counter()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(descriptor, b"x")
    finally:
        os.close(descriptor)
    return time.perf_counter() - started


def check(root: str, *specs: str) -> float:
    """Verify a workload's result (untimed): exists:REL, absent:REL, modebits:REL:OCTAL,
    uid:REL:N, size:REL:N. Exits 1 naming the first spec that does not hold."""
    for spec in specs:
        kind, relative, *argument = spec.split(":")
        path = os.path.join(root, relative)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if kind == "absent":
            good = st is None
        elif st is None:
            good = False
        elif kind == "exists":
            good = True
        elif kind == "modebits":
            good = st.st_mode & int(argument[0], 8) == int(argument[0], 8)
        elif kind == "uid":
            good = st.st_uid == int(argument[0])
        elif kind == "size":
            good = st.st_size == int(argument[0])
        else:
            raise SystemExit(f"unknown check {spec}")
        if not good:
            found = (
                "missing"
                if st is None
                else f"mode {st.st_mode:o} uid {st.st_uid} size {st.st_size}"
            )
            print(f"check failed: {spec} ({found})", file=sys.stderr)
            raise SystemExit(1)
    return 0.0


ACTIONS = {
    "stat-all": stat_all,
    "walk": walk,
    "read": read_file,
    "null-requests": null_requests,
    "append-byte": append_byte,
    "check": check,
}


def main(arguments: list[str]) -> int:
    if not arguments or arguments[0] not in ACTIONS:
        print(
            f"usage: python -m benchmarks.actions {{{','.join(ACTIONS)}}} ARG...", file=sys.stderr
        )
        return 2
    elapsed = ACTIONS[arguments[0]](*arguments[1:])  # type: ignore[operator]
    print(f"{elapsed:.9f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

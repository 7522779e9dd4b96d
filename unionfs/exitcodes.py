"""The exit codes of every ``unionfs`` command: one table, used by the CLI (its ``--help``), the
commands, ``unionfs run``, the client and the README (a test keeps the README's table equal).

Importing it costs nothing (``enum`` only): the client, which must start fast, uses it too.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """An exit status and, as its ``meaning``, the line ``--help`` and the README show."""

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    SUCCESS = 0, "success"
    FAILURE = 1, "unexpected failure"
    USAGE = 2, "usage error (bad or missing arguments)"
    LAYER = 3, "bad layer, upper or workdir: missing, not a directory, given twice, nested"
    MOUNTPOINT = (
        4,
        "bad mountpoint: missing, not a directory, not empty, already mounted"
        " (umount: not mounted)",
    )
    PERMISSION = 5, "permission denied"
    FUSE = 6, "/dev/fuse unusable or fusermount3 missing"
    STORE = (
        7,
        "image store problem (--store): unknown image, ambiguous ID prefix, damaged or missing"
        " metadata, missing layer directory, a link or ID pointing outside the store",
    )


# ``unionfs run`` exits with its command's status; these two (the shell's) it makes itself.
RUN_NOT_EXECUTABLE = 126
RUN_NOT_FOUND = 127

EXIT_FAILURE = ExitCode.FAILURE
EXIT_USAGE = ExitCode.USAGE
EXIT_LAYER = ExitCode.LAYER
EXIT_MOUNTPOINT = ExitCode.MOUNTPOINT
EXIT_PERMISSION = ExitCode.PERMISSION
EXIT_FUSE = ExitCode.FUSE
EXIT_STORE = ExitCode.STORE


def help_text() -> str:
    """The ``exit codes:`` epilog of every ``--help``."""
    lines = [f"  {code.value}  {code.meaning}" for code in ExitCode]
    return "exit codes:\n" + "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The README's table (tests/unit/test_exitcodes.py keeps them equal)."""
    rows = [f"| {code.value} | {code.meaning} |" for code in ExitCode]
    return "\n".join(["| code | meaning |", "| ---- | ------- |", *rows])

"""``unionfs.permissions.may_access``: access(2)'s owner/group/other check."""

from __future__ import annotations

import os

import pytest

from unionfs.permissions import may_access

R, W, X = os.R_OK, os.W_OK, os.X_OK
FILE, DIR = 0o100000, 0o040000


def never(_gid: int) -> bool:
    return False


@pytest.mark.parametrize(
    ("mode", "caller", "wanted", "allowed"),
    [
        (FILE | 0o640, (10, 20), R | W, True),  # owner bits
        (FILE | 0o640, (11, 20), R, True),  # group bits
        (FILE | 0o640, (11, 20), W, False),
        (FILE | 0o640, (11, 21), R, False),  # other bits: none
        (FILE | 0o604, (11, 21), R, True),
        (FILE | 0o060, (10, 20), R, False),  # the owner gets the owner bits only
        (FILE | 0o000, (0, 0), R | W, True),  # root reads and writes anything
        (FILE | 0o644, (0, 0), X, False),  # but executes only what someone may
        (FILE | 0o744, (0, 0), X, True),
        (DIR | 0o000, (0, 0), X, True),  # and searches every directory
    ],
)
def test_bits(mode: int, caller: tuple[int, int], wanted: int, allowed: bool) -> None:
    assert may_access(mode, (10, 20), caller, never, wanted) is allowed


def test_supplementary_groups_are_asked_only_when_needed() -> None:
    asked: list[int] = []

    def in_group(gid: int) -> bool:
        asked.append(gid)
        return gid == 20

    assert may_access(FILE | 0o070, (10, 20), (11, 99), in_group, R)
    assert asked == [20]
    asked.clear()
    assert may_access(FILE | 0o700, (10, 20), (10, 99), in_group, R)
    assert asked == []

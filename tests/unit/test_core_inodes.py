"""Inode numbering without a mount: xino-style composition, the fallback range, uniqueness."""

from __future__ import annotations

import stat

from unionfs.inodes import ROOT_INODE, InodeNumbers, InodeTable


def table(devices: list[int]) -> InodeTable:
    numbers = InodeNumbers(devices)
    return InodeTable([], root_in_upper=False, numbers=numbers)


def test_one_filesystem_shows_real_numbers() -> None:
    numbers = InodeNumbers([7, 7, 7])
    assert numbers.bits == 0
    assert numbers.persistent((7, 12345)) == 12345
    assert numbers.persistent((7, (1 << 63) - 1)) == (1 << 63) - 1
    assert numbers.persistent((7, 1 << 63)) is None  # past 63 bits: per mount
    assert numbers.persistent((7, ROOT_INODE)) is None  # 1 is the root's
    assert numbers.persistent((8, 5)) is None  # not a layer's filesystem
    assert numbers.fallback() >= 1 << 63


def test_several_filesystems_compose_numbers() -> None:
    numbers = InodeNumbers([10, 20, 30, 20])  # upper first: 10 -> 0, 20 -> 1, 30 -> 2
    assert numbers.bits == 2
    assert numbers.persistent((10, 5)) == 5
    assert numbers.persistent((20, 5)) == (1 << 62) | 5
    assert numbers.persistent((30, 5)) == (2 << 62) | 5
    assert numbers.persistent((30, (1 << 61) - 1)) == (2 << 62) | ((1 << 61) - 1)
    assert numbers.persistent((30, 1 << 61)) is None  # does not fit 61 bits
    fallback = numbers.fallback()
    assert fallback & (1 << 61) and fallback >> 62 == 0  # the reserved bit, no filesystem
    assert fallback not in {numbers.persistent((dev, n)) for dev in (10, 20, 30) for n in (5,)}


def test_reused_upper_number_while_the_old_node_lives_gets_another_number() -> None:
    """The upper filesystem may give a deleted file's inode number to a new file while the
    old node is still in use (open, unlinked): node ids must stay unique."""
    inodes = table([1])
    old = inodes.new_node((1, 500), stat.S_IFREG, [])
    assert old.ino == 500
    inodes.drop_key((1, 500), old)  # deleted; still open
    new = inodes.new_node((1, 500), stat.S_IFREG, [])
    assert new.ino != old.ino and new.ino >= 1 << 63
    assert inodes.node_for_key((1, 500)) is new


def test_copied_up_node_keeps_the_origins_number() -> None:
    inodes = table([1, 2])
    node = inodes.new_node((2, 77), stat.S_IFREG, [])  # a lower file (filesystem 1)
    inodes.alias((1, 900), node)  # its upper copy
    assert node.ino == (1 << 63) | 77
    assert inodes.node_for_key((1, 900)) is node
    again = table([1, 2]).new_node((1, 900), stat.S_IFREG, [], identity=(2, 77))  # remount
    assert again.ino == node.ino


def test_forgotten_node_comes_back_with_its_number() -> None:
    inodes = table([1])
    node = inodes.new_node((1, 42), stat.S_IFREG, [])
    node.lookups = 1
    inodes.forget(node.ino, 1)
    assert node.ino not in inodes.nodes
    assert inodes.new_node((1, 42), stat.S_IFREG, []).ino == 42

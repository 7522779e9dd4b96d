"""Directory listing snapshots read without a handle (handles.Listings): offsets name their
snapshot, stay below 2**31, and snapshots are bounded."""

from __future__ import annotations

import pytest

from unionfs.handles import POSITION_MASK, Listings


def entries(count: int) -> list[tuple[bytes, int]]:
    return [(b"e%d" % index, 0o100000) for index in range(count)]


def test_offsets_name_the_snapshot_and_its_position() -> None:
    listings = Listings()
    first = listings.start(5, entries(3))
    second = listings.start(5, entries(4))  # a rewind: a new snapshot, the old one kept
    assert first != second
    offset = Listings.offset(first, 2)
    assert 0 < offset < 2**31
    assert Listings.split(offset) == (first, 2)
    assert listings.get(5, first) == entries(3)
    assert listings.get(5, second) == entries(4)
    assert listings.get(6, first) is None  # another directory's offsets find nothing


def test_finished_and_least_recently_used_snapshots_go() -> None:
    listings = Listings(limit=3)
    kept = listings.start(1, entries(1))
    listings.finish(1, kept)
    assert listings.get(1, kept) is None
    generations = [listings.start(inode, entries(1)) for inode in (10, 11, 12)]
    assert listings.get(10, generations[0]) is not None  # now the most recently used
    listings.start(13, entries(1))
    assert len(listings) == 3
    assert listings.get(11, generations[1]) is None
    assert listings.get(10, generations[0]) is not None


def test_generations_wrap_below_the_offset_limit() -> None:
    listings = Listings()
    seen = {listings.start(1, entries(1)) for _ in range(300)}
    assert seen == set(range(1, 128))
    assert len(listings) <= 64


def test_a_directory_too_large_for_the_offset_bits_is_refused() -> None:
    # A real list (a list subclass's __len__ is not called by the mypyc-compiled build); one
    # shared tuple, so 128 MiB of references at most.
    huge = [(b"x", 0)] * (POSITION_MASK - 1)
    with pytest.raises(OSError) as raised:
        Listings().start(1, huge)
    del huge
    assert raised.value.errno == 75  # EOVERFLOW

"""What a union leaves in its upper and work directory reads back the same after a remount:
the hard-link index, metadata-only copies, whiteouts, redirects and inode numbers (in-process,
``remount`` opens the same layers again with the mount's factory)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.inprocess.conftest import STANDARD, MakeUnion, Remount
from tests.inprocess.driver import Driver

pytestmark = pytest.mark.trio


def index_entries(driver: Driver) -> list[str]:
    assert driver.config.workdir is not None
    return os.listdir(Path(driver.config.workdir) / "index")


async def copied_up_hard_links(make_union: MakeUnion) -> Driver:
    """A union whose lower file has two names (h1, h2), written to through h1 (indexed)."""
    union = make_union({"h1": "shared\n"})
    lower = Path(union.config.lowers[0])
    os.link(lower / "h1", lower / "h2")
    await union.write("h1", b"S")
    return union


async def test_lower_hard_links_stay_one_file_across_remounts(
    make_union: MakeUnion, remount: Remount
) -> None:
    union = await copied_up_hard_links(make_union)
    union = remount(union)
    assert await union.read("h2") == b"Shared\n"
    assert await union.inode("h1") == await union.inode("h2")
    assert (await union.stat("h2")).st_nlink == 2
    assert len(index_entries(union)) == 1


async def test_an_indexed_file_without_names_leaves_the_index(
    make_union: MakeUnion, remount: Remount
) -> None:
    union = await copied_up_hard_links(make_union)
    await union.unlink("h1")
    union = remount(union)
    assert (await union.stat("h2")).st_nlink == 1
    await union.unlink("h2")
    assert index_entries(union) == []
    assert await union.listdir() == []


async def test_a_metadata_only_copy_reads_its_data_after_a_remount(
    make_union: MakeUnion, remount: Remount
) -> None:
    union = make_union(STANDARD)
    await union.chmod("dir/inner", 0o600)
    union = remount(union)
    assert await union.read("dir/inner") == b"inner\n"
    assert stat.S_IMODE((await union.stat("dir/inner")).st_mode) == 0o600


async def test_deletes_and_renames_read_back_after_a_remount(
    make_union: MakeUnion, remount: Remount
) -> None:
    union = make_union(STANDARD)
    await union.unlink("file")
    await union.rename("dir", "moved")
    await union.mkdir("moved/new")
    before = {path: await union.listdir(path) for path in ("", "moved", "moved/sub")}
    union = remount(union)
    after = {path: await union.listdir(path) for path in ("", "moved", "moved/sub")}
    assert (
        after
        == before
        == {
            "": ["empty", "moved"],
            "moved": ["inner", "new", "sub"],
            "moved/sub": ["deep"],
        }
    )
    assert await union.read("moved/sub/deep") == b"deep\n"


async def test_inode_numbers_are_the_same_after_a_remount(
    make_union: MakeUnion, remount: Remount
) -> None:
    union = make_union(STANDARD)
    await union.write("dir/inner", b"X")  # copied up: keeps its lower number
    await union.create("new", b"n")
    paths = ("file", "dir", "dir/inner", "dir/sub/deep", "new")
    before = {path: await union.inode(path) for path in paths}
    union = remount(union)
    assert {path: await union.inode(path) for path in paths} == before

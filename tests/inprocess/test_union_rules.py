"""Union rules, copy-up, whiteouts, renames, hard links and the inode table, through
``Operations`` in-process (no kernel; ``unionfs check`` runs on the upper after each test).

The same rules are proven through real mounts (tests/integration) and against kernel overlayfs
(tests/differential); these are the fast floor under them, one rule per test.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.inprocess.conftest import STANDARD, MakeUnion
from tests.inprocess.driver import Driver
from tests.support import DIR, OPAQUE, WHITEOUT, Symlink
from unionfs import safeio

pytestmark = pytest.mark.trio

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def upper_of(driver: Driver) -> Path:
    assert driver.config.upper is not None
    return Path(driver.config.upper)


def lower_of(driver: Driver, index: int = 0) -> Path:
    return Path(driver.config.lowers[index])


def private(driver: Driver, name: str) -> str:
    """The stored name of overlay bookkeeping xattr ``name`` in this union's upper."""
    assert driver.union.work is not None
    return driver.union.work.xattr_prefix + name


def is_whiteout(path: Path) -> bool:
    return safeio.is_whiteout_device(os.lstat(path))


# ----------------------------------------------------------------------------- reading


async def test_listing_merges_layers_top_first(make_union: MakeUnion) -> None:
    union = make_union(
        {"a": "base a\n", "d/x": "base x\n"},
        {"b": "top b\n", "d/y": "top y\n", "a": "top a\n"},
        upper_spec={"c": "upper c\n"},
    )
    assert await union.listdir() == ["a", "b", "c", "d"]
    assert await union.listdir("d") == ["x", "y"]
    assert await union.read("a") == b"top a\n"
    assert await union.read("c") == b"upper c\n"


async def test_whiteouts_and_opaque_dirs_hide_lower_content(make_union: MakeUnion) -> None:
    union = make_union(
        {"gone": "x", "d/old": "x", "keep": "k"},
        {"gone": WHITEOUT, "d": OPAQUE, "d/new": "n"},
    )
    assert await union.listdir() == ["d", "keep"]
    assert await union.listdir("d") == ["new"]
    assert not await union.exists("gone")
    assert await union.errno_of(union.read("d/old")) == errno.ENOENT


async def test_oci_whiteout_files_hide_and_never_show(make_union: MakeUnion) -> None:
    union = make_union(
        {"gone": "x", "d/old": "x", "d/kept": "k"},
        {".wh.gone": "", "d/.wh..wh..opq": "", "d/new": "n"},
    )
    assert await union.listdir() == ["d"]
    assert await union.listdir("d") == ["new"]


async def test_symlinks_are_read_not_followed(make_union: MakeUnion) -> None:
    union = make_union({"target": "t", "link": Symlink("/etc/passwd")})
    assert await union.readlink("link") == "/etc/passwd"
    assert stat.S_ISLNK((await union.stat("link")).st_mode)


# ----------------------------------------------------------------------------- copy-up


async def test_write_copies_up_and_leaves_the_lower_alone(union: Driver) -> None:
    await union.write("dir/inner", b"INNER")
    assert await union.read("dir/inner") == b"INNER\n"
    assert (upper_of(union) / "dir" / "inner").read_bytes() == b"INNER\n"
    assert (lower_of(union) / "dir" / "inner").read_bytes() == b"inner\n"


async def test_truncating_open_copies_up_no_data(union: Driver) -> None:
    await union.write("file", b"new", trunc=True)
    assert await union.read("file") == b"new"
    assert (lower_of(union) / "file").read_text() == "lower file\n"


async def test_an_o_trunc_open_copies_up_no_data(union: Driver) -> None:
    # (O_TRUNC reaches OPEN only when atomic O_TRUNC could not be turned off)
    fh = await union.open("dir/inner", os.O_WRONLY | os.O_TRUNC)
    await union.release(fh)
    assert await union.read("dir/inner") == b""
    assert (upper_of(union) / "dir" / "inner").stat().st_size == 0
    assert (lower_of(union) / "dir" / "inner").read_text() == "inner\n"


async def test_a_read_only_open_copies_nothing_up(union: Driver) -> None:
    fh = await union.open("dir/inner", os.O_RDONLY)
    await union.release(fh)
    assert not (upper_of(union) / "dir").exists()


async def test_copy_up_makes_parents_with_the_lower_modes(make_union: MakeUnion) -> None:
    union = make_union({"a/b/c/f": "f"})
    os.chmod(lower_of(union) / "a" / "b", 0o750)
    await union.write("a/b/c/f", b"F")
    assert stat.S_IMODE(os.lstat(upper_of(union) / "a" / "b").st_mode) == 0o750
    assert (upper_of(union) / "a" / "b" / "c" / "f").read_bytes() == b"F"


async def test_chmod_copies_metadata_only(union: Driver) -> None:
    await union.chmod("file", 0o600)
    copy = upper_of(union) / "file"
    assert os.getxattr(copy, private(union, "metacopy")) == b""
    assert copy.read_bytes() == bytes(len("lower file\n"))  # size only: the data stays below
    assert stat.S_IMODE((await union.stat("file")).st_mode) == 0o600
    assert await union.read("file") == b"lower file\n"
    assert stat.S_IMODE((lower_of(union) / "file").stat().st_mode) == 0o644


async def test_write_after_a_metadata_copy_brings_the_data_up(union: Driver) -> None:
    await union.chmod("file", 0o600)
    await union.write("file", b"L")
    copy = upper_of(union) / "file"
    assert private(union, "metacopy") not in os.listxattr(copy)
    assert copy.read_bytes() == b"Lower file\n"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600


async def test_metacopy_off_copies_data_at_chmod(make_union: MakeUnion) -> None:
    union = make_union(STANDARD, metacopy=False)
    await union.chmod("file", 0o600)
    assert (upper_of(union) / "file").read_text() == "lower file\n"


async def test_setxattr_copies_up_and_keeps_lower_xattrs(union: Driver) -> None:
    os.setxattr(lower_of(union) / "file", "user.from_lower", b"1")
    await union.setxattr("file", "user.mine", b"2")
    assert await union.listxattr("file") == ["user.from_lower", "user.mine"]
    assert os.getxattr(upper_of(union) / "file", "user.mine") == b"2"
    assert "user.mine" not in os.listxattr(lower_of(union) / "file")


async def test_overlay_xattrs_set_through_the_union_are_stored_escaped(union: Driver) -> None:
    await union.setxattr("file", "user.overlay.opaque", b"y")
    assert await union.getxattr("file", "user.overlay.opaque") == b"y"
    assert "user.overlay.opaque" in await union.listxattr("file")
    stored = os.listxattr(upper_of(union) / "file")
    assert "user.overlay.overlay.opaque" in stored and "user.overlay.opaque" not in stored
    await union.removexattr("file", "user.overlay.opaque")
    assert "user.overlay.opaque" not in await union.listxattr("file")


async def test_bookkeeping_xattrs_never_show(union: Driver) -> None:
    await union.chmod("file", 0o600)  # the upper copy carries metacopy and origin
    assert not [name for name in await union.listxattr("file") if ".overlay." in name]


async def test_utime_on_a_lower_directory_copies_it_up(union: Driver) -> None:
    await union.utime("dir", 1_000_000_000, 2_000_000_000)
    st = os.lstat(upper_of(union) / "dir")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    assert await union.listdir("dir") == ["inner", "sub"]


# ----------------------------------------------------------------------------- deleting


async def test_unlink_of_a_lower_file_leaves_a_whiteout(union: Driver) -> None:
    await union.unlink("file")
    assert is_whiteout(upper_of(union) / "file")
    assert "file" not in await union.listdir()
    assert await union.errno_of(union.read("file")) == errno.ENOENT
    assert (lower_of(union) / "file").exists()


async def test_unlink_of_an_upper_only_file_leaves_nothing(union: Driver) -> None:
    await union.create("new", b"n")
    await union.unlink("new")
    assert not os.path.lexists(upper_of(union) / "new")


async def test_oci_format_writes_wh_files(make_union: MakeUnion) -> None:
    union = make_union(STANDARD, whiteout_format="oci")
    await union.unlink("file")
    assert (upper_of(union) / ".wh.file").is_file()
    assert not os.path.lexists(upper_of(union) / "file")
    assert "file" not in await union.listdir()


async def test_rmdir_of_a_non_empty_merged_dir_is_refused(union: Driver) -> None:
    assert await union.errno_of(union.rmdir("dir")) == errno.ENOTEMPTY


async def test_rmdir_after_emptying_a_lower_dir(union: Driver) -> None:
    await union.unlink("dir/sub/deep")
    await union.rmdir("dir/sub")
    assert is_whiteout(upper_of(union) / "dir" / "sub")
    assert await union.listdir("dir") == ["inner"]


async def test_a_new_file_replaces_a_whiteout(union: Driver) -> None:
    await union.unlink("file")
    await union.create("file", b"again")
    assert await union.read("file") == b"again"
    assert stat.S_ISREG(os.lstat(upper_of(union) / "file").st_mode)


async def test_mkdir_over_a_deleted_lower_dir_is_opaque(union: Driver) -> None:
    await union.unlink("dir/sub/deep")
    await union.rmdir("dir/sub")
    await union.mkdir("dir/sub")
    assert await union.listdir("dir/sub") == []
    value = os.getxattr(upper_of(union) / "dir" / "sub", private(union, "opaque"))
    assert value == b"y"


async def test_wh_names_cannot_be_made(union: Driver) -> None:
    assert await union.errno_of(union.create(".wh.file")) == errno.EINVAL
    assert await union.errno_of(union.mkdir(".wh..wh..opq")) == errno.EINVAL
    assert await union.listdir() == ["dir", "empty", "file"]


# ----------------------------------------------------------------------------- renaming


async def test_rename_of_a_lower_file_copies_up_and_whites_out(union: Driver) -> None:
    await union.rename("file", "moved")
    assert await union.read("moved") == b"lower file\n"
    assert not await union.exists("file")
    assert is_whiteout(upper_of(union) / "file")


async def test_rename_of_a_lower_dir_records_a_redirect(union: Driver) -> None:
    await union.rename("dir", "renamed")
    assert await union.listdir("renamed") == ["inner", "sub"]
    assert await union.read("renamed/sub/deep") == b"deep\n"
    assert not await union.exists("dir")
    redirect = os.getxattr(upper_of(union) / "renamed", private(union, "redirect"))
    assert redirect.rstrip(b"\0") in (b"dir", b"/dir")


async def test_redirect_dir_off_refuses_moving_lower_dirs(make_union: MakeUnion) -> None:
    union = make_union(STANDARD, redirect_dir=False)
    assert await union.errno_of(union.rename("dir", "renamed")) == errno.EXDEV
    await union.mkdir("fresh")
    await union.rename("fresh", "moved")  # an upper-only directory moves
    assert await union.exists("moved")


async def test_rename_noreplace_refuses_an_existing_target(union: Driver) -> None:
    await union.create("new", b"n")
    failed = await union.errno_of(union.rename("new", "file", RENAME_NOREPLACE))
    assert failed == errno.EEXIST
    assert await union.read("file") == b"lower file\n"


async def test_rename_exchange_swaps_two_names(union: Driver) -> None:
    await union.create("new", b"n")
    await union.rename("new", "file", RENAME_EXCHANGE)
    assert await union.read("file") == b"n"
    assert await union.read("new") == b"lower file\n"


async def test_rename_over_a_file_replaces_it(union: Driver) -> None:
    await union.create("new", b"n")
    await union.rename("new", "file")
    assert await union.read("file") == b"n"
    assert await union.listdir() == ["dir", "empty", "file"]


# ----------------------------------------------------------------------------- hard links


async def test_link_of_an_upper_file_shares_the_inode(union: Driver) -> None:
    ino = await union.create("a", b"a")
    assert await union.link("a", "b") == ino
    assert (await union.stat("b")).st_nlink == 2
    await union.write("b", b"B")
    assert await union.read("a") == b"B"


async def test_link_of_a_lower_file_copies_it_up_first(union: Driver) -> None:
    ino = await union.inode("file")
    assert await union.link("file", "other") == ino
    assert (await union.stat("file")).st_nlink == 2
    upper = upper_of(union)
    assert os.lstat(upper / "file").st_ino == os.lstat(upper / "other").st_ino


async def test_lower_hard_links_stay_one_file_after_copy_up(make_union: MakeUnion) -> None:
    union = make_union({"h1": "shared\n"})
    os.link(lower_of(union) / "h1", lower_of(union) / "h2")
    assert await union.inode("h1") == await union.inode("h2")
    await union.write("h1", b"S")
    assert await union.read("h2") == b"Shared\n"
    assert (await union.stat("h2")).st_nlink == 2
    assert union.union.work is not None and union.union.work.path is not None
    index = Path(union.union.work.path) / "index"
    assert len(os.listdir(index)) == 1


async def test_unlinking_one_lower_hard_link_keeps_the_other(make_union: MakeUnion) -> None:
    union = make_union({"h1": "shared\n"})
    os.link(lower_of(union) / "h1", lower_of(union) / "h2")
    await union.write("h1", b"S")
    await union.unlink("h1")
    assert await union.read("h2") == b"Shared\n"
    assert (await union.stat("h2")).st_nlink == 1


# ----------------------------------------------------------------------------- inode table


async def test_inode_numbers_survive_copy_up(union: Driver) -> None:
    before = await union.inode("dir/inner")
    await union.write("dir/inner", b"X")
    assert await union.inode("dir/inner") == before
    assert (await union.stat("dir/inner")).st_ino == before


async def test_forgotten_nodes_leave_the_table(union: Driver) -> None:
    inode = await union.inode("file")
    table = union.ops.tree.inodes.nodes
    lookups = table[inode].lookups
    assert lookups == 1
    await union.call("forget", [(inode, lookups)])
    assert inode not in table
    assert await union.inode("file") == inode  # the same number comes back


async def test_an_open_file_stays_readable_after_unlink(union: Driver) -> None:
    await union.create("tmp", b"still here")
    fh = await union.open("tmp", os.O_RDONLY)
    try:
        await union.unlink("tmp")
        assert not await union.exists("tmp")
        assert await union.call("read", fh, 0, 100) == b"still here"
    finally:
        await union.release(fh)


async def test_readers_switch_to_the_copy_after_copy_up(union: Driver) -> None:
    fh = await union.open("file", os.O_RDONLY)
    try:
        await union.write("file", b"L")
        assert await union.call("read", fh, 0, 100) == b"Lower file\n"
    finally:
        await union.release(fh)


# ----------------------------------------------------------------------------- errors


async def test_mkdir_over_an_existing_lower_dir_is_eexist(union: Driver) -> None:
    assert await union.errno_of(union.mkdir("dir")) == errno.EEXIST


async def test_unlink_of_a_missing_name_is_enoent(union: Driver) -> None:
    assert await union.errno_of(union.unlink("nothing")) == errno.ENOENT


async def test_read_only_union_refuses_writes(make_union: MakeUnion) -> None:
    union = make_union(STANDARD, read_only=True)
    assert await union.errno_of(union.create("new")) == errno.EROFS
    assert await union.errno_of(union.write("file", b"x")) == errno.EROFS
    assert await union.errno_of(union.chmod("file", 0o600)) == errno.EROFS
    assert await union.listdir() == ["dir", "empty", "file"]


async def test_mknod_and_symlink_are_made_in_the_upper(union: Driver) -> None:
    await union.mknod("fifo", stat.S_IFIFO | 0o644)
    await union.symlink("file", "link")
    assert stat.S_ISFIFO(os.lstat(upper_of(union) / "fifo").st_mode)
    assert await union.readlink("link") == "file"
    assert sorted(await union.listdir()) == ["dir", "empty", "fifo", "file", "link"]


async def test_new_directories_in_lower_dirs_merge(make_union: MakeUnion) -> None:
    union = make_union({"d/x": "x", "d/e": DIR})
    await union.mkdir("d/new")
    await union.create("d/new/f", b"f")
    assert await union.listdir("d") == ["e", "new", "x"]
    assert await union.read("d/new/f") == b"f"

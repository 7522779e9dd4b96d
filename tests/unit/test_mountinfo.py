"""``unionfs.mountinfo``: the one /proc/self/mountinfo parser (octal escapes as proc(5) says)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unionfs import mountinfo


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (r"/mnt/a\040b", "/mnt/a b"),
        (r"/mnt/a\011b", "/mnt/a\tb"),
        (r"/mnt/a\012b", "/mnt/a\nb"),
        (r"/mnt/a\134b", "/mnt/a\\b"),
        (r"/mnt/\134040", "/mnt/\\040"),  # an escaped backslash followed by digits
        (r"/mnt/\040\040", "/mnt/  "),
        ("/mnt/é", "/mnt/é"),  # non-ASCII bytes are written as they are
        (r"/mnt/a\08b", r"/mnt/a\08b"),  # not three octal digits: no escape
        (r"/mnt/a\04", r"/mnt/a\04"),
    ],
)
def test_unescape(field: str, expected: str) -> None:
    assert mountinfo.unescape(field) == expected


def test_parse_line_fields() -> None:
    line = (
        r"36 35 0:52 / /tmp/my\040mnt rw,nosuid,nodev shared:1 master:2 - fuse.unionfs-py"
        r" /src\011dir rw,user_id=0,group_id=0" + "\n"
    )
    entry = mountinfo.parse_line(line)
    assert entry == mountinfo.MountEntry(
        mountpoint="/tmp/my mnt",
        device="0:52",
        fstype="fuse.unionfs-py",
        source="/src\tdir",
        options="rw,nosuid,nodev,rw,user_id=0,group_id=0",
    )


@pytest.mark.parametrize("line", ["", "garbage\n", "1 2 0:3 / /x rw\n", "1 2 0:3 / /x rw - \n"])
def test_malformed_lines_are_skipped(line: str) -> None:
    assert mountinfo.parse_line(line) is None
    assert mountinfo.parse([line]) == []


def test_own_table_has_the_root_and_reads_nothing_unreadable(tmp_path: Path) -> None:
    table = mountinfo.mount_table()
    assert "/" in {entry.mountpoint for entry in table}
    assert mountinfo.mounted_paths() == set(mountinfo.mount_points())
    root = next(entry for entry in table if entry.mountpoint == "/")
    st = os.stat("/")
    assert root.device == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    assert mountinfo.mount_table(str(tmp_path / "missing")) == []

"""unionfs.check: the offline upper-layer checker finds and repairs what a crash leaves behind.

Uppers are built by hand (each problem on its own), then by real mounts (unionfs and kernel
overlayfs) doing ordinary work, which must check clean: no false alarms.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.support import opaque_xattr_name
from tests.support.mounts import overlay_mounted, unionfs_mounted
from unionfs.check import check_upper, format_report

pytestmark = pytest.mark.timeout(120)


def _layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    lower = tmp_path / "lower"
    upper = tmp_path / "upper"
    workdir = tmp_path / "workdir"
    for path in (lower, upper, workdir / "work"):
        path.mkdir(parents=True)
    (lower / "dir").mkdir()
    (lower / "dir" / "file").write_text("lower\n")
    (lower / "file").write_text("lower\n")
    return lower, upper, workdir


def _kinds(report: object) -> list[tuple[str, str]]:
    return sorted((p.kind, p.path) for p in report.found)  # type: ignore[attr-defined]


def test_clean_upper_is_ok(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    (upper / "new").write_text("x")
    (upper / "dir").mkdir()
    report = check_upper(upper, workdir, [lower], repair=False)
    assert report.ok, format_report(report)
    assert report.entries_checked == 2
    assert format_report(report).strip().endswith("clean")


def test_orphans_in_work_are_removed(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    (workdir / "work" / "#unionfs.12.3").write_text("half a copy")
    (workdir / "work" / "#unionfs.12.4").mkdir()
    (workdir / "work" / "#unionfs.12.4" / "deep").mkdir()
    (workdir / "work" / "stray").write_text("")
    report = check_upper(upper, workdir, [lower], repair=False)
    assert not report.ok
    assert [p.kind for p in report.found] == ["orphan"] * 3
    assert report.only_repairable
    assert (workdir / "work" / "stray").exists()  # not repairing: nothing touched
    report = check_upper(upper, workdir, [lower], repair=True)
    assert report.ok and len(report.repaired) == 3, format_report(report)
    assert list((workdir / "work").iterdir()) == []
    assert check_upper(upper, workdir, [lower], repair=False).ok


def test_orphaned_hard_link_index_entries_are_removed(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    index = workdir / "index"
    index.mkdir()
    nlink = "trusted.overlay.nlink" if os.geteuid() == 0 else "user.overlay.nlink"
    orphan = index / ("00fb" + "1" * 52)
    orphan.write_text("no name left")
    os.setxattr(orphan, nlink, b"U-1")
    kept = index / ("00fb" + "2" * 52)  # a lower name still shows it: merged count 1
    kept.write_text("index-only alias")
    os.setxattr(kept, nlink, b"U+0")
    linked = index / ("00fb" + "3" * 52)
    linked.write_text("up")
    os.link(linked, upper / "file")
    os.setxattr(linked, nlink, b"U-1")
    report = check_upper(upper, workdir, [lower], repair=False)
    assert _kinds(report) == [("orphan-index", "index/" + orphan.name)], format_report(report)
    assert report.only_repairable
    report = check_upper(upper, workdir, [lower], repair=True)
    assert sorted(os.listdir(index)) == [kept.name, linked.name]
    assert check_upper(upper, workdir, [lower], repair=False).ok


@pytest.mark.root
def test_real_devices_are_not_whiteouts(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(upper / "file", stat.S_IFCHR, os.makedev(0, 0))  # a whiteout of lower file
    assert check_upper(upper, workdir, [lower], repair=False).ok


def test_malformed_oci_whiteouts_are_reported(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    (upper / ".wh.file").write_text("not empty")
    (upper / ".wh..").write_text("")
    (upper / ".wh...").write_text("")
    (upper / ".wh.").write_text("")
    (upper / "dir").mkdir()
    (upper / "dir" / ".wh..wh..opq").mkdir()
    report = check_upper(upper, workdir, [lower], repair=True)
    assert _kinds(report) == [
        ("malformed-opaque", "/dir/.wh..wh..opq"),
        ("malformed-whiteout", "/.wh."),
        ("malformed-whiteout", "/.wh.."),
        ("malformed-whiteout", "/.wh..."),
        ("malformed-whiteout", "/.wh.file"),
    ]
    assert not report.ok and not report.repaired
    assert (upper / ".wh.file").read_text() == "not empty"  # reported, never destroyed


def test_redirects(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    prefix = opaque_xattr_name().rsplit(".", 1)[0]  # trusted.overlay or user.overlay
    for name, value in [
        ("good", b"/dir"),
        ("climbs", b"/../etc"),
        ("relative", b"a/b"),
        ("empty", b""),
        ("nowhere", b"/missing"),
        ("tofile", b"/file"),
    ]:
        (upper / name).mkdir()
        if value:
            os.setxattr(upper / name, f"{prefix}.redirect", value)
        else:
            os.setxattr(upper / name, f"{prefix}.redirect", b"\0")
    # A regular file may keep a redirect (kernel overlayfs leaves it when a metadata-only copy
    # gets its data; unionfs also leaves one on a renamed copy): only its value is checked.
    (upper / "afile").write_text("")
    os.setxattr(upper / "afile", f"{prefix}.redirect", b"/file")
    (upper / "bfile").write_text("")
    os.setxattr(upper / "bfile", f"{prefix}.redirect", b"/../file")
    metacopies: list[tuple[str, bytes | None]] = [
        ("meta-ok", b"/dir/file"),
        ("meta-lost", b"/gone"),
        ("file", None),
    ]
    for name, redirect in metacopies:
        (upper / name).write_text("")
        os.setxattr(upper / name, f"{prefix}.metacopy", b"")
        if redirect is not None:
            os.setxattr(upper / name, f"{prefix}.redirect", redirect)
    (upper / "meta-nodata").write_text("")
    os.setxattr(upper / "meta-nodata", f"{prefix}.metacopy", b"")
    report = check_upper(upper, workdir, [lower], repair=True)
    assert _kinds(report) == [
        ("dangling-metacopy", "/meta-lost"),
        ("dangling-metacopy", "/meta-nodata"),
        ("dangling-redirect", "/nowhere"),
        ("dangling-redirect", "/tofile"),
        ("invalid-redirect", "/bfile"),
        ("invalid-redirect", "/climbs"),
        ("invalid-redirect", "/empty"),
        ("invalid-redirect", "/relative"),
    ], format_report(report)
    # Without lowers only the self-evident problems are reported.
    report = check_upper(upper, None, None, repair=False)
    assert {p.kind for p in report.found} == {"invalid-redirect"}


def test_opaque_both_forms_and_half_opaque(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    (upper / "both").mkdir()
    os.setxattr(upper / "both", opaque_xattr_name(), b"y")
    (upper / "both" / ".wh..wh..opq").write_text("")
    (upper / "dir").mkdir()  # mkdir over an OCI whiteout, interrupted before the marker
    (upper / ".wh.dir").write_text("")
    (upper / "file").write_text("new")  # create over an OCI whiteout, interrupted
    (upper / ".wh.file").write_text("")
    (upper / "odd").mkdir()
    os.setxattr(upper / "odd", opaque_xattr_name(), b"maybe")
    report = check_upper(upper, workdir, [lower], repair=True)
    assert _kinds(report) == [
        ("half-opaque", "/dir"),
        ("malformed-opaque", "/odd"),
        ("opaque-both-forms", "/both"),
        ("stale-whiteout", "/.wh.file"),
    ], format_report(report)
    assert [p.kind for p in report.left] == ["malformed-opaque"]
    assert not (upper / "both" / ".wh..wh..opq").exists()
    assert os.getxattr(upper / "both", opaque_xattr_name()) == b"y"
    assert not (upper / ".wh.dir").exists() and (upper / "dir" / ".wh..wh..opq").exists()
    assert not (upper / ".wh.file").exists() and (upper / "file").read_text() == "new"
    os.removexattr(upper / "odd", opaque_xattr_name())
    assert check_upper(upper, workdir, [lower], repair=False).ok


@pytest.mark.root
def test_dangling_whiteouts_follow_redirects(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    os.mknod(upper / "ghost", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "moved").mkdir()
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/dir")
    os.mknod(upper / "moved" / "file", stat.S_IFCHR, os.makedev(0, 0))  # hides dir/file
    os.mknod(upper / "moved" / "nothing", stat.S_IFCHR, os.makedev(0, 0))
    report = check_upper(upper, workdir, [lower], repair=True)
    assert sorted((p.kind, p.path) for p in report.notes) == [
        ("dangling-whiteout", "/ghost"),
        ("dangling-whiteout", "/moved/nothing"),
    ], format_report(report)
    assert report.ok and not report.found
    assert stat.S_ISCHR(os.lstat(upper / "moved" / "file").st_mode)


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    lower, upper, workdir = _layout(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".wh.victim").write_text("do not touch")
    (upper / "link").symlink_to(outside)
    (workdir / "work" / "#unionfs.1.1").symlink_to(outside)
    report = check_upper(upper, workdir, [lower], repair=True)
    assert report.ok
    assert (outside / ".wh.victim").read_text() == "do not touch"


def test_deep_and_wide_trees(tmp_path: Path) -> None:
    _lower, upper, workdir = _layout(tmp_path)
    fd = os.open(upper, os.O_DIRECTORY)
    for _ in range(1100):  # deeper than both the recursion limit and 1024 fds
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    for index in range(2000):
        (upper / f"sub{index}").mkdir()
    report = check_upper(upper, workdir, None, repair=False)
    assert report.ok, format_report(report)
    assert report.entries_checked == 1100 + 2000


@pytest.mark.root
def test_uppers_written_by_mounts_check_clean(tmp_path: Path, tmp_layers: object) -> None:
    """Ordinary work through unionfs and kernel overlayfs leaves nothing to report."""
    for system in ("unionfs", "overlay"):
        base = tmp_path / system
        lower = base / "lower"
        lower.mkdir(parents=True)
        (lower / "dir" / "sub").mkdir(parents=True)
        (lower / "dir" / "sub" / "f").write_text("f")
        (lower / "dir" / "g").write_text("g")
        (lower / "h").write_text("h")
        upper, workdir, mnt = base / "upper", base / "work", base / "mnt"
        for path in (upper, workdir, mnt):
            path.mkdir()
        mounted = (
            unionfs_mounted([lower], mnt, upper=upper, workdir=workdir)
            if system == "unionfs"
            else overlay_mounted([lower], mnt, upper=upper, workdir=workdir)
        )
        with mounted:
            os.rename(mnt / "dir", mnt / "moved")
            (mnt / "moved" / "g").unlink()
            (mnt / "h").write_text("new h")
            os.rename(mnt / "h", mnt / "h2")
            (mnt / "moved" / "sub" / "f").unlink()
            os.rmdir(mnt / "moved" / "sub")
            os.mkdir(mnt / "moved" / "sub")
            (mnt / "new").mkdir()
            (mnt / "new" / "x").write_text("x")
        report = check_upper(upper, workdir if system == "unionfs" else None, [lower], repair=False)
        assert report.ok, f"{system}:\n{format_report(report)}"

"""``unionfs.oci.diff_upper`` on crafted uppers (both whiteout formats), digests, redirects."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tests.containers.oci_build import LayerTar, write_oci_layout
from unionfs import oci

IS_ROOT = os.geteuid() == 0
OPAQUE = "trusted.overlay.opaque" if IS_ROOT else "user.overlay.opaque"


def make_upper(root: Path) -> Path:
    """An upper layer using every marker form unionfs reads."""
    root.mkdir()
    (root / "new").write_text("new\n")
    (root / "d").mkdir()
    (root / "d" / "f").write_text("f")
    os.mknod(root / "gone", stat.S_IFCHR | 0o000, 0)  # overlay whiteout
    (root / "d" / ".wh.oldoci").write_text("")  # OCI whiteout
    (root / "opq1").mkdir()
    os.setxattr(root / "opq1", OPAQUE, b"y")
    (root / "opq1" / "inside").write_text("1")
    (root / "opq2").mkdir()
    os.setxattr(root / "opq2", "user.fuseoverlayfs.opaque", b"y")
    (root / "opq3").mkdir()
    (root / "opq3" / ".wh..wh..opq").write_text("")
    os.mknod(root / "opq3" / ".wh..opq", stat.S_IFCHR, 0)  # fuse-overlayfs bookkeeping
    (root / "h1").write_text("linked")
    os.link(root / "h1", root / "h2")
    (root / "x").write_text("x")
    os.setxattr(root / "x", "user.keep", b"kept")
    os.setxattr(root / "x", "user.overlay.origin", b"private")
    if IS_ROOT:
        os.setxattr(root / "x", "trusted.overlay.origin", b"")
    os.symlink("target", root / "s")
    os.mkfifo(root / "p")
    os.chmod(root / "new", 0o640)
    os.utime(root / "new", (1_600_000_000, 1_600_000_000))
    return root


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return {m.name.rstrip("/"): m for m in tar.getmembers()}


def test_diff_members(tmp_path: Path) -> None:
    upper = make_upper(tmp_path / "upper")
    out = tmp_path / "layer.tar"
    result = oci.diff_upper(upper, out, progress=False)
    data = out.read_bytes()
    m = members(data)
    assert sorted(m) == sorted(
        [
            "new", "d", "d/f", "d/.wh.oldoci", ".wh.gone",
            "opq1", "opq1/.wh..wh..opq", "opq1/inside",
            "opq2", "opq2/.wh..wh..opq", "opq3", "opq3/.wh..wh..opq",
            "h1", "h2", "x", "s", "p",
        ]
    )  # fmt: skip
    assert m[".wh.gone"].isreg() and m[".wh.gone"].size == 0
    assert m["d/.wh.oldoci"].isreg()
    assert m["opq1"].isdir() and m["opq1/.wh..wh..opq"].isreg()
    assert m["h2"].islnk() and m["h2"].linkname == "h1"
    assert m["h1"].isreg() and m["h1"].size == len("linked")
    assert m["s"].issym() and m["s"].linkname == "target"
    assert m["p"].isfifo()
    assert m["new"].mode == 0o640 and m["new"].mtime == 1_600_000_000
    assert m["new"].uid == os.getuid()
    xattrs = {k: v for k, v in m["x"].pax_headers.items() if k.startswith("SCHILY.xattr.")}
    assert xattrs == {"SCHILY.xattr.user.keep": "kept"}, "private overlay xattrs must not leak"
    assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert result.diff_id == result.digest and not result.compressed
    assert result.size == len(data)
    assert (result.whiteouts, result.opaque_dirs, result.hardlinks) == (2, 3, 1)
    assert "digest sha256:" in result.summary() and "diff_id sha256:" in result.summary()


def test_diff_is_deterministic_and_gzip_digests(tmp_path: Path) -> None:
    upper = make_upper(tmp_path / "upper")
    plain = oci.diff_upper(upper, tmp_path / "a.tar", progress=False)
    again = oci.diff_upper(upper, tmp_path / "b.tar", progress=False)
    assert plain.digest == again.digest
    zipped = oci.diff_upper(upper, tmp_path / "c.tar.gz", progress=False)
    raw = (tmp_path / "c.tar.gz").read_bytes()
    assert zipped.compressed and raw[:2] == b"\x1f\x8b"
    assert zipped.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert (
        zipped.diff_id
        == plain.diff_id
        == "sha256:" + hashlib.sha256(gzip.decompress(raw)).hexdigest()
    )


def test_diff_to_binary_stream(tmp_path: Path) -> None:
    upper = make_upper(tmp_path / "upper")
    buffer = io.BytesIO()
    result = oci.diff_upper(upper, buffer, progress=False)
    assert result.digest == "sha256:" + hashlib.sha256(buffer.getvalue()).hexdigest()
    assert "new" in members(buffer.getvalue())


def test_diff_then_import_converts_back(tmp_path: Path) -> None:
    """A diff imported on top of an image gives back overlay-format markers."""
    base = LayerTar().file("gone", b"g").dir("opq1").file("opq1/old", b"o").bytes()
    image = write_oci_layout(tmp_path / "img", [base])
    dest = tmp_path / "dest"
    oci.import_image(image, dest, progress=False)
    upper = make_upper(tmp_path / "upper")
    oci.diff_upper(upper, tmp_path / "diff.tar", progress=False)
    result = oci.import_image(tmp_path / "diff.tar", dest, progress=False)
    top = result.layer_dirs[-1]
    st = os.lstat(top / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(top / "opq1", OPAQUE) == b"y"
    assert os.getxattr(top / "opq2", OPAQUE) == b"y"
    assert os.lstat(top / "h1").st_ino == os.lstat(top / "h2").st_ino
    assert os.getxattr(top / "x", "user.keep") == b"kept"


def test_redirected_directory_is_exported_fully(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "old" / "sub").mkdir(parents=True)
    (lower / "old" / "a").write_text("a")
    (lower / "old" / "sub" / "b").write_text("b")
    (lower / "old" / "hidden").write_text("h")
    upper = tmp_path / "upper"
    (upper / "new").mkdir(parents=True)
    redirect = "trusted.overlay.redirect" if IS_ROOT else "user.overlay.redirect"
    os.setxattr(upper / "new", redirect, b"/old")
    os.mknod(upper / "old", stat.S_IFCHR, 0)  # the whiteout the rename left
    os.mknod(upper / "new" / "hidden", stat.S_IFCHR, 0)
    (upper / "new" / "added").write_text("added")
    with pytest.raises(oci.ImageError, match="renamed"):
        oci.diff_upper(upper, tmp_path / "fail.tar", progress=False)
    result = oci.diff_upper(upper, tmp_path / "ok.tar", progress=False, lowers=[lower])
    m = members((tmp_path / "ok.tar").read_bytes())
    assert sorted(m) == sorted(
        [".wh.old", "new", "new/.wh..wh..opq", "new/a", "new/added", "new/sub", "new/sub/b"]
    )
    assert result.redirects == 1
    assert all(not k.startswith("SCHILY.xattr.trusted.overlay") for k in m["new"].pax_headers)


def test_redirect_without_whiteout_adds_one(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "old").mkdir(parents=True)
    (lower / "old" / "a").write_text("a")
    upper = tmp_path / "upper"
    (upper / "new").mkdir(parents=True)
    os.setxattr(upper / "new", "user.overlay.redirect", b"old")
    oci.diff_upper(upper, tmp_path / "ok.tar", progress=False, lowers=[lower])
    m = members((tmp_path / "ok.tar").read_bytes())
    assert ".wh.old" in m and "new/a" in m


def test_missing_upper_is_image_error(tmp_path: Path) -> None:
    with pytest.raises(oci.ImageError):
        oci.diff_upper(tmp_path / "nope", tmp_path / "x.tar", progress=False)
    assert not (tmp_path / "x.tar").exists()


def test_metacopy_file_exports_lower_data(tmp_path: Path) -> None:
    """A metadata-only copy-up: mode from the upper, data from the lower (same path or redirect)."""
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "f").write_bytes(b"lower data")
    (lower / "orig").write_bytes(b"original")
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    prefix = "trusted.overlay." if IS_ROOT else "user.overlay."
    for name, size in (("d/f", 10), ("moved", 8)):
        with (upper / name).open("wb") as f:
            f.truncate(size)
        os.setxattr(upper / name, prefix + "metacopy", b"")
        os.chmod(upper / name, 0o600)
    os.setxattr(upper / "moved", prefix + "redirect", b"/orig")
    with pytest.raises(oci.ImageError, match="metadata-only"):
        oci.diff_upper(upper, tmp_path / "fail.tar", progress=False)
    result = oci.diff_upper(upper, tmp_path / "ok.tar", progress=False, lowers=[lower])
    assert result.metacopies == 2
    with tarfile.open(tmp_path / "ok.tar") as tar:
        for name, data in (("d/f", b"lower data"), ("moved", b"original")):
            member = tar.getmember(name)
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == data
            assert member.mode == 0o600
            assert not any("overlay" in k for k in member.pax_headers)


def test_escaped_overlay_xattr_set_through_the_mount_survives_diff(tmp_path: Path) -> None:
    """An xattr named ``*.overlay.X`` set through the mount is the user's data: the upper stores
    it escaped (``*.overlay.overlay.X``, as Linux >= 6.7 does) and the exported layer carries it
    under the name the mount shows."""
    from tests.support.mounts import unionfs_mounted

    base = tmp_path / "base"
    base.mkdir()
    (base / "f").write_text("f\n")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for directory in (upper, work, mnt):
        directory.mkdir()
    names = ["user.overlay.note"] + (["trusted.overlay.note"] if IS_ROOT else [])
    with unionfs_mounted([base], mnt, upper=upper, workdir=work):
        for name in names:
            os.setxattr(mnt / "f", name, b"mine")
            assert os.getxattr(mnt / "f", name) == b"mine"
    stored = os.listxattr(upper / "f")
    for name in names:
        prefix, rest = name.split(".overlay.")
        assert f"{prefix}.overlay.overlay.{rest}" in stored
    # (a metadata-only copy-up: its data is read from the lower layer)
    result = oci.diff_upper(upper, tmp_path / "layer.tar", progress=False, lowers=[base])
    assert result.members == 1
    f = members((tmp_path / "layer.tar").read_bytes())["f"]
    exported = {k: v for k, v in f.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    for name in names:
        assert exported["SCHILY.xattr." + name] == "mine"
    assert not any(".overlay.overlay." in key for key in exported)

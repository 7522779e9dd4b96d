"""``unionfs.oci.import_image`` on crafted images: formats, conversion, metadata, hostile members.

Every hostile-archive test extracts next to a *canary* directory (a sibling of DEST that the
archive tries to reach) and asserts the canary is byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.containers.oci_build import (
    MTIME,
    LayerTar,
    sha256,
    tar_directory,
    write_docker_archive,
    write_oci_layout,
)
from unionfs import oci
from unionfs.oci import store

IS_ROOT = os.geteuid() == 0


def base_layer() -> bytes:
    return (
        LayerTar()
        .dir("etc", mode=0o755)
        .file("etc/motd", b"hello\n", mode=0o644, uid=12, gid=34)
        .file("etc/secret", b"s", mode=0o600)
        .dir("bin", mode=0o555)
        .file("bin/tool", b"#!/bin/sh\n", mode=0o4755)
        .hardlink("bin/tool-link", "bin/tool")
        .symlink("bin/sh", "tool")
        .symlink("abs", "/etc/motd")
        .dir("old")
        .file("old/a", b"a")
        .file("old/b", b"b")
        .file("gone", b"gone")
        .fifo("pipe")
        .file("attr", b"x", xattrs={"user.color": "blue"})
        .bytes()
    )


def top_layer() -> bytes:
    return (
        LayerTar()
        .whiteout(".wh.gone")
        .dir("old")
        .whiteout("old/.wh..wh..opq")
        .file("old/new", b"new")
        .file("etc/motd", b"changed\n")
        .bytes()
    )


def canary(tmp_path: Path) -> Path:
    c = tmp_path / "canary"
    c.mkdir()
    (c / "precious").write_text("precious\n")
    return c


def canary_state(c: Path) -> list[tuple[str, str]]:
    return sorted(
        (str(p.relative_to(c)), p.read_text() if p.is_file() and not p.is_symlink() else "")
        for p in c.rglob("*")
    )


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# ------------------------------------------------------------------------------ formats


def test_oci_layout_two_layers_base_first(tmp_path: Path) -> None:
    image = write_oci_layout(
        tmp_path / "img", [base_layer(), top_layer()], compression=["gzip", "none"]
    )
    result = oci.import_image(image, tmp_path / "dest", progress=False)
    assert [p.name.split("-")[0] for p in result.layer_dirs] == ["000", "001"]
    assert result.layers[0].diff_id == sha256(base_layer())
    assert result.layers[1].diff_id == sha256(top_layer())
    manifest = json.loads((tmp_path / "dest" / "manifest.json").read_text())
    assert [entry["dir"] for entry in manifest["layers"]] == [
        f"layers/{p.name}" for p in result.layer_dirs
    ]
    assert oci.image_layers(tmp_path / "dest") == result.layer_dirs
    assert oci.image_config(tmp_path / "dest")["Cmd"] == ["/bin/sh"]
    base, top = result.layer_dirs
    assert (base / "etc" / "motd").read_text() == "hello\n"
    assert (top / "etc" / "motd").read_text() == "changed\n"
    assert result.warnings == []


def test_conversion_whiteouts_and_opaque(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "img", [base_layer(), top_layer()])
    top = oci.import_image(image, tmp_path / "dest", progress=False).layer_dirs[1]
    assert is_whiteout(top / "gone"), "'.wh.gone' should become a 0/0 char device"
    assert not (top / ".wh.gone").exists()
    assert not (top / "old" / ".wh..wh..opq").exists()
    attribute = "trusted.overlay.opaque" if IS_ROOT else "user.overlay.opaque"
    assert os.getxattr(top / "old", attribute) == b"y"
    assert (top / "old" / "new").read_text() == "new"


def test_metadata_kept(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "img", [base_layer()])
    base = oci.import_image(image, tmp_path / "dest", progress=False).layer_dirs[0]
    motd = os.lstat(base / "etc" / "motd")
    assert stat.S_IMODE(motd.st_mode) == 0o644 and motd.st_mtime == MTIME
    if IS_ROOT:
        assert (motd.st_uid, motd.st_gid) == (12, 34)
    assert stat.S_IMODE(os.lstat(base / "etc" / "secret").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(base / "bin" / "tool").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(base / "bin").st_mode) == 0o555
    assert os.lstat(base / "bin").st_mtime == MTIME, "dir mtime must be set after its children"
    tool, link = os.lstat(base / "bin" / "tool"), os.lstat(base / "bin" / "tool-link")
    assert (tool.st_ino, tool.st_nlink) == (link.st_ino, 2), "hard link must be kept"
    assert os.readlink(base / "bin" / "sh") == "tool"
    assert os.readlink(base / "abs") == "/etc/motd", "an absolute symlink is data, kept as is"
    assert os.lstat(base / "abs").st_mtime == MTIME
    assert stat.S_ISFIFO(os.lstat(base / "pipe").st_mode)
    assert os.getxattr(base / "attr", "user.color") == b"blue"


def test_docker_save_tarball(tmp_path: Path) -> None:
    archive = write_docker_archive(tmp_path / "save.tar", [base_layer(), top_layer()])
    result = oci.import_image(archive, tmp_path / "dest", progress=False)
    assert len(result.layer_dirs) == 2
    assert is_whiteout(result.layer_dirs[1] / "gone")
    assert result.layers[0].diff_id == sha256(base_layer())


def test_oci_archive_tarball_and_nested_index(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "img", [base_layer(), top_layer()], nested_index=True)
    archive = tar_directory(layout, tmp_path / "img.tar")
    result = oci.import_image(archive, tmp_path / "dest", progress=False)
    assert len(result.layer_dirs) == 2
    assert (result.layer_dirs[0] / "etc" / "motd").read_text() == "hello\n"


def test_bare_layer_is_stacked_on_existing_image(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "img", [base_layer()])
    dest = tmp_path / "dest"
    oci.import_image(image, dest, progress=False)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(LayerTar().file("added", b"1").whiteout("etc/.wh.motd").bytes())
    result = oci.import_image(layer, dest, progress=False)
    assert len(result.layer_dirs) == 2 and len(result.new_layers) == 1
    assert oci.image_layers(dest) == result.layer_dirs
    assert (result.layer_dirs[1] / "added").read_text() == "1"
    assert is_whiteout(result.layer_dirs[1] / "etc" / "motd")
    assert oci.image_config(dest)["Cmd"] == ["/bin/sh"], "config of the base image is kept"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd program not installed")
def test_zstd_layer(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "img", [base_layer()], compression=["zstd"])
    result = oci.import_image(image, tmp_path / "dest", progress=False)
    assert (result.layer_dirs[0] / "etc" / "motd").read_text() == "hello\n"


def test_zstd_without_decoder_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("needs zstd to build the test image")
    image = write_oci_layout(tmp_path / "img", [base_layer()], compression=["zstd"])
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(oci.ImageError, match="zstd"):
        oci.import_image(image, tmp_path / "dest", progress=False)


# ------------------------------------------------------------------------------ broken images


def test_digest_mismatch_is_refused_and_leaves_no_layer(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "img", [base_layer()], compression=["none"])
    blob = next(p for p in (image / "blobs" / "sha256").iterdir() if p.stat().st_size > 2000)
    data = blob.read_bytes()
    assert b"hello\n" in data
    blob.write_bytes(data.replace(b"hello\n", b"HELLO\n"))
    with pytest.raises(oci.ImageError, match="mismatch"):
        oci.import_image(image, tmp_path / "dest", progress=False)
    assert not (tmp_path / "dest").exists(), "the import made dest: it removes it again"


@pytest.mark.parametrize(
    "breakage",
    ["no-index", "bad-json", "missing-blob", "not-a-tar", "dest-not-empty", "bad-digest"],
)
def test_broken_images_raise_image_error(tmp_path: Path, breakage: str) -> None:
    image = write_oci_layout(tmp_path / "img", [base_layer()])
    dest = tmp_path / "dest"
    if breakage == "no-index":
        (image / "index.json").unlink()
    elif breakage == "bad-json":
        (image / "index.json").write_text("{nope")
    elif breakage == "missing-blob":
        index = json.loads((image / "index.json").read_text())
        blobs = image / "blobs" / "sha256"
        manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
        (blobs / manifest["layers"][0]["digest"][7:]).unlink()
    elif breakage == "not-a-tar":
        image = tmp_path / "junk.tar"
        image.write_bytes(b"\x00garbage" * 10)
    elif breakage == "dest-not-empty":
        dest.mkdir()
        (dest / "something").write_text("x")
    elif breakage == "bad-digest":
        index = json.loads((image / "index.json").read_text())
        index["manifests"][0]["digest"] = "sha256:../../../etc/passwd"
        (image / "index.json").write_text(json.dumps(index))
    with pytest.raises(oci.ImageError) as caught:
        oci.import_image(image, dest, progress=False)
    assert caught.value.exit_code == 3
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------ hostile members


def hostile(c: Path) -> dict[str, Callable[[], LayerTar]]:
    rel = os.path.relpath(c, "/")
    return {
        "absolute-path": lambda: LayerTar().file(f"/{rel}/pwned", b"x"),
        "dotdot": lambda: LayerTar().file(f"../../../../../../../{rel}/pwned", b"x"),
        "dotdot-middle": lambda: LayerTar().dir("a").file(f"a/../../{rel}/pwned", b"x"),
        "symlink-parent-absolute": lambda: LayerTar().symlink("link", str(c)).file(
            "link/pwned", b"x"
        ),
        "symlink-parent-relative": lambda: LayerTar().symlink("link", "../../../../../../" + rel)
        .file("link/pwned", b"x"),
        "symlink-parent-nested": lambda: LayerTar().dir("d").symlink("d/l", str(c))
        .dir("d/l/sub").file("d/l/sub/pwned", b"x"),
        "symlink-then-overwrite": lambda: LayerTar().symlink("f", f"{c}/precious")
        .file("f", b"overwritten"),
        "symlink-parent-whiteout": lambda: LayerTar().symlink("link", str(c))
        .whiteout("link/.wh.precious"),
        "symlink-parent-opaque": lambda: LayerTar().symlink("link", str(c))
        .whiteout("link/.wh..wh..opq"),
        "symlink-parent-hardlink": lambda: LayerTar().file("t", b"t").symlink("link", str(c))
        .hardlink("link/pwned", "t"),
        "hardlink-absolute": lambda: LayerTar().hardlink("h", f"/{rel}/precious"),
        "hardlink-dotdot": lambda: LayerTar().hardlink("h", f"../../../../../{rel}/precious"),
        "hardlink-through-symlink": lambda: LayerTar().symlink("link", str(c))
        .hardlink("h", "link/precious"),
        "hardlink-nonexistent": lambda: LayerTar().hardlink("h", "nothere"),
        "hardlink-later-member": lambda: LayerTar().hardlink("h", "later").file("later", b"l"),
        "long-name": lambda: LayerTar().file("n" * 256, b"x"),
        "long-dir-name": lambda: LayerTar().file("d" * 300 + "/f", b"x"),
    }  # fmt: skip


HOSTILE_CASES = list(hostile(Path("/x")))


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_member_never_writes_outside_dest(tmp_path: Path, case: str) -> None:
    c = canary(tmp_path)
    before = canary_state(c)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(hostile(c)[case]().file("ok", b"fine").bytes())
    messages: list[str] = []
    result = oci.import_image(layer, tmp_path / "dest", progress=False, warn=messages.append)
    assert canary_state(c) == before, f"{case} wrote outside DEST"
    root = result.layer_dirs[0]
    assert (root / "ok").read_text() == "fine", "the rest of the layer must still be extracted"
    if case == "symlink-then-overwrite":
        assert (root / "f").read_text() == "overwritten" and not (root / "f").is_symlink()
        return
    if case == "hardlink-later-member":
        assert (root / "later").read_text() == "l"
    assert messages, f"{case}: no warning"
    assert all("\n" not in m for m in messages)
    assert messages == result.warnings
    assert "skipped" in messages[0]
    # Nothing named like the payload exists anywhere in DEST but the allowed ok file.
    assert not any(p.name in ("pwned", "h") for p in (tmp_path / "dest").rglob("*"))


def test_device_nodes_refused_for_unprivileged_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(
        LayerTar().device("null", 1, 3).device("sda", 8, 0, block=True).file("ok", b"1").bytes()
    )
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    messages: list[str] = []
    result = oci.import_image(layer, tmp_path / "dest", progress=False, warn=messages.append)
    root = result.layer_dirs[0]
    assert sorted(os.listdir(root)) == ["ok"]
    assert len(messages) == 2 and all("device node" in m for m in messages), messages


@pytest.mark.root
def test_device_nodes_kept_as_root(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(LayerTar().device("null", 1, 3).bytes())
    root = oci.import_image(layer, tmp_path / "dest", progress=False).layer_dirs[0]
    st = os.lstat(root / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_unprivileged_without_mknod_keeps_oci_whiteouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(store, "can_mknod_whiteout", lambda _fd: False)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(top_layer())
    root = oci.import_image(layer, tmp_path / "dest", progress=False).layer_dirs[0]
    assert (root / ".wh.gone").is_file() and not (root / "gone").exists()
    assert os.getxattr(root / "old", "user.overlay.opaque") == b"y"
    assert not (root / "old" / ".wh..wh..opq").exists()


def test_private_overlay_xattrs_in_image_are_dropped(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(
        LayerTar()
        .dir("d", xattrs={"trusted.overlay.redirect": "/etc", "user.ok": "1"})
        .file("f", b"x", xattrs={"user.overlay.opaque": "y"})
        .bytes()
    )
    messages: list[str] = []
    root = oci.import_image(layer, tmp_path / "dest", progress=False, warn=messages.append)
    d = root.layer_dirs[0] / "d"
    assert os.getxattr(d, "user.ok") == b"1"
    assert "trusted.overlay.redirect" not in os.listxattr(d)
    assert "user.overlay.opaque" not in os.listxattr(root.layer_dirs[0] / "f")
    assert len(messages) == 2


def test_whiteout_does_not_hide_same_layer_entry(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(LayerTar().file("x", b"mine").whiteout(".wh.x").bytes())
    root = oci.import_image(layer, tmp_path / "dest", progress=False).layer_dirs[0]
    assert (root / "x").read_text() == "mine"


def test_later_member_replaces_earlier(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(
        LayerTar().dir("d").file("d/x", b"1").file("d", b"now a file").symlink("s", "a")
        .dir("s").file("s/in", b"2").bytes()
    )  # fmt: skip
    root = oci.import_image(layer, tmp_path / "dest", progress=False).layer_dirs[0]
    assert (root / "d").read_text() == "now a file"
    assert (root / "s").is_dir() and not (root / "s").is_symlink()
    assert (root / "s" / "in").read_text() == "2"


@pytest.mark.root
@pytest.mark.parametrize("how", ["ordinary-user", "user-namespace"])
def test_import_unprivileged_for_real(tmp_path: Path, how: str) -> None:
    """As an ordinary user, and as root of a user namespace (euid 0 but no trusted.* xattrs)."""
    import subprocess
    import tempfile

    from tests.containers.podman_rig import REPO, chown_tree, ensure_test_user, unionfs_python

    if shutil.which("runuser") is None or shutil.which("unshare") is None:
        pytest.skip("runuser and unshare needed")
    uid, gid = ensure_test_user()
    work = Path(tempfile.mkdtemp(prefix="imp-user-", dir="/tmp"))
    try:
        image = write_oci_layout(work / "img", [base_layer(), top_layer()])
        chown_tree(work, uid, gid)
        code = (
            "import sys; from pathlib import Path; from unionfs import oci;"
            f"r = oci.import_image(Path('{image}'), Path('{work}/dest'), progress=False,"
            " warn=lambda m: print('W', m));"
            "print('OK', len(r.layer_dirs))"
        )
        prefix = ["unshare", "-Ur"] if how == "user-namespace" else []
        proc = subprocess.run(
            ["runuser", "-u", "unionfs-ct", "--", *prefix, "env", f"PYTHONPATH={REPO}",
             unionfs_python(), "-c", code],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "OK 2" in proc.stdout, proc.stdout
        layers = sorted((work / "dest" / "layers").iterdir())
        top = layers[1]
        assert is_whiteout(top / "gone") or (top / ".wh.gone").is_file()
        assert os.getxattr(top / "old", "user.overlay.opaque") == b"y"
        base = layers[0]
        assert os.lstat(base / "etc" / "motd").st_uid == uid
        assert os.lstat(base / "bin" / "tool").st_nlink == 2
        if how == "user-namespace":
            assert "owner of" in proc.stdout, "unmapped owners must be reported, not fatal"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_docker_save_with_symlinked_layer(tmp_path: Path) -> None:
    """Old docker save archives point a duplicate layer.tar at another with a symlink."""
    import io
    import tarfile

    archive = write_docker_archive(tmp_path / "save.tar", [base_layer(), top_layer()])
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]  # type: ignore[union-attr]
    manifest = json.loads(next(d for m, d in members if m.name == "manifest.json") or b"")
    layers = manifest[0]["Layers"]
    relinked = tmp_path / "relinked.tar"
    with tarfile.open(relinked, "w") as out:
        for member, data in members:
            if member.name == layers[0]:
                out.addfile(member, io.BytesIO(data or b""))
                other = tarfile.TarInfo("shared/layer.tar")
                other.type = tarfile.SYMTYPE
                other.linkname = "../" + layers[0]
                out.addfile(other)
            elif data is not None:
                out.addfile(member, io.BytesIO(data))
        manifest[0]["Layers"][0] = "shared/layer.tar"
        raw = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(raw)
    with tarfile.open(relinked, "a") as out:
        out.addfile(info, io.BytesIO(raw))
    result = oci.import_image(relinked, tmp_path / "dest", progress=False)
    assert (result.layer_dirs[0] / "etc" / "motd").read_text() == "hello\n"


def test_progress_only_on_a_tty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    image = write_oci_layout(tmp_path / "img", [base_layer(), top_layer()])
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    oci.import_image(image, tmp_path / "a", progress=True)
    assert "\r" in tty.getvalue() and "layer 2/2" in tty.getvalue()
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    oci.import_image(image, tmp_path / "b", progress=True)
    assert plain.getvalue() == ""

"""Data-only lower layers against kernel overlayfs (Linux 6.5+, the composefs design).

A metadata layer holds metacopy files (``trusted.overlay.metacopy``, sparse, the right size)
whose absolute ``trusted.overlay.redirect`` points into a content store: two data-only layers
(``lowerdir=TOP:META::DATA1::DATA2``), searched in order. The kernel and unionfs (the
fuse-overlayfs form with ``::``, the ``lowerdir+=``/``datadir+=`` form and the CLI form with
``--data-layer``) must show the same tree
and contents, must never list or find what only a data-only layer holds (same errno), must
fail the same way on a metacopy file whose data is in no data-only layer (the kernel's lazy
lookup: it shows, opening it fails with ENOENT) or that has no absolute redirect, and must
copy up the same way (an append copies the data from the data-only layer; a chmod copies
the metadata only and the data keeps coming from the data layer).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.support.mounts import fuse_mounted, overlay_mounted, unionfs_mounted
from tests.support.tree import Snapshot, diff_snapshots, snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_overlay"),
              pytest.mark.timeout(180)]  # fmt: skip

KERNEL_OPTIONS = ("metacopy=on", "redirect_dir=on")
CONTENTS = {
    "passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "tool": bytes(range(256)) * 300,  # 76800 bytes
    "share": b"from the second data layer\n",
    "shadowed": b"data1 wins\n",
}


def _kernel_has_data_layers() -> bool:
    release = os.uname().release.split(".")
    try:
        return (int(release[0]), int(release[1].split("-")[0])) >= (6, 5)
    except (ValueError, IndexError):
        return False


def metacopy_file(path: Path, size: int, redirect: str | None, mode: int = 0o644) -> None:
    """A metadata-only file as the kernel writes it: all hole, the data's size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(size)
    path.chmod(mode)
    os.setxattr(path, "trusted.overlay.metacopy", b"")
    if redirect is not None:
        os.setxattr(path, "trusted.overlay.redirect", redirect.encode())


def build_layers(root: Path) -> dict[str, Path]:
    layers = {name: root / name for name in ("top", "meta", "data1", "data2")}
    for path in layers.values():
        path.mkdir(parents=True)
    data1, data2, meta, top = layers["data1"], layers["data2"], layers["meta"], layers["top"]
    (data1 / "objects" / "aa").mkdir(parents=True)
    (data1 / "objects" / "bb").mkdir()
    (data1 / "objects" / "aa" / "1").write_bytes(CONTENTS["passwd"])
    (data1 / "objects" / "bb" / "2").write_bytes(CONTENTS["tool"])
    (data1 / "objects" / "dd").mkdir()
    (data1 / "objects" / "dd" / "4").write_bytes(CONTENTS["shadowed"])
    (data1 / "onlydata").write_bytes(b"only in a data layer\n")
    (data1 / "objects" / "dirobj").mkdir()
    (data1 / "objects" / "lnk").symlink_to("aa/1")
    (data1 / "objects" / "lnkdir").symlink_to("aa")
    (data1 / "orphan").write_bytes(b"found only by name\n")
    (data2 / "objects" / "cc").mkdir(parents=True)
    (data2 / "objects" / "cc" / "3").write_bytes(CONTENTS["share"])
    (data2 / "objects" / "dd").mkdir()
    (data2 / "objects" / "dd" / "4").write_bytes(b"data2 loses\n")
    (data2 / "onlydata2").write_bytes(b"only in the second data layer\n")
    metacopy_file(meta / "etc" / "passwd", len(CONTENTS["passwd"]), "/objects/aa/1")
    metacopy_file(meta / "bin" / "tool", len(CONTENTS["tool"]), "/objects/bb/2", 0o755)
    metacopy_file(meta / "usr" / "share" / "c", len(CONTENTS["share"]), "/objects/cc/3")
    metacopy_file(meta / "shadowed", len(CONTENTS["shadowed"]), "/objects/dd/4")
    metacopy_file(meta / "broken", 5, "/objects/nope")
    metacopy_file(meta / "todir", 5, "/objects/dirobj")  # only a regular file is data
    metacopy_file(meta / "tolink", 5, "/objects/lnk")
    metacopy_file(meta / "viasymlink", 5, "/objects/lnkdir/1")  # never a way through a link
    metacopy_file(meta / "orphan", 19, None)  # no redirect: data layers are not searched
    (meta / "plain").write_bytes(b"ordinary data\n")
    (top / "etc").mkdir()
    (top / "etc" / "motd").write_bytes(b"hello\n")
    metacopy_file(top / "etc" / "hosts", len(CONTENTS["share"]), "/objects/cc/3")
    return layers


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    if not _kernel_has_data_layers():
        pytest.skip(f"data-only lower layers need Linux 6.5+ (this is {os.uname().release})")
    return build_layers(tmp_path / "layers")


def kernel(
    layers: dict[str, Path], mountpoint: Path, upper: Path | None = None
) -> AbstractContextManager[Path]:
    mountpoint.mkdir()
    work = None
    if upper is not None:
        upper.mkdir()
        work = upper.with_name(upper.name + "-work")
        work.mkdir()
    return overlay_mounted(
        [layers["meta"], layers["top"]], mountpoint, upper=upper, workdir=work,
        options=KERNEL_OPTIONS if upper is not None else ("metacopy=on", "redirect_dir=follow"),
        data_layers=[layers["data1"], layers["data2"]],
    )  # fmt: skip


def unionfs(
    layers: dict[str, Path], mountpoint: Path, form: str, upper: Path | None = None
) -> AbstractContextManager[Path]:
    mountpoint.mkdir()
    if form == "cli":
        data = ["--data-layer", str(layers["data1"]), "--data-layer", str(layers["data2"])]
        return unionfs_mounted([layers["meta"], layers["top"]], mountpoint, upper=upper,
                               extra_args=data)  # fmt: skip
    if form == "lowerdir+":  # the kernel's 6.8+ form: one layer per option, top first
        options = [f"lowerdir+={layers['top']}", f"lowerdir+={layers['meta']}",
                   f"datadir+={layers['data1']}", f"datadir+={layers['data2']}"]  # fmt: skip
    else:
        top, meta, data1, data2 = (layers[name] for name in ("top", "meta", "data1", "data2"))
        options = [f"lowerdir={top}:{meta}::{data1}::{data2}"]
    if upper is not None:
        options += [f"upperdir={upper}", f"workdir={upper.with_name(upper.name + '-work')}"]
    log = mountpoint.with_name(mountpoint.name + ".log")
    argv = [sys.executable, "-m", "unionfs", "--log", str(log), "-o", ",".join(options),
            str(mountpoint)]  # fmt: skip
    return fuse_mounted(argv, mountpoint, marker="unionfs", log=log)


def errno_of(path: Path) -> int:
    try:
        os.lstat(path)
    except OSError as error:
        return error.errno or 0
    return 0


def read_result(path: Path) -> bytes | int:
    try:
        return path.read_bytes()
    except OSError as error:
        return error.errno or 0


def observe(root: Path) -> tuple[Snapshot, dict[str, object]]:
    """The tree (never following links), plus what only data-only layers hold and the
    reads of the metacopy files."""
    probes: dict[str, object] = {
        f"lstat {name}": errno_of(root / name)
        for name in ("objects", "onlydata", "onlydata2", "objects/aa/1", "etc/objects")
    }
    probes["root listing"] = sorted(os.listdir(root))
    for name in ("etc/passwd", "bin/tool", "usr/share/c", "shadowed", "broken", "orphan",
                 "etc/hosts", "plain", "todir", "tolink", "viasymlink", "usr/c-moved",
                 "hosts-moved", "lib/passwd"):  # fmt: skip
        probes[f"read {name}"] = read_result(root / name)
        if name == "orphan":
            # Not compared: the kernel fails the lookup of a metacopy file with no data
            # (EIO), unionfs shows it and fails its reads with EIO (as before data-only
            # layers: tests/integration/test_generations.py). Its read is compared above.
            continue
        try:
            st = os.lstat(root / name)
            probes[f"stat {name}"] = (stat.filemode(st.st_mode), st.st_size)
        except OSError as error:
            probes[f"stat {name}"] = error.errno
    return snapshot(root), probes


def assert_same(kernel_view: tuple[Snapshot, dict[str, object]],
                unionfs_view: tuple[Snapshot, dict[str, object]]) -> None:  # fmt: skip
    differences = diff_snapshots(kernel_view[0], unionfs_view[0])
    assert not differences, "\n".join(differences)
    assert unionfs_view[1] == kernel_view[1]


@pytest.mark.parametrize("form", ["overlay form", "lowerdir+", "cli"])
def test_read_only_matches_the_kernel(layers: dict[str, Path], tmp_path: Path, form: str) -> None:
    with kernel(layers, tmp_path / "kernel") as mounted:
        expected = observe(mounted)
    with unionfs(layers, tmp_path / "unionfs", form) as mounted:
        seen = observe(mounted)
        status = subprocess.run([sys.executable, "-m", "unionfs", "status", str(mounted)],
                                capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    assert_same(expected, seen)
    assert f"data-only 0: {layers['data1']}" in status.stdout
    assert f"data-only 1: {layers['data2']}" in status.stdout
    assert str(layers["data1"]) not in status.stdout.split("data-only 0:")[0]  # no lower
    # What the kernel shows, spelled out (so a kernel change cannot silently move the goal).
    probes = expected[1]
    assert probes["read etc/passwd"] == CONTENTS["passwd"]
    assert probes["read bin/tool"] == CONTENTS["tool"]
    assert probes["read usr/share/c"] == CONTENTS["share"]
    assert probes["read shadowed"] == CONTENTS["shadowed"]
    for name in ("broken", "todir", "tolink", "viasymlink"):
        assert probes[f"read {name}"] == errno.ENOENT, name
    assert probes["read orphan"] == errno.EIO  # no absolute redirect: no data-only lookup
    assert "objects" not in probes["root listing"]  # type: ignore[operator]
    assert probes["lstat onlydata"] == errno.ENOENT


def append_errno(path: Path) -> int:
    try:
        with open(path, "ab") as file:
            file.write(b"more")
    except OSError as error:
        return error.errno or 0
    return 0


def write_through(root: Path) -> dict[str, int]:
    """The writes (copy-ups) both sides get; the errno of those meant to fail."""
    failures = {name: append_errno(root / name) for name in ("broken", "todir", "orphan")}
    with open(root / "etc" / "passwd", "ab") as file:
        file.write(b"user:x:1000:1000::/home/user:/bin/sh\n")
    with open(root / "bin" / "tool", "r+b") as file:
        file.seek(100)
        file.write(b"PATCHED")
    os.chmod(root / "usr" / "share" / "c", 0o600)  # metadata only: the data stays below
    os.chmod(root / "etc" / "hosts", 0o640)
    os.utime(root / "shadowed", (1_000_000_000, 1_000_000_000))
    # Renames of metadata-only copies: the upper copy gets a redirect to the old name, whose
    # metacopy file in the metadata layer redirects again, into a data-only layer.
    os.rename(root / "usr" / "share" / "c", root / "usr" / "c-moved")
    os.rename(root / "etc" / "hosts", root / "hosts-moved")
    (root / "lib").mkdir()
    os.rename(root / "etc" / "passwd", root / "lib" / "passwd")  # (copied up with its data)
    return failures


def upper_contents(upper: Path) -> dict[str, bytes | str | None]:
    """Each upper regular file's data, None for a metadata-only one (all hole, metacopy),
    the type of anything else (whiteouts)."""
    found: dict[str, bytes | str | None] = {}
    for directory, _dirs, files in os.walk(upper):
        for name in files:
            path = Path(directory) / name
            key = str(path.relative_to(upper))
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                found[key] = stat.filemode(mode)[0]
                continue
            try:
                os.getxattr(path, "trusted.overlay.metacopy")
                found[key] = None
            except OSError:
                found[key] = path.read_bytes()
    return found


@pytest.mark.parametrize("form", ["overlay form", "cli"])
def test_copy_up_matches_the_kernel(layers: dict[str, Path], tmp_path: Path, form: str) -> None:
    with kernel(layers, tmp_path / "kernel", tmp_path / "kernel-upper") as mounted:
        expected_failures = write_through(mounted)
        expected = observe(mounted)
    with unionfs(layers, tmp_path / "unionfs", form, tmp_path / "unionfs-upper") as mounted:
        failures = write_through(mounted)
        seen = observe(mounted)
    assert failures == expected_failures
    assert expected_failures["broken"] == errno.ENOENT  # no data: the copy-up fails
    assert_same(expected, seen)
    assert expected[1]["read usr/c-moved"] == CONTENTS["share"]
    assert expected[1]["read hosts-moved"] == CONTENTS["share"]
    assert expected[1]["read lib/passwd"] == CONTENTS["passwd"] + (
        b"user:x:1000:1000::/home/user:/bin/sh\n"
    )
    assert upper_contents(tmp_path / "unionfs-upper") == upper_contents(tmp_path / "kernel-upper")
    # And the same again after a remount (the copies now live in the upper).
    with unionfs(layers, tmp_path / "unionfs-again", form, tmp_path / "unionfs-upper") as mounted:
        again = observe(mounted)
    assert_same(expected, again)


def test_kernel_reads_a_unionfs_upper(layers: dict[str, Path], tmp_path: Path) -> None:
    """The upper unionfs writes over data-only layers is one the kernel reads the same."""
    with unionfs(layers, tmp_path / "unionfs", "cli", tmp_path / "upper") as mounted:
        write_through(mounted)
        seen = observe(mounted)
    work = tmp_path / "upper-work-kernel"
    work.mkdir()
    mountpoint = tmp_path / "kernel-over-unionfs-upper"
    mountpoint.mkdir()
    with overlay_mounted(
        [layers["meta"], layers["top"]], mountpoint, upper=tmp_path / "upper", workdir=work,
        options=KERNEL_OPTIONS, data_layers=[layers["data1"], layers["data2"]],
    ) as mounted:  # fmt: skip
        expected = observe(mounted)
    assert_same(expected, seen)


def test_check_finds_data_in_data_layers(layers: dict[str, Path], tmp_path: Path) -> None:
    """``unionfs check --data-layer``: the metadata-only copies a chmod left in the upper
    have their data in a data-only layer, and are dangling without it (or when it is gone)."""
    upper = tmp_path / "upper"
    with unionfs(layers, tmp_path / "unionfs", "cli", upper) as mounted:
        write_through(mounted)
    lowers = ["--lower", str(layers["meta"]), "--lower", str(layers["top"])]
    data = ["--data-layer", str(layers["data1"]), "--data-layer", str(layers["data2"])]

    def check(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "unionfs", "check", *arguments, str(upper)],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    clean = check(*lowers, *data)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    without = check(*lowers)
    assert without.returncode == 1 and "dangling-metacopy" in without.stdout
    dangling = [line for line in without.stdout.splitlines() if "dangling-metacopy" in line]
    assert len(dangling) == 3, without.stdout  # usr/c-moved, hosts-moved, shadowed
    for name in ("/usr/c-moved", "/hosts-moved", "/shadowed"):
        assert any(name in line for line in dangling), without.stdout
    (layers["data2"] / "objects" / "cc" / "3").unlink()  # the content store lost it
    lost = check(*lowers, *data)
    dangling = [line for line in lost.stdout.splitlines() if "dangling-metacopy" in line]
    assert lost.returncode == 1 and len(dangling) == 2, lost.stdout  # the two moved from cc/3

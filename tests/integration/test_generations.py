"""Uppers rotated into the lower layers, through real mounts (issue 11).

An upper holds metadata-only files (``overlay.metacopy``, with ``overlay.redirect`` after a
rename) whose data is in the layers below. Used later as a lower layer (an image layer, a
build step, the next mount's lower) that chain must be followed, generation after
generation, for reads, ``st_blocks``, copy-ups, ``unionfs diff`` and ``unionfs check``.
Before the fix such a file read as zeros and a copy-up wrote the zeros for good.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers
from tests.support.mounts import overlay_mounted, unionfs_mounted
from unionfs.check import check_upper

METACOPY = "trusted.overlay.metacopy" if os.geteuid() == 0 else "user.overlay.metacopy"
PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10244 bytes, no zeros in a row


class Generations:
    """A base layer and the uppers of successive mounts, each rotated into the lowers."""

    def __init__(self, base: Path, root: Path, mountpoint: Path) -> None:
        self.lowers = [base]
        self.root = root
        self.mountpoint = mountpoint
        self.count = 0

    @contextlib.contextmanager
    def next(self) -> Iterator[Path]:
        """Mount the next generation: the lowers so far, a new upper; then rotate it down."""
        self.count += 1
        upper = self.root / f"u{self.count}"
        work = self.root / f"w{self.count}"
        with unionfs_mounted(self.lowers, self.mountpoint, upper=upper, workdir=work) as mnt:
            yield mnt
        self.lowers.append(upper)

    @contextlib.contextmanager
    def read_only(self) -> Iterator[Path]:
        with unionfs_mounted(self.lowers, self.mountpoint) as mnt:
            yield mnt

    @property
    def last_upper(self) -> Path:
        return self.lowers[-1]


@pytest.fixture
def generations(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> Generations:
    (base,) = tmp_layers(
        {"a/foo": PAYLOAD, "a/keep": PAYLOAD, "b/x": PAYLOAD[:100], "c": DIR, "g": PAYLOAD}
    )
    return Generations(base, tmp_path, mountpoint)


def test_renamed_file_reads_its_data_three_generations_later(generations: Generations) -> None:
    """The issue's reproduction: mv a/foo a/bar; rotate; read a/bar, mv a/bar a/foo; rotate;
    read a/foo."""
    with generations.next() as mnt:
        os.rename(mnt / "a/foo", mnt / "a/bar")
        os.chmod(mnt / "a/keep", 0o600)
    assert METACOPY in os.listxattr(generations.last_upper / "a/bar")
    with generations.next() as mnt:
        assert (mnt / "a/bar").read_bytes() == PAYLOAD
        assert (mnt / "a/keep").read_bytes() == PAYLOAD
        assert stat.S_IMODE((mnt / "a/keep").stat().st_mode) == 0o600
        assert (mnt / "a/bar").stat().st_blocks * 512 >= len(PAYLOAD), "st_blocks of zeros"
        os.rename(mnt / "a/bar", mnt / "a/foo")
        os.rename(mnt / "a/keep", mnt / "c/kept")  # absolute redirect, to a chain
    with generations.next() as mnt:
        assert (mnt / "a/foo").read_bytes() == PAYLOAD
        assert (mnt / "c/kept").read_bytes() == PAYLOAD
        os.chmod(mnt / "c/kept", 0o644)  # a third metadata-only copy in the chain
    with generations.read_only() as mnt:
        assert (mnt / "a/foo").read_bytes() == PAYLOAD
        assert (mnt / "c/kept").read_bytes() == PAYLOAD
        assert sorted(os.listdir(mnt / "a")) == ["foo"]


@pytest.mark.parametrize("change", ["append", "write", "truncate", "link", "open_trunc"])
def test_copy_up_of_a_rotated_metacopy_file_copies_its_data(
    change: str, generations: Generations
) -> None:
    """A copy-up in the next generation must bring the real data into the new upper (before
    the fix it copied the zeros of the placeholder, for good)."""
    with generations.next() as mnt:
        os.rename(mnt / "a/foo", mnt / "a/bar")  # metacopy + redirect
    expected = {
        "append": PAYLOAD + b"!",
        "write": PAYLOAD[:5] + b"X" + PAYLOAD[6:],
        "truncate": PAYLOAD[:1000],
        "link": PAYLOAD,
        "open_trunc": b"new",
    }[change]
    with generations.next() as mnt:
        target = mnt / "a/bar"
        if change == "append":
            with open(target, "ab") as handle:
                handle.write(b"!")
        elif change == "write":
            with open(target, "r+b") as handle:
                handle.seek(5)
                handle.write(b"X")
        elif change == "truncate":
            os.truncate(target, 1000)
        elif change == "link":
            os.link(target, mnt / "a/linked")
            assert (mnt / "a/linked").read_bytes() == expected
        else:
            target.write_bytes(b"new")
        assert target.read_bytes() == expected
    upper = generations.last_upper
    assert (upper / "a/bar").read_bytes() == expected, "the new upper got the wrong data"
    assert METACOPY not in os.listxattr(upper / "a/bar")
    with generations.read_only() as mnt:
        assert (mnt / "a/bar").read_bytes() == expected


def test_metacopy_of_a_metacopy_survives_another_rotation(generations: Generations) -> None:
    """chmod and rename of a rotated metadata-only file make a metadata-only copy of it (its
    redirect and origin must again resolve after the next rotation)."""
    with generations.next() as mnt:
        os.rename(mnt / "a/foo", mnt / "a/bar")
        os.rename(mnt / "b", mnt / "moved")  # a renamed directory (redirect) in the chain
    with generations.next() as mnt:
        os.chmod(mnt / "a/bar", 0o640)
        os.rename(mnt / "a/bar", mnt / "c/baz")
        os.rename(mnt / "moved/x", mnt / "x")
    upper = generations.last_upper
    assert METACOPY in os.listxattr(upper / "c/baz") and METACOPY in os.listxattr(upper / "x")
    with generations.next() as mnt:
        assert (mnt / "c/baz").read_bytes() == PAYLOAD
        assert stat.S_IMODE((mnt / "c/baz").stat().st_mode) == 0o640
        assert (mnt / "x").read_bytes() == PAYLOAD[:100]
        with open(mnt / "x", "ab") as handle:
            handle.write(b"+")
    assert (generations.last_upper / "x").read_bytes() == PAYLOAD[:100] + b"+"


@pytest.mark.root
@pytest.mark.usefixtures("require_overlay")
def test_kernel_reads_our_chains_and_we_read_the_kernels(
    generations: Generations, tmp_path: Path
) -> None:
    """Our rotated uppers read the same by kernel overlayfs (metacopy=on, redirect_dir=on),
    and a kernel-written upper rotated into our lowers reads the same by us."""
    with generations.next() as mnt:
        os.rename(mnt / "a/foo", mnt / "a/bar")
    with generations.next() as mnt:
        os.rename(mnt / "a/bar", mnt / "c/baz")
    kernel_mnt = tmp_path / "kernel"
    kernel_upper, kernel_work = tmp_path / "ku", tmp_path / "kw"
    for directory in (kernel_mnt, kernel_upper, kernel_work):
        directory.mkdir()
    with overlay_mounted(
        generations.lowers,
        kernel_mnt,
        upper=kernel_upper,
        workdir=kernel_work,
        options=("metacopy=on", "redirect_dir=on", "index=on"),
    ) as kmnt:
        assert (kmnt / "c/baz").read_bytes() == PAYLOAD
        os.rename(kmnt / "c/baz", kmnt / "c/again")  # the kernel's own metacopy + redirect
        os.chmod(kmnt / "g", 0o600)
    assert METACOPY in os.listxattr(kernel_upper / "c/again")
    generations.lowers.append(kernel_upper)
    with generations.read_only() as mnt:
        assert (mnt / "c/again").read_bytes() == PAYLOAD
        assert (mnt / "g").read_bytes() == PAYLOAD
        assert not (mnt / "c/baz").exists()


def _tar_members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


def _unionfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unionfs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_diff_exports_the_data_of_a_chain(generations: Generations, tmp_path: Path) -> None:
    """``unionfs diff`` of an upper whose metadata-only files point into rotated layers: the
    OCI layer carries the real data (the chain followed), not the placeholder's zeros."""
    with generations.next() as mnt:
        os.rename(mnt / "a/foo", mnt / "a/bar")
        os.rename(mnt / "b", mnt / "moved")
    with generations.next() as mnt:
        os.chmod(mnt / "a/bar", 0o600)
        os.rename(mnt / "moved/x", mnt / "c/x")
        os.rename(mnt / "moved", mnt / "again")
    upper, lowers = generations.last_upper, generations.lowers[:-1]
    out = tmp_path / "layer.tar"
    lower_args = [arg for lower in lowers for arg in ("--lower", str(lower))]
    done = _unionfs("diff", upper, "-o", out, *lower_args)
    assert done.returncode == 0, done.stderr
    members = _tar_members(out)
    assert members["a/bar"] == PAYLOAD
    assert members["c/x"] == PAYLOAD[:100]


def test_check_follows_chains(generations: Generations) -> None:
    """``unionfs check``: a chain that ends in data is fine; without the layer holding the
    data the metadata-only file is reported dangling."""
    with generations.next() as mnt:
        os.rename(mnt / "a/foo", mnt / "a/bar")
    with generations.next() as mnt:
        os.rename(mnt / "a/bar", mnt / "c/baz")
        (mnt / "a/new").write_text("new")
        with open(mnt / "a/new", "a") as handle:  # a plain upper file, then renamed
            handle.write("!")
    upper = generations.last_upper
    report = check_upper(upper, None, generations.lowers[:-1], repair=False)
    assert report.ok, report.found
    broken = check_upper(upper, None, generations.lowers[1:-1], repair=False)
    assert [problem.kind for problem in broken.found] == ["dangling-metacopy"]
    assert broken.found[0].path == "/c/baz"


def test_dangling_chain_fails_reads_with_eio(generations: Generations) -> None:
    """A metadata-only file whose data no lower layer holds (its base layer left out) is
    shown (its metadata is there) but reading it fails with EIO, never zeros."""
    with generations.next() as mnt:
        os.rename(mnt / "a/foo", mnt / "a/bar")
    generations.lowers = generations.lowers[1:]
    with generations.read_only() as mnt:
        assert (mnt / "a/bar").stat().st_size == len(PAYLOAD)
        with pytest.raises(OSError) as raised:
            (mnt / "a/bar").read_bytes()
        assert raised.value.errno == errno.EIO


def test_tar_of_a_rotated_upper_reads_like_the_kernel(generations: Generations) -> None:
    """Through the mount, a tar of a tree made of chains holds the real data."""
    with generations.next() as mnt:
        for name in ("foo", "keep"):
            os.rename(mnt / "a" / name, mnt / "a" / (name + ".1"))
    with generations.read_only() as mnt:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(mnt / "a", arcname="a")
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        for name in ("a/foo.1", "a/keep.1"):
            member = tar.extractfile(name)
            assert member is not None and member.read() == PAYLOAD

"""Lower layers changed under a live mount: `unionfs refresh` and -o watch, through real mounts.

What each kind of entry sees is the README's "Live lower layers" paragraph: a new lower name
appears, a removed one goes, a replaced or rewritten one shows its new content; an open file
keeps the data it opened; a copied-up file never changes; a whiteout keeps hiding the name.
"""

from __future__ import annotations

import errno
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import DIR, Symlink, TmpLayers, run_as, write_layer
from tests.support.mounts import unionfs_mounted

WAIT = 20.0  # seconds a watch test waits for a change to show before it fails


def unionfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unionfs", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def refresh(mnt: Path, path: str = "") -> str:
    result = unionfs("refresh", str(mnt), *([path] if path else []))
    assert result.returncode == 0, result.stderr
    return result.stdout


def replace(path: Path, text: str) -> None:
    """Rewrite a lower file as package managers do: a new file renamed over it."""
    temp = path.with_name(path.name + ".new")
    temp.write_text(text)
    temp.rename(path)


def eventually(check: Callable[[], bool]) -> bool:
    """Poll ``check`` until it holds (the watch works asynchronously); False after WAIT."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def test_refresh_shows_added_removed_and_rewritten_files(tmp_layers: TmpLayers,
                                                         mountpoint: Path) -> None:  # fmt: skip
    base, top = tmp_layers({"f": "one", "gone": "g", "d/k": "k", "inplace": "aa"},
                           {"t": "top"})  # fmt: skip
    with unionfs_mounted([base, top], mountpoint) as mnt:  # read-only: no upper
        assert (mnt / "f").read_text() == "one" and (mnt / "inplace").read_text() == "aa"
        assert sorted(os.listdir(mnt / "d")) == ["k"]
        assert not (mnt / "new").exists()  # the kernel caches this negative answer
        held = open(mnt / "f")  # noqa: SIM115 - kept open across the change
        try:
            (base / "new").write_text("new")
            replace(base / "f", "two, longer")
            (base / "gone").unlink()
            (base / "d" / "k2").write_text("k2")
            (top / "d").mkdir()  # a directory appears in a second layer: the merge grows
            (top / "d" / "t2").write_text("t2")
            with open(base / "inplace", "r+") as inplace:  # same inode, new size
                inplace.write("bbbbbb")
            assert not (mnt / "new").exists() and (mnt / "f").read_text() == "one"  # cached
            assert "invalidated" in refresh(mnt)
            assert (mnt / "new").read_text() == "new"
            assert (mnt / "f").read_text() == "two, longer"
            assert not (mnt / "gone").exists() and "gone" not in os.listdir(mnt)
            assert sorted(os.listdir(mnt / "d")) == ["k", "k2", "t2"]
            assert (mnt / "d" / "t2").read_text() == "t2"
            assert (mnt / "inplace").read_text() == "bbbbbb"
            assert held.read() == "one"  # an open file keeps the file it opened
        finally:
            held.close()


def test_refresh_of_one_path_and_of_a_name_not_shown_yet(tmp_layers: TmpLayers,
                                                         mountpoint: Path) -> None:  # fmt: skip
    (base,) = tmp_layers({"a/b/c": "c", "x": "x", "a/link": Symlink("c")})
    with unionfs_mounted([base], mountpoint) as mnt:
        assert (mnt / "a/b/c").read_text() == "c" and (mnt / "x").read_text() == "x"
        assert not (mnt / "a/b/new").exists()
        (base / "a/b/new").write_text("n")
        replace(base / "x", "x2")
        out = refresh(mnt, "a/b/new")  # not shown yet: its deepest shown ancestor is refreshed
        assert out.startswith("refreshed /a/b:")
        assert (mnt / "a/b/new").read_text() == "n"
        assert (mnt / "x").read_text() == "x"  # outside the refreshed path: still cached
        assert refresh(mnt, "x").startswith("refreshed /x:")
        assert (mnt / "x").read_text() == "x2"
        assert os.readlink(mnt / "a/link") == "c"
        (base / "a/link").unlink()
        (base / "a/link").symlink_to("b/c")
        # the kernel answers user.* xattrs of a symlink itself: its directory is refreshed
        assert refresh(mnt, "a/link").startswith("refreshed /a:")
        assert os.readlink(mnt / "a/link") == "b/c"


def test_copied_up_files_and_whiteouts_do_not_change(tmp_layers: TmpLayers, tmp_path: Path,
                                                     mountpoint: Path) -> None:  # fmt: skip
    (base,) = tmp_layers({"up": "lower", "hidden": "h", "dir/a": "a"})
    upper, work = tmp_path / "up", tmp_path / "work"
    with unionfs_mounted([base], mountpoint, upper=upper, workdir=work) as mnt:
        with open(mnt / "up", "a") as changed:
            changed.write("+mine")
        (mnt / "hidden").unlink()
        os.rename(mnt / "dir", mnt / "moved")
        replace(base / "up", "lower rewritten")
        (base / "hidden").unlink()
        (base / "hidden").write_text("back again")  # the name comes back below the whiteout
        (base / "dir").mkdir(exist_ok=True)
        (base / "dir" / "b").write_text("b")
        refresh(mnt)
        assert (mnt / "up").read_text() == "lower+mine"  # the copy-up hides the lower file
        assert not (mnt / "hidden").exists() and "hidden" not in os.listdir(mnt)
        # a renamed directory still merges the lower directory it came from (its redirect)
        assert sorted(os.listdir(mnt / "moved")) == ["a", "b"]
        assert not (mnt / "dir").exists()  # the rename left a whiteout at the old name


def test_refresh_bad_input(tmp_layers: TmpLayers, tmp_path: Path, mountpoint: Path) -> None:
    (base,) = tmp_layers({"f": "f"})
    gone = unionfs("refresh", str(tmp_path))
    assert gone.returncode == 4 and "is not mounted" in gone.stderr
    assert "Traceback" not in gone.stderr
    with unionfs_mounted([base], mountpoint) as mnt:
        escape = unionfs("refresh", str(mnt), "../x")
        assert escape.returncode == 1 and "'..'" in escape.stderr
        with pytest.raises(OSError) as refused:  # the name is not a settable attribute
            os.setxattr(mnt, "user.unionfs.refresh", b"")
        assert refused.value.errno in (errno.EPERM, errno.EROFS)
        assert "user.unionfs.refresh" not in os.listxattr(mnt)


def test_only_the_owner_may_refresh(shared_tmp: Path,
                                    ordinary_user: pwd.struct_passwd) -> None:  # fmt: skip
    base = write_layer(shared_tmp / "layer", {"f": "f"})
    mountpoint = shared_tmp / "mnt"
    mountpoint.mkdir()
    with unionfs_mounted([base], mountpoint) as mnt:  # root's mount: allow_other
        probe = ("import os, sys\ntry:\n    os.getxattr(sys.argv[1], 'user.unionfs.refresh')\n"
                 "except OSError as e:\n    print(e.errno)\n")  # fmt: skip
        result = run_as(ordinary_user, [sys.executable, "-c", probe, str(mnt)])
        assert result.stdout.strip() == str(errno.EPERM), result.stderr
        assert (mnt / "f").read_text() == "f"


def test_watch_follows_lower_changes(tmp_layers: TmpLayers, tmp_path: Path,
                                     mountpoint: Path) -> None:  # fmt: skip
    base, top = tmp_layers({"f": "one", "gone": "g", "hidden": "h", "mine": "m", "d": DIR},
                           {"t": "t"})  # fmt: skip
    upper, work = tmp_path / "up", tmp_path / "work"
    log = tmp_path / "watch.log"
    with unionfs_mounted([base, top], mountpoint, upper=upper, workdir=work, log=log,
                         options=["watch"]) as mnt:  # fmt: skip
        assert eventually(lambda: "lower directories watched" in log.read_text())
        assert (mnt / "f").read_text() == "one" and not (mnt / "new").exists()
        (mnt / "hidden").unlink()
        with open(mnt / "mine", "a") as mine:
            mine.write("+")
        held = open(mnt / "f")  # noqa: SIM115 - kept open across the change
        try:
            (base / "new").write_text("new")
            replace(base / "f", "two")
            (base / "gone").unlink()
            (base / "hidden").unlink()
            (base / "hidden").write_text("again")
            replace(base / "mine", "lower changed")
            (top / "sub" / "deeper").mkdir(parents=True)  # a new directory is watched too
            assert eventually(lambda: read(mnt / "new") == "new")
            assert eventually(lambda: read(mnt / "f") == "two")
            assert eventually(lambda: not (mnt / "gone").exists())
            assert eventually(lambda: (mnt / "sub" / "deeper").is_dir())
            (top / "sub" / "deeper" / "z").write_text("z")
            assert eventually(lambda: read(mnt / "sub" / "deeper" / "z") == "z")
            (base / "d" / "in-d").write_text("in d")
            assert eventually(lambda: read(mnt / "d" / "in-d") == "in d")
            assert held.read() == "one"
            assert not (mnt / "hidden").exists() and "hidden" not in os.listdir(mnt)
            assert (mnt / "mine").read_text() == "m+"
        finally:
            held.close()
        shown = unionfs("status", str(mnt))
        assert shown.returncode == 0 and "lower directories" in shown.stdout, shown.stderr
        assert "refreshes" in shown.stdout


def test_refresh_under_concurrent_changes_completes(tmp_layers: TmpLayers, tmp_path: Path,
                                                    mountpoint: Path) -> None:  # fmt: skip
    """Refreshes while another thread creates, lists, stats and removes names in the same
    directories: the kernel invalidations (made from a worker thread) never wait on a request
    the daemon cannot answer, so every refresh returns (the mount watchdog fails a hang)."""
    import threading

    (base,) = tmp_layers({f"d/f{index}": str(index) for index in range(50)})
    upper, work = tmp_path / "up", tmp_path / "work"
    with unionfs_mounted([base], mountpoint, upper=upper, workdir=work) as mnt:
        stop = threading.Event()
        failures: list[BaseException] = []

        def busy() -> None:
            step = 0
            try:
                while not stop.is_set():
                    step += 1
                    name = mnt / "d" / f"new{step % 7}"
                    name.write_text(str(step))
                    os.listdir(mnt / "d")
                    (mnt / "d" / f"f{step % 50}").stat()
                    name.unlink()
            except BaseException as error:  # reported below
                failures.append(error)

        worker = threading.Thread(target=busy)
        worker.start()
        try:
            for round_number in range(40):
                (base / "d" / f"lower{round_number}").write_text("l")
                answer = os.getxattr(mnt if round_number % 2 else mnt / "d",
                                     "user.unionfs.refresh")  # fmt: skip
                assert b"invalidated" in answer
        finally:
            stop.set()
            worker.join(timeout=60)
        assert not worker.is_alive() and not failures, failures
        assert (mnt / "d" / "lower39").read_text() == "l"
        assert len([name for name in os.listdir(mnt / "d") if name.startswith("lower")]) == 40

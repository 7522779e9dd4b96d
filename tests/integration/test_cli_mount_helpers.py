"""Self-tests of tests/support/mounts.py: the helpers mount, clean up and fail as documented.

fuse-overlayfs stands in for unionfs here (the same lifecycle: the command returns once the mount is
live, a daemon serves it), so these tests do not depend on unionfs working.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import DIR, OPAQUE, WHITEOUT, Symlink, TmpLayers, mounts
from tests.support.mounts import (
    daemon_pids,
    fuse_mounted,
    fuse_overlayfs_mounted,
    is_mounted,
    mount_entry,
    overlay_mounted,
    run_command,
    unionfs_command,
)


def running(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


needs_fuse_overlayfs = pytest.mark.skipif(
    shutil.which("fuse-overlayfs") is None or not os.access("/dev/fuse", os.R_OK | os.W_OK),
    reason="needs fuse-overlayfs and a usable /dev/fuse (scripts/setup --test, scripts/test)",
)


@needs_fuse_overlayfs
def test_fuse_mount_is_live_inside_and_gone_after(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({"a": "base\n", "d/x": "x\n"}, {"a": "top\n"})
    with fuse_overlayfs_mounted(layers, mountpoint) as mounted:
        assert is_mounted(mounted)
        entry = mount_entry(mounted)
        assert entry is not None and entry.fstype.startswith("fuse")
        assert (mounted / "a").read_text() == "top\n"
        assert (mounted / "d" / "x").read_text() == "x\n"
        pids = daemon_pids(mounted, "fuse-overlayfs")
        assert pids
    assert not is_mounted(mountpoint)
    assert not daemon_pids(mountpoint, "fuse-overlayfs")


@needs_fuse_overlayfs
def test_busy_mount_is_still_removed_when_the_test_fails(
    tmp_layers: TmpLayers, mountpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mounts, "DAEMON_EXIT_TIMEOUT", 2.0)
    layers = tmp_layers({"f": "data\n"})
    with contextlib.ExitStack() as files:
        with (
            pytest.raises(RuntimeError, match="test body failed"),
            fuse_overlayfs_mounted(layers, mountpoint) as mounted,
        ):
            # Open until after teardown: fusermount3 -u fails (busy), -uz detaches the mount,
            # and the daemon, still serving the open file, has to be killed.
            files.enter_context(open(mounted / "f"))
            raise RuntimeError("test body failed")
        assert not is_mounted(mountpoint)
        assert not daemon_pids(mountpoint, "fuse-overlayfs")


@needs_fuse_overlayfs
def test_dead_daemon_mount_is_cleaned_up(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layers = tmp_layers({"f": "data\n"})
    with fuse_overlayfs_mounted(layers, mountpoint) as mounted:
        for pid in daemon_pids(mounted, "fuse-overlayfs"):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(OSError):
            os.stat(mounted / "f")  # ENOTCONN: the mount is still there, its server gone
        assert is_mounted(mounted)
    assert not is_mounted(mountpoint)


@needs_fuse_overlayfs
def test_traceback_in_the_log_fails_the_test(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layers = tmp_layers({"f": "data\n"}, {})
    log = tmp_path / "daemon.log"
    log.write_text("Traceback (most recent call last):\n  boom\n")
    lowerdir = ":".join(str(p) for p in reversed(layers))
    argv = ["fuse-overlayfs", "-o", f"lowerdir={lowerdir}", str(mountpoint)]
    with (
        pytest.raises(AssertionError, match="traceback"),
        fuse_mounted(argv, mountpoint, marker="fuse-overlayfs", log=log),
    ):
        pass
    assert not is_mounted(mountpoint)


def test_failed_mount_command_fails_with_its_stderr(tmp_path: Path, mountpoint: Path) -> None:
    argv = ["sh", "-c", "echo 'no such layer' >&2; exit 3"]
    with (
        pytest.raises(AssertionError, match="no such layer"),
        fuse_mounted(argv, mountpoint, marker="never-matches"),
    ):
        pytest.fail("the body must not run")


def test_unionfs_command_lists_layers_base_first(tmp_path: Path) -> None:
    argv = unionfs_command(
        [tmp_path / "base", tmp_path / "top"],
        tmp_path / "mnt",
        upper=tmp_path / "up",
        workdir=tmp_path / "work",
        options=["ro", "allow_other"],
        log=tmp_path / "log",
    )
    assert argv[1:] == [
        "-m", "unionfs", "mount", "--log", str(tmp_path / "log"),
        "--upper", str(tmp_path / "up"), "--workdir", str(tmp_path / "work"),
        "-o", "ro,allow_other",
        str(tmp_path / "base"), str(tmp_path / "top"), str(tmp_path / "mnt"),
    ]  # fmt: skip


@pytest.mark.root
def test_kernel_overlay_read_only_single_layer(
    require_overlay: None,
    tmp_layers: TmpLayers,
    mountpoint: Path,
) -> None:
    (layer,) = tmp_layers({"f": "data\n", "link": Symlink("f")})
    with overlay_mounted([layer], mountpoint) as mounted:
        assert (mounted / "f").read_text() == "data\n"
        assert os.readlink(mounted / "link") == "f"
        with pytest.raises(OSError):
            (mounted / "new").write_text("x")  # EROFS
    assert not is_mounted(mountpoint)


@pytest.mark.root
def test_kernel_overlay_honours_whiteouts_and_opaque_dirs(
    require_overlay: None,
    tmp_layers: TmpLayers,
    mountpoint: Path,
    tmp_path: Path,
) -> None:
    layers = tmp_layers(
        {"gone": "x", "keep": "k", "opaque/old": "o", "d": DIR},
        {"gone": WHITEOUT, "opaque": OPAQUE, "opaque/new": "n"},
    )
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with overlay_mounted(layers, mountpoint, upper=upper, workdir=work) as mounted:
        assert sorted(os.listdir(mounted)) == ["d", "keep", "opaque"]
        assert os.listdir(mounted / "opaque") == ["new"]
        (mounted / "keep").unlink()
    # The upper layer now holds a 0/0 character device whiteout for "keep".
    status = os.lstat(upper / "keep")
    assert (os.major(status.st_rdev), os.minor(status.st_rdev)) == (0, 0)


@needs_fuse_overlayfs
@pytest.mark.root
def test_watchdog_frees_a_test_blocked_on_a_hung_daemon(
    tmp_layers: TmpLayers, mountpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mounts, "watchdog_seconds", 2.0)
    layers = tmp_layers({"f": "data\n"}, {})
    started = time.monotonic()
    with (
        pytest.raises(AssertionError, match="watchdog"),
        fuse_overlayfs_mounted(layers, mountpoint) as mounted,
    ):
        for pid in daemon_pids(mounted, "fuse-overlayfs"):
            os.kill(pid, signal.SIGSTOP)  # the daemon now answers nothing
        # A lookup of a name the kernel has not cached: blocks until the watchdog aborts.
        with pytest.raises(OSError):
            os.stat(mounted / "never-looked-up")
    assert time.monotonic() - started < 60
    assert not is_mounted(mountpoint)
    assert not daemon_pids(mountpoint, "fuse-overlayfs")


def test_run_command_returns_at_its_timeout_though_a_child_holds_its_output() -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_command(["sh", "-c", "sleep 60 & echo $!; exec sleep 60"], timeout=1)
    assert time.monotonic() - started < 10
    assert isinstance(caught.value.output, str)
    os.kill(int(caught.value.output.split()[0]), signal.SIGKILL)


@needs_fuse_overlayfs
@pytest.mark.root
def test_a_mount_kept_alive_by_another_namespace_is_no_failure(
    tmp_layers: TmpLayers, mountpoint: Path
) -> None:
    layers = tmp_layers({"f": "data\n"}, {})
    holder: subprocess.Popen[bytes] | None = None
    try:
        with fuse_overlayfs_mounted(layers, mountpoint) as mounted:
            pids = daemon_pids(mounted, "fuse-overlayfs")
            # A new mount namespace copies the mount: after the unmount here, the filesystem
            # lives on there, and its daemon keeps serving it.
            holder = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sleep", "60"]
            )
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert not is_mounted(mountpoint)
        assert not any(running(pid) for pid in pids)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()

"""The CLI's mount lifecycle through real mounts: background and foreground mounts, ``umount``,
the fuse-overlayfs command line, an ordinary user, and the example image ``scripts/demo`` shows.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import run_as
from tests.support.mounts import (
    daemon_pids,
    is_mounted,
    mount_entry,
    pid_from_log,
    run_command,
    unionfs_mounted,
    unmount_fuse,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "scripts" / "example"
EXAMPLE_LAYERS = [EXAMPLE / "layers" / name for name in ("1-base", "2-update", "3-app")]

pytestmark = pytest.mark.skipif(
    not os.access("/dev/fuse", os.R_OK | os.W_OK),
    reason="needs a usable /dev/fuse (root, or mode 0666: scripts/test sets it as root)",
)


def tree(root: Path) -> list[str]:
    """``TYPE PATH`` lines as ``find -printf '%y %P'`` prints them, sorted by path."""
    lines = []
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            mode = path.lstat().st_mode
            kind = (
                "l" if stat.S_ISLNK(mode) else "d" if stat.S_ISDIR(mode) else
                "f" if stat.S_ISREG(mode) else "?"
            )  # fmt: skip
            lines.append(f"{kind} {path.relative_to(root)}")
    return sorted(lines, key=lambda line: line.split(" ", 1)[1].encode())


def test_example_image_shows_the_documented_merged_view(mountpoint: Path) -> None:
    expected = (EXAMPLE / "expected-tree.txt").read_text().splitlines()
    with unionfs_mounted(EXAMPLE_LAYERS, mountpoint) as mounted:
        assert tree(mounted) == expected
        assert "2-update (v2)" in (mounted / "usr" / "bin" / "hello").read_text()
        assert os.readlink(mounted / "usr" / "bin" / "hi") == "hello"
        assert (mounted / "srv" / "config").read_text().startswith("listen=8080")
        assert os.listdir(mounted / "opt" / "old") == ["new.txt"]
        assert not (mounted / "etc" / "motd").exists()
        result = subprocess.run(
            [str(mounted / "usr" / "bin" / "hi")], capture_output=True, text=True, timeout=30
        )
        assert result.stdout == "hello from layer 2-update (v2)\n"


def test_mount_shows_as_unionfs_in_proc_mounts(tmp_path: Path, mountpoint: Path) -> None:
    """Type fuse.unionfs-py: unionfs-fuse's mounts are fuse.unionfs, which status must not list."""
    with unionfs_mounted(EXAMPLE_LAYERS[:1], mountpoint) as mounted:
        entry = mount_entry(mounted)
        assert entry is not None
        assert (entry.fstype, entry.source) == ("fuse.unionfs-py", "unionfs")


def test_umount_subcommand_unmounts_and_the_daemon_exits(tmp_path: Path, mountpoint: Path) -> None:
    log = tmp_path / "daemon.log"
    with unionfs_mounted(EXAMPLE_LAYERS, mountpoint, log=log) as mounted:
        pid = pid_from_log(log)
        pids = [pid] if pid else daemon_pids(mounted, "unionfs")
        assert pids, "no daemon found for a live mount"
        result = run_command(
            [sys.executable, "-m", "unionfs", "umount", str(mounted)],
        )
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mounted)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{p}").exists() for p in pids), "daemon still runs after umount"


def test_a_signal_the_moment_the_mount_goes_live_still_unmounts_cleanly(
    tmp_path: Path, mountpoint: Path
) -> None:
    """Found by CI: SIGTERM in the moment between the mount going live and the request loop
    listening for signals took the default action: the daemon died, the mount stayed dead."""
    for attempt in range(5):
        log = tmp_path / f"daemon-{attempt}.log"
        argv = [sys.executable, "-m", "unionfs", "mount", "-f", "--log", str(log)]
        argv += [*map(str, EXAMPLE_LAYERS), str(mountpoint)]
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mountpoint) and process.poll() is None:
                assert time.monotonic() < deadline, "foreground mount not live within 30 s"
            process.send_signal(signal.SIGTERM)  # no pause: as early as the mount is seen
            process.communicate(timeout=15)
            assert process.returncode == 0, f"attempt {attempt}: exit {process.returncode}"
            assert not is_mounted(mountpoint), f"attempt {attempt}: the mount was left behind"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if is_mounted(mountpoint):
                subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_foreground_mount_unmounts_cleanly_on_signal(
    tmp_path: Path, mountpoint: Path, sig: signal.Signals
) -> None:
    log = tmp_path / "daemon.log"
    argv = [sys.executable, "-m", "unionfs", "mount", "-f", "--log", str(log)]
    argv += [*map(str, EXAMPLE_LAYERS), str(mountpoint)]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mountpoint) and process.poll() is None:
            assert time.monotonic() < deadline, "foreground mount not live within 30 s"
            time.sleep(0.05)
        assert process.poll() is None, f"exited early: {process.communicate()}"
        assert (mountpoint / "etc" / "hostname").read_text() == "unionfs-demo\n"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=15)
        assert process.returncode == 0, f"exit {process.returncode}: {stderr}"
        assert "Traceback" not in stderr + log.read_text()
        assert not is_mounted(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        unmount_fuse(mountpoint)


def test_fuse_overlayfs_command_line_lists_lowers_top_first(
    tmp_path: Path, mountpoint: Path
) -> None:
    lowerdir = ":".join(str(layer) for layer in reversed(EXAMPLE_LAYERS))
    result = run_command(
        [sys.executable, "-m", "unionfs", "-o", f"lowerdir={lowerdir}", str(mountpoint)],
    )
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint)
        expected = (EXAMPLE / "expected-tree.txt").read_text().splitlines()
        assert tree(mountpoint) == expected
    finally:
        unmount_fuse(mountpoint, pids=daemon_pids(mountpoint, "unionfs"))


def test_fuse_overlayfs_form_with_upper_writes_there(tmp_path: Path, mountpoint: Path) -> None:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    lowerdir = ":".join(str(layer) for layer in reversed(EXAMPLE_LAYERS))
    options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    result = run_command(
        [sys.executable, "-m", "unionfs", "-o", options, str(mountpoint)],
    )
    try:
        assert result.returncode == 0, result.stderr
        (mountpoint / "new.txt").write_text("new\n")
    finally:
        unmount_fuse(mountpoint, pids=daemon_pids(mountpoint, "unionfs"))
    assert (upper / "new.txt").read_text() == "new\n"


# ---------------------------------------------------------------------------- an ordinary user


def as_user(user: pwd.struct_passwd, *args: str) -> subprocess.CompletedProcess[str]:
    return run_as(user, [sys.executable, "-m", "unionfs", *args])


@pytest.mark.root
def test_ordinary_user_mounts_and_unmounts(
    ordinary_user: pwd.struct_passwd, shared_tmp: Path
) -> None:
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        pytest.skip("/dev/fuse is not usable by ordinary users here (scripts/test makes it 0666)")
    # A copy of the layers the user can surely read (the clone may sit in a private home).
    layers = [
        shutil.copytree(layer, shared_tmp / layer.name, symlinks=True) for layer in EXAMPLE_LAYERS
    ]
    mountpoint = shared_tmp / "mnt"
    mountpoint.mkdir()
    os.chown(mountpoint, ordinary_user.pw_uid, ordinary_user.pw_gid)
    try:
        result = as_user(ordinary_user, "mount", *map(str, layers), str(mountpoint))
        assert result.returncode == 0, result.stderr
        entry = mount_entry(mountpoint)
        assert entry is not None and f"user_id={ordinary_user.pw_uid}" in entry.options
        # Without allow_other only the mounting user may enter the mount (not even root).
        read = run_as(ordinary_user, ["cat", mountpoint / "etc" / "hostname"])
        assert read.stdout == "unionfs-demo\n", read.stderr
        result = as_user(ordinary_user, "umount", str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mountpoint)
    finally:
        unmount_fuse(mountpoint, pids=daemon_pids(mountpoint, "unionfs"))


def _burn_cpu(seconds: float) -> subprocess.Popen[bytes]:
    """A process keeping one CPU busy for ``seconds`` (load for the race below)."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def _mount_lower_filesystem(kind: str, where: Path, image: Path) -> None:
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], check=True)
        return
    if not image.exists():
        if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
            pytest.skip("needs mkfs.ext4 and losetup")
        with open(image, "wb") as file:
            file.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)


def _daemon_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int) -> bool:
    """Bounded wait for the daemon's exit (no timing claim, only that it happens)."""
    for _ in range(600):
        if _daemon_gone(pid):
            return True
        time.sleep(0.05)
    return False


def _mount_stack_on(lowerfs: Path, name: str, mnt: Path, log: Path) -> int:
    layers = lowerfs / name
    for part in ("base", "top", "upper", "work"):
        (layers / part).mkdir(parents=True)
    (layers / "base" / "f").write_text("base\n")
    (layers / "top" / "g").write_text("top\n")
    mounted = subprocess.run(
        [sys.executable, "-m", "unionfs", "mount", "--log", str(log),  # log: not on LOWERFS
         "--upper", str(layers / "upper"), "--workdir", str(layers / "work"),
         str(layers / "base"), str(layers / "top"), str(mnt)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert mounted.returncode == 0, mounted.stderr
    pid = pid_from_log(log)
    assert pid is not None
    return pid


@pytest.mark.root
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["tmpfs", "loop-ext4"])
def test_layers_filesystem_unmounts_while_the_daemon_has_not_exited_yet(
    kind: str, tmp_path: Path
) -> None:
    """The worst case of the race: the daemon is stopped (SIGSTOP) when ``fusermount3 -u``
    returns, so it still holds every layer fd. It reached its layers through private detached
    mount clones, so ``umount LOWERFS`` succeeds anyway (before: EBUSY); once continued, the
    daemon finds its connection gone, closes everything and exits."""
    lowerfs, mnt = tmp_path / "lowerfs", tmp_path / "mnt"
    lowerfs.mkdir()
    mnt.mkdir()
    _mount_lower_filesystem(kind, lowerfs, tmp_path / "lower.img")
    pid = None
    try:
        pid = _mount_stack_on(lowerfs, "stack", mnt, tmp_path / "daemon.log")
        assert (mnt / "f").read_text() == "base\n" and sorted(os.listdir(mnt)) == ["f", "g"]
        os.kill(pid, signal.SIGSTOP)
        unmounted = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True,
                                   text=True, check=False, timeout=30)  # fmt: skip
        assert unmounted.returncode == 0, unmounted.stderr
        lower_gone = subprocess.run(["umount", str(lowerfs)], capture_output=True, text=True,
                                    check=False, timeout=30)  # fmt: skip
        assert lower_gone.returncode == 0, lower_gone.stderr
        os.kill(pid, signal.SIGCONT)
        assert _wait_gone(pid), "the daemon did not exit after its connection ended"
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        unmount_fuse(mnt)
        if is_mounted(lowerfs):
            if pid is not None:
                _wait_gone(pid)
            subprocess.run(["umount", str(lowerfs)], check=False, capture_output=True)


@pytest.mark.root
@pytest.mark.timeout(400)
def test_umount_of_the_layers_filesystem_right_after_fusermount_under_load(
    tmp_path: Path,
) -> None:
    """The same race as it happens: many rounds of mount, copy-up, ``fusermount3 -u`` and an
    immediate ``umount LOWERFS`` on a loaded machine; no round may see EBUSY (before: about one
    in three under load)."""
    lowerfs, mnt = tmp_path / "lowerfs", tmp_path / "mnt"
    lowerfs.mkdir()
    mnt.mkdir()
    burners = [_burn_cpu(300) for _ in range(2)]
    failures: list[str] = []
    try:
        for round_number in range(6):
            _mount_lower_filesystem("tmpfs", lowerfs, tmp_path / "unused.img")
            pid = None
            try:
                log = tmp_path / f"daemon-{round_number}.log"
                pid = _mount_stack_on(lowerfs, "stack", mnt, log)
                (mnt / "f").write_text("changed\n")  # a copy-up: upper and workdir fds too
                (mnt / "new").write_text("new\n")
                os.listdir(mnt)
                unmounted = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True,
                                           text=True, check=False)  # fmt: skip
                assert unmounted.returncode == 0, unmounted.stderr
                lower_gone = subprocess.run(["umount", str(lowerfs)], capture_output=True,
                                            text=True, check=False)  # fmt: skip
                if lower_gone.returncode != 0:
                    failures.append(f"round {round_number}: {lower_gone.stderr.strip()}")
                if not _wait_gone(pid):
                    failures.append(f"round {round_number}: daemon {pid} still running")
            finally:
                unmount_fuse(mnt)
                if is_mounted(lowerfs):
                    if pid is not None:
                        _wait_gone(pid)
                    subprocess.run(["umount", str(lowerfs)], check=False, capture_output=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert failures == []

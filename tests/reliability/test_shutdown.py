"""Clean shutdown: SIGTERM/SIGINT to a foreground (-f) and to a background daemon,
``fusermount3 -u`` while busy (EBUSY, then success after close) and a lazy ``-uz`` while busy.
No data lost (what was written and closed is in the upper), the daemon exits 0, no process is
left behind.

Background daemons are not our children; to learn their exit status a small helper process
makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER) before mounting, so the daemon
is re-parented to it and it can ``waitpid`` the daemon. That needs the daemon forked by the
mount command itself (``UNIONFS_SERVER=0``): a mount server's child is the server's child
(tests/integration/test_server.py checks its exit status in the server's log).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TmpLayers
from tests.support.mounts import daemon_pids, is_mounted, unionfs_command, unmount_fuse

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

REPO = str(Path(__file__).resolve().parents[2])

REAPER = r"""
import ctypes, os, subprocess, sys, json
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
argv, log = json.loads(sys.argv[1]), sys.argv[2]
status = subprocess.run(argv).returncode
print("mounted", status, flush=True)
pid = int(open(log).readline().strip()[4:])
print("daemon", pid, flush=True)
while True:
    try:
        got, code = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if got == pid:
        print("exit", os.waitstatus_to_exitcode(code), flush=True)
        break
"""


def _wait_mounted(mountpoint: Path, process: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + 30
    while not is_mounted(mountpoint):
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            raise AssertionError("the mount did not come up")
        time.sleep(0.05)


def _layout(tmp_layers: TmpLayers, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    (lower,) = tmp_layers({"lower-file": "lower\n"})
    return lower, tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"


def _write_some(mountpoint: Path) -> None:
    with open(mountpoint / "written", "w") as file:
        file.write("closed data\n")
        file.flush()
        os.fsync(file.fileno())
    (mountpoint / "lower-file").write_text("changed\n")


def _assert_data(upper: Path) -> None:
    assert (upper / "written").read_text() == "closed data\n"
    assert (upper / "lower-file").read_text() == "changed\n"


def _no_daemon_left(mountpoint: Path) -> None:
    deadline = time.monotonic() + 10
    while daemon_pids(mountpoint, "unionfs") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon_pids(mountpoint, "unionfs") == []


@pytest.fixture
def foreground(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    lower, upper, workdir, log = _layout(tmp_layers, tmp_path)
    argv = unionfs_command(
        [lower], mountpoint, upper=upper, workdir=workdir, extra_args=["-f"], log=log
    )
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_mounted(mountpoint, process)
        yield process, upper
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        unmount_fuse(mountpoint)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_foreground_daemon(
    foreground: tuple[subprocess.Popen[str], Path], mountpoint: Path, signum: int
) -> None:
    process, upper = foreground
    _write_some(mountpoint)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert not is_mounted(mountpoint)
    _assert_data(upper)
    _no_daemon_left(mountpoint)


@contextlib.contextmanager
def _reaped_mount(
    lower: Path, mountpoint: Path, upper: Path, workdir: Path, log: Path
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Mount in the background under a subreaper (which reports the daemon's exit status);
    yields (reaper, daemon pid); on exit the reaper is killed and the mount undone."""
    argv = unionfs_command([lower], mountpoint, upper=upper, workdir=workdir, log=log)
    reaper = subprocess.Popen(
        [sys.executable, "-c", REAPER, json.dumps(argv), str(log)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, UNIONFS_SERVER="0"),
    )
    pid = None
    try:
        assert reaper.stdout is not None
        assert reaper.stdout.readline().split() == ["mounted", "0"]
        pid = int(reaper.stdout.readline().split()[1])
        _wait_mounted(mountpoint)
        yield reaper, pid
    finally:
        reaper.kill()
        reaper.wait()
        unmount_fuse(mountpoint, pids=[] if pid is None else [pid])


def _daemon_exit(reaper: subprocess.Popen[str]) -> int:
    assert reaper.stdout is not None
    line = reaper.stdout.readline().split()
    reaper.wait(timeout=30)
    assert line[0] == "exit", line
    return int(line[1])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_background_daemon(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path, signum: int
) -> None:
    lower, upper, workdir, log = _layout(tmp_layers, tmp_path)
    with _reaped_mount(lower, mountpoint, upper, workdir, log) as (reaper, pid):
        _write_some(mountpoint)
        os.kill(pid, signum)
        assert _daemon_exit(reaper) == 0
        assert not is_mounted(mountpoint)
        _assert_data(upper)
        assert "Traceback" not in log.read_text()
        _no_daemon_left(mountpoint)


def test_unmount_while_busy_then_after_close(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    lower, upper, workdir, log = _layout(tmp_layers, tmp_path)
    with _reaped_mount(lower, mountpoint, upper, workdir, log) as (reaper, _pid):
        _write_some(mountpoint)
        busy = open(mountpoint / "busy", "w")  # noqa: SIM115
        busy.write("busy data\n")
        result = subprocess.run(
            ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
        )
        assert result.returncode != 0 and "busy" in result.stderr.lower(), result.stderr
        assert is_mounted(mountpoint)
        busy.close()
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        assert _daemon_exit(reaper) == 0
        _assert_data(upper)
        assert (upper / "busy").read_text() == "busy data\n"
        _no_daemon_left(mountpoint)


def test_lazy_unmount_while_busy_loses_nothing(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    lower, upper, workdir, log = _layout(tmp_layers, tmp_path)
    with _reaped_mount(lower, mountpoint, upper, workdir, log) as (reaper, _pid):
        _write_some(mountpoint)
        busy = open(mountpoint / "busy", "w")  # noqa: SIM115
        busy.write("before the lazy unmount\n")
        busy.flush()
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=True)
        assert not is_mounted(mountpoint)  # detached from the namespace ...
        busy.write("after it\n")  # ... but the open file still works
        busy.flush()
        os.fsync(busy.fileno())
        busy.close()
        assert _daemon_exit(reaper) == 0
        assert (upper / "busy").read_text() == "before the lazy unmount\nafter it\n"
        _assert_data(upper)
        _no_daemon_left(mountpoint)

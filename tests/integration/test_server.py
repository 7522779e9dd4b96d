"""The mount server's life cycle, through real mounts (``unionfs.server``, ``unionfs.client``).

Each test gets its own server directory (``UNIONFS_SERVER_DIR``, 0700) and a short idle timeout
(``UNIONFS_SERVER_IDLE``), so it starts, sees and stops its own server only. What is checked:
the first background mount starts the server and its child serves the mount; the last unmount
lets the server exit; a killed server leaves its mounts serving (they unmount cleanly later and
their processes are reaped, no zombie left); a mount child exits when its mount goes; the child
takes over its client's working directory, umask, environment, soft limits and command line;
errors come back through the server with the usual exit codes; ``-f``, ``UNIONFS_SERVER=0`` and
an unusable server directory run the mount in the command itself; concurrent first mounts start
one server; an ordinary user gets a server of their own, which root cannot use and which cannot
use root's.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import pwd
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import run_as
from tests.support.mounts import (
    is_mounted,
    pid_from_log,
    run_command,
    unionfs_command,
    unionfs_mounted,
    unmount_fuse,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not os.access("/dev/fuse", os.R_OK | os.W_OK),
        reason="needs a usable /dev/fuse (root, or mode 0666: scripts/test sets it as root)",
    ),
]

WAIT = 30.0
IDLE = "0.5"


def wait_for(condition: object, what: str, timeout: float = WAIT) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def proc_exists(pid: int) -> bool:
    """True while /proc/PID exists: alive, or a zombie nobody has reaped."""
    return os.path.exists(f"/proc/{pid}")


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def parent_of(pid: int) -> int:
    return int(status_field(pid, "PPid"))


def is_server(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"unionfs-server"
    except OSError:
        return False


class ServerDir:
    """A private directory for one test's mount servers."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def logs(self) -> list[Path]:
        return sorted(self.path.glob("s-*.log"))

    def log_text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs())

    def sockets(self) -> list[Path]:
        return [path for path in self.path.glob("s-*") if path.is_socket()]

    def server_pids(self) -> list[int]:
        """Every server started here (first line of each log: ``... pid=N serving ...``)."""
        pids = []
        for line in self.log_text().splitlines():
            if " serving " in line:
                pids.append(int(line.split("pid=", 1)[1].split()[0]))
        return pids

    def live_servers(self) -> list[int]:
        return [pid for pid in self.server_pids() if proc_exists(pid) and is_server(pid)]

    def stop_all(self) -> None:
        for pid in self.live_servers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not self.live_servers(), "the test's servers to stop")


@pytest.fixture
def server_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerDir]:
    path = tmp_path / "server"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("UNIONFS_SERVER_DIR", str(path))
    monkeypatch.setenv("UNIONFS_SERVER_IDLE", IDLE)
    monkeypatch.delenv("UNIONFS_SERVER", raising=False)
    directory = ServerDir(path)
    try:
        yield directory
    finally:
        directory.stop_all()


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    path = tmp_path / "layer"
    (path / "dir").mkdir(parents=True)
    (path / "file").write_text("lower\n")
    (path / "dir" / "nested").write_text("nested\n")
    return path


def child_of(log: Path) -> int:
    pid = pid_from_log(log)
    assert pid is not None, f"no pid=N first line in {log}"
    return pid


# ---------------------------------------------------------------------------- life cycle


def test_first_mount_starts_the_server_last_unmount_lets_it_exit(
    server_dir: ServerDir, layer: Path, tmp_path: Path
) -> None:
    assert server_dir.live_servers() == []
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    with unionfs_mounted([layer], first, upper=tmp_path / "u1", workdir=tmp_path / "w1"):
        (server,) = server_dir.live_servers()
        child = child_of(first.with_name("first.unionfs.log"))
        assert parent_of(child) == server, "the mount is not served by a child of the server"
        assert child != server
        assert (first / "file").read_text() == "lower\n"
        with unionfs_mounted([layer], second):
            other = child_of(second.with_name("second.unionfs.log"))
            assert parent_of(other) == server, "a second mount started a second server"
            assert other != child
            assert (second / "dir" / "nested").read_text() == "nested\n"
        wait_for(lambda: not proc_exists(other), "the second mount's child to exit")
        (first / "file").write_text("changed\n")
        assert server_dir.live_servers() == [server], "the server left while a mount was live"
    wait_for(lambda: not proc_exists(child), "the first mount's child to exit")
    wait_for(lambda: not server_dir.live_servers(), "the idle server to exit")
    assert server_dir.sockets() == [], "the server left its socket behind"
    assert (tmp_path / "u1" / "file").read_text() == "changed\n"
    text = server_dir.log_text()
    assert f"child {child} (client" in text and "exited with status 0" in text, text
    assert "idle for" in text, text
    assert "Traceback" not in text, text


def test_killed_server_leaves_mounts_serving(
    server_dir: ServerDir, layer: Path, tmp_path: Path
) -> None:
    mountpoints = [tmp_path / "a", tmp_path / "b"]
    children = []
    with contextlib.ExitStack() as stack:
        for index, mountpoint in enumerate(mountpoints):
            mountpoint.mkdir()
            stack.enter_context(
                unionfs_mounted(
                    [layer],
                    mountpoint,
                    upper=tmp_path / f"u{index}",
                    workdir=tmp_path / f"w{index}",
                )
            )
            children.append(child_of(mountpoint.with_name(mountpoint.name + ".unionfs.log")))
        (server,) = server_dir.live_servers()
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: not is_server(server), "the killed server to go")
        for index, mountpoint in enumerate(mountpoints):
            assert (mountpoint / "file").read_text() == "lower\n"
            (mountpoint / "new").write_text(f"written {index}\n")
            assert sorted(os.listdir(mountpoint)) == ["dir", "file", "new"]
        for child in children:
            assert proc_exists(child) and parent_of(child) != server
        # A mount now starts a new server: the old socket is stale.
        third = tmp_path / "c"
        third.mkdir()
        with unionfs_mounted([layer], third):
            (new_server,) = server_dir.live_servers()
            assert new_server != server
            assert parent_of(child_of(third.with_name("c.unionfs.log"))) == new_server
    # unionfs_mounted unmounted each one with fusermount3 -u and failed if it needed force.
    for child in children:
        wait_for(lambda child=child: not proc_exists(child), f"orphaned child {child} reaped")
    for index in range(2):
        assert (tmp_path / f"u{index}" / "new").read_text() == f"written {index}\n"


def test_a_mount_child_exits_when_its_mount_goes(
    server_dir: ServerDir, layer: Path, mountpoint: Path, tmp_path: Path
) -> None:
    log = tmp_path / "mount.log"
    result = run_command(unionfs_command([layer], mountpoint, log=log))
    assert result.returncode == 0, result.stderr
    child = child_of(log)
    try:
        assert proc_exists(child)
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True, capture_output=True)
        wait_for(lambda: not proc_exists(child), "the child to exit after fusermount3 -u")
    finally:
        unmount_fuse(mountpoint, pids=[child])
    wait_for(
        lambda: f"child {child} (client " in server_dir.log_text(), "the child's exit in the log"
    )
    assert any(
        line.startswith(f"child {child} (client ") and line.endswith("exited with status 0")
        for line in (entry.split(" ", 3)[-1] for entry in server_dir.log_text().splitlines())
    ), server_dir.log_text()


GONE_CLIENT = """
import sys
from unionfs import client

code, context = client.code_identity(), client.process_context()
path = f"{client.runtime_directory()}/s-{client.server_key(code, context)}"
connection = client._connect(path)
if connection is None:
    assert client.start_server(path)
    connection = client._connect(path)
assert connection is not None
client.send(connection, client.request(sys.argv[1:], code, context))
connection.close()  # gone before the answer
"""


def test_a_client_gone_before_the_answer_leaves_a_live_mount(
    server_dir: ServerDir, layer: Path, mountpoint: Path, tmp_path: Path
) -> None:
    """The child's report fails (nobody reads it): the mount stays live and served, and
    unmounts cleanly, as when a mount command is killed once its daemon is on its own."""
    log = tmp_path / "gone.log"
    argv = ["mount", "--log", str(log), str(layer), str(mountpoint)]
    result = run_command([sys.executable, "-c", GONE_CLIENT, *argv])
    assert result.returncode == 0, result.stderr
    try:
        wait_for(lambda: is_mounted(mountpoint), "the mount of a client that went away")
        child = child_of(log)
        assert parent_of(child) in server_dir.live_servers()
        assert (mountpoint / "dir" / "nested").read_text() == "nested\n"
    finally:
        unmount_fuse(mountpoint)
    wait_for(lambda: not proc_exists(child), "the child to exit after the unmount")
    assert "Traceback" not in log.read_text()


def test_concurrent_first_mounts_start_one_server(
    server_dir: ServerDir, layer: Path, tmp_path: Path
) -> None:
    mountpoints = []
    for index in range(4):
        mountpoint = tmp_path / f"m{index}"
        mountpoint.mkdir()
        mountpoints.append(mountpoint)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(
                    lambda m: run_command(unionfs_command([layer], m, log=m.with_suffix(".log"))),
                    mountpoints,
                )
            )
        for result in results:
            assert result.returncode == 0, result.stderr
        servers = server_dir.live_servers()
        assert len(servers) == 1, f"servers: {servers}; log:\n{server_dir.log_text()}"
        for mountpoint in mountpoints:
            assert is_mounted(mountpoint)
            assert parent_of(child_of(mountpoint.with_suffix(".log"))) == servers[0]
            assert (mountpoint / "file").read_text() == "lower\n"
    finally:
        for mountpoint in mountpoints:
            unmount_fuse(mountpoint)


# ---------------------------------------------------------------------------- the client's context


def test_the_child_takes_over_its_clients_context(
    server_dir: ServerDir, layer: Path, tmp_path: Path
) -> None:
    """A second client, in another directory and with another umask, environment (a time zone)
    and soft limit of open files, gets a child with its own (not those of the client that started
    the server). /proc/PID/environ cannot show it: it is the server's original environment."""
    first_cwd, second_cwd = tmp_path / "one", tmp_path / "two"
    for directory in (first_cwd, second_cwd):
        (directory / "mnt").mkdir(parents=True)
    os.symlink(layer, second_cwd / "relative-layer")
    _, hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    python = sys.executable

    def command(cwd: Path, umask: str, soft: int, zone: str, log: str) -> list[str]:
        script = (
            f"umask {umask}; exec prlimit --nofile={soft}:{hard_limit} env TZ={zone} "
            f"{python} -m unionfs mount --log {log} --upper new-upper relative-layer mnt"
        )
        return ["sh", "-c", script]

    os.symlink(layer, first_cwd / "relative-layer")
    first = run_command(command(first_cwd, "022", 200, "UTC0", "first.log"), cwd=first_cwd)
    assert first.returncode == 0, first.stderr
    try:
        second = run_command(
            command(second_cwd, "077", 123, "UNIONFS-7", "second.log"), cwd=second_cwd
        )
        assert second.returncode == 0, second.stderr
        try:
            (server,) = server_dir.live_servers()
            child = child_of(second_cwd / "second.log")
            assert parent_of(child) == server
            assert is_mounted(second_cwd / "mnt")
            assert (second_cwd / "mnt" / "file").read_text() == "lower\n"
            # cwd: relative paths were resolved in the second client's directory
            assert (second_cwd / "new-upper").is_dir()
            # ... and then the daemon left it, so it never keeps the caller's directory busy
            assert os.readlink(f"/proc/{child}/cwd") == "/"
            # umask: the upper was made with 0755 & ~077
            assert (second_cwd / "new-upper").stat().st_mode & 0o777 == 0o700
            assert (first_cwd / "new-upper").stat().st_mode & 0o777 == 0o755
            # environment: the log's times are in the second client's time zone (UTC+7)
            logged = (second_cwd / "second.log").read_text().splitlines()[1][:19]
            offset = calendar.timegm(time.strptime(logged, "%Y-%m-%d %H:%M:%S")) - time.time()
            assert abs(offset - 7 * 3600) < 600, (logged, offset)
            # soft limit of open files
            limits = Path(f"/proc/{child}/limits").read_text().splitlines()
            (line,) = [line for line in limits if line.startswith("Max open files")]
            assert line.split()[3] == "123", line
            # the command line ps shows is the client's
            shown = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            assert [arg for arg in shown if arg][-4:] == [
                b"--upper",
                b"new-upper",
                b"relative-layer",
                b"mnt",
            ]
            assert os.fsencode(python) in shown
        finally:
            unmount_fuse(second_cwd / "mnt")
    finally:
        unmount_fuse(first_cwd / "mnt")


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("case", "code"),
    [("missing layer", 3), ("missing mountpoint", 4), ("bad option value", 2), ("usage", 2)],
)
def test_errors_come_back_through_the_server(
    server_dir: ServerDir, layer: Path, mountpoint: Path, tmp_path: Path, case: str, code: int
) -> None:
    missing = tmp_path / "missing"
    arguments = {
        "missing layer": ["mount", str(missing), str(mountpoint)],
        "missing mountpoint": ["mount", str(layer), str(missing)],
        "bad option value": ["mount", "--whiteout-format", "bogus", str(layer), str(mountpoint)],
        "usage": ["mount", str(mountpoint)],
    }[case]
    result = run_command([sys.executable, "-m", "unionfs", *arguments])
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("unionfs:"), result.stderr
    assert "Traceback" not in result.stderr
    if code != 2:
        assert len(lines) == 1, result.stderr
    assert not is_mounted(mountpoint)
    wait_for(
        lambda: f"exited with status {code}" in server_dir.log_text(),
        "the server's log to show the child's exit status (else the error did not come through "
        "the server)",
    )


# ---------------------------------------------------------------------------- not through it


def test_foreground_mount_stays_in_the_command(
    server_dir: ServerDir, layer: Path, mountpoint: Path
) -> None:
    argv = unionfs_command([layer], mountpoint, extra_args=["-f"])
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: is_mounted(mountpoint) or process.poll() is not None, "the -f mount")
        assert is_mounted(mountpoint), process.stderr.read() if process.stderr else ""
        assert (mountpoint / "file").read_text() == "lower\n"
        assert server_dir.server_pids() == [], "a foreground mount went through a server"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        unmount_fuse(mountpoint)


def test_server_turned_off(
    server_dir: ServerDir,
    layer: Path,
    mountpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UNIONFS_SERVER", "0")
    log = tmp_path / "direct.log"
    with unionfs_mounted([layer], mountpoint, log=log):
        daemon = child_of(log)
        assert not is_server(parent_of(daemon))
        assert (mountpoint / "file").read_text() == "lower\n"
    assert list(server_dir.path.iterdir()) == [], "UNIONFS_SERVER=0 still used the server"


def test_unusable_server_directory_falls_back(
    server_dir: ServerDir, layer: Path, mountpoint: Path, tmp_path: Path
) -> None:
    server_dir.path.chmod(0o755)  # not private: never used
    log = tmp_path / "direct.log"
    with unionfs_mounted([layer], mountpoint, log=log):
        assert not is_server(parent_of(child_of(log)))
        assert (mountpoint / "dir" / "nested").read_text() == "nested\n"
    assert list(server_dir.path.iterdir()) == []


# ---------------------------------------------------------------------------- users


def _user_dir(shared_tmp: Path, user: pwd.struct_passwd, name: str, mode: int) -> Path:
    path = shared_tmp / name
    path.mkdir(mode=mode)
    path.chmod(mode)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


@pytest.mark.root
def test_an_ordinary_user_gets_a_server_of_their_own_apart_from_root(
    ordinary_user: pwd.struct_passwd,
    shared_tmp: Path,
    server_dir: ServerDir,
    layer: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # root's own server, in root's private directory
    root_mount = tmp_path / "root-mnt"
    root_mount.mkdir()
    lower = shared_tmp / "lower"
    lower.mkdir()
    (lower / "file").write_text("shared lower\n")
    with unionfs_mounted([lower], root_mount):
        (root_server,) = server_dir.live_servers()
        (root_socket,) = server_dir.sockets()
        # the user's server, in the user's private directory
        user_dir = _user_dir(shared_tmp, ordinary_user, "user-server", 0o700)
        user_mount = _user_dir(shared_tmp, ordinary_user, "user-mnt", 0o755)
        log = _user_dir(shared_tmp, ordinary_user, "user-files", 0o755) / "user.log"
        monkeypatch.setenv("UNIONFS_SERVER_DIR", str(user_dir))
        result = run_as(
            ordinary_user,
            [
                sys.executable,
                "-m",
                "unionfs",
                "mount",
                "--log",
                str(log),
                str(lower),
                str(user_mount),
            ],
        )
        assert result.returncode == 0, result.stderr
        user_servers = ServerDir(user_dir)
        try:
            child = child_of(log)
            (user_server,) = user_servers.live_servers()
            assert user_server != root_server
            assert parent_of(child) == user_server
            for pid in (child, user_server):
                assert status_field(pid, "Uid").split()[:2] == [str(ordinary_user.pw_uid)] * 2
            read = run_as(ordinary_user, ["cat", str(user_mount / "file")])  # no allow_other
            assert read.stdout == "shared lower\n", read.stderr
            # The user cannot reach root's socket (its directory is closed to them).
            probe = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\n"
                "else:\n    print('connected')\n"
            )
            reach = run_as(ordinary_user, [sys.executable, "-c", probe, str(root_socket)])
            assert reach.stdout.strip() == "refused", reach.stdout + reach.stderr
            # Root can open the user's socket (root passes directory permissions), but the
            # server answers no one but its own user (SO_PEERCRED): no child, no answer.
            (user_socket,) = user_servers.sockets()
            with socket.socket(socket.AF_UNIX) as connection:
                connection.connect(str(user_socket))
                connection.sendall(b"unionfs-mount-server-1\0argv\x000")
                connection.shutdown(socket.SHUT_WR)
                connection.settimeout(WAIT)
                try:
                    answer = connection.recv(16)
                except ConnectionResetError:  # closed with our request unread
                    answer = b""
                assert answer == b"", answer
            wait_for(lambda: "refused pid" in user_servers.log_text(), "the refusal in the log")
            assert (
                f"of uid 0 (this server serves uid {ordinary_user.pw_uid})"
                in user_servers.log_text()
            )
        finally:
            run_as(ordinary_user, ["fusermount3", "-u", str(user_mount)])
            unmount_fuse(user_mount)
            user_servers.stop_all()
        wait_for(lambda: not proc_exists(child), "the user's mount child to exit")

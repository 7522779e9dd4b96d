"""Every CLI error path, through the real CLI: one clear line on stderr, the documented exit code.

Exit codes (README, CONTRACT): 0 ok; 1 unexpected failure; 2 usage error; 3 bad layer/upper/workdir
(missing, not a directory, given twice, upper inside a lower); 4 bad mountpoint (missing, not a
directory, not empty, already mounted, or not mounted for ``umount``); 5 permission denied;
6 /dev/fuse unusable or fusermount3 missing.

Every failed ``mount`` must leave nothing behind: the mountpoint is not mounted and no daemon runs.
The permission and /dev/fuse cases run the CLI as an ordinary user made here with ``useradd``
(root only; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import unionfs
from tests.support import run_as
from tests.support.mounts import daemon_pids, fuse_overlayfs_mounted, is_mounted, run_command

EXIT_USAGE = 2
EXIT_LAYER = 3
EXIT_MOUNTPOINT = 4
EXIT_PERMISSION = 5
EXIT_FUSE = 6

CLI_TIMEOUT = 30


def run_cli(
    *args: str | Path, user: pwd.struct_passwd | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m unionfs ARGS`` with no stdin; as ``user`` (through setpriv) when given."""
    argv = [sys.executable, "-m", "unionfs", *(str(arg) for arg in args)]
    if user is not None:
        return run_as(user, argv, timeout=CLI_TIMEOUT)
    return run_command(argv, timeout=CLI_TIMEOUT, cwd="/")


def assert_clean_error(
    result: subprocess.CompletedProcess[str],
    code: int,
    *,
    mentions: Sequence[str | Path] = (),
) -> str:
    """The run failed with ``code`` and exactly one stderr line, no traceback. Returns the line."""
    report = f"exit {result.returncode}, stderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    assert "Traceback" not in result.stderr + result.stdout, report
    assert result.returncode == code, f"expected exit {code}; got {report}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if code == EXIT_USAGE:
        # One line, or argparse's way: the usage lines, then one "PROG: error: ..." line.
        assert lines, f"a usage error must say what is wrong; got {report}"
        assert len(lines) == 1 or "error:" in lines[-1], report
        return lines[-1]
    assert len(lines) == 1, f"expected one line on stderr; got {report}"
    for text in mentions:
        assert str(text) in lines[0], f"the message should name {text}; got {report}"
    return lines[0]


def assert_nothing_left(mountpoint: Path) -> None:
    assert not is_mounted(mountpoint), f"a failed mount left {mountpoint} mounted"
    assert not daemon_pids(mountpoint, "unionfs"), f"a failed mount left a daemon on {mountpoint}"


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    path = tmp_path / "layer"
    path.mkdir()
    (path / "file").write_text("data\n")
    return path


# ---------------------------------------------------------------------------- version and help


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert unionfs.__version__ in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [["--help"], ["mount", "--help"], ["umount", "--help"], ["-h"], ["mount", "-h"]],
    ids=lambda args: " ".join(args),
)
def test_help_for_every_subcommand(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout.lower(), result.stdout
    assert result.stderr == ""


def subcommands() -> list[str]:
    """The subcommands ``unionfs --help`` lists (the indented names under its COMMAND heading)."""
    result = run_cli("--help")
    return re.findall(r"^    (\w[\w-]*)", result.stdout, flags=re.MULTILINE)


def test_top_level_help_names_the_subcommands() -> None:
    names = subcommands()
    assert "mount" in names and "umount" in names, run_cli("--help").stdout


def test_help_of_each_listed_subcommand() -> None:
    names = subcommands()
    assert names
    for name in names:
        result = run_cli(name, "--help")
        assert result.returncode == 0, f"{name} --help: exit {result.returncode}: {result.stderr}"
        assert f"usage: unionfs {name}" in result.stdout, f"{name} --help:\n{result.stdout}"
        assert "Traceback" not in result.stderr


def test_help_shows_no_argparse_placeholder() -> None:
    assert "==SUPPRESS==" not in run_cli("--help").stdout


def test_mount_help_documents_the_options() -> None:
    result = run_cli("mount", "--help")
    for option in ("--upper", "--workdir", "--foreground", "--log", "-o"):
        assert option in result.stdout, f"{option} missing from mount --help:\n{result.stdout}"


# ---------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["mount"],
        ["mount", "/only-a-mountpoint"],
        ["mount", "--no-such-option", "/a", "/b"],
        ["no-such-command"],
        ["umount"],
        ["mount", "--whiteout-format", "bogus", "/a", "/b"],
    ],
    ids=lambda args: " ".join(args) or "no arguments",
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert_clean_error(run_cli(*args), EXIT_USAGE)


# ---------------------------------------------------------------------------- bad layers


def test_missing_layer(tmp_path: Path, layer: Path, mountpoint: Path) -> None:
    missing = tmp_path / "no-such-layer"
    result = run_cli("mount", layer, missing, mountpoint)
    assert_clean_error(result, EXIT_LAYER, mentions=[missing])
    assert_nothing_left(mountpoint)


def test_layer_that_is_a_file(layer: Path, mountpoint: Path) -> None:
    result = run_cli("mount", layer / "file", mountpoint)
    assert_clean_error(result, EXIT_LAYER, mentions=[layer / "file"])
    assert_nothing_left(mountpoint)


def test_same_layer_twice(layer: Path, mountpoint: Path) -> None:
    result = run_cli("mount", layer, layer, mountpoint)
    assert_clean_error(result, EXIT_LAYER, mentions=[layer])
    assert_nothing_left(mountpoint)


def test_same_layer_twice_by_another_path(tmp_path: Path, layer: Path, mountpoint: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(layer)
    result = run_cli("mount", layer, alias, mountpoint)
    assert_clean_error(result, EXIT_LAYER)
    assert_nothing_left(mountpoint)


def test_upper_inside_a_lower(tmp_path: Path, layer: Path, mountpoint: Path) -> None:
    upper = layer / "upper"
    upper.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("mount", "--upper", upper, "--workdir", work, layer, mountpoint)
    assert_clean_error(result, EXIT_LAYER, mentions=[upper])
    assert_nothing_left(mountpoint)


def test_upper_that_is_a_lower(tmp_path: Path, layer: Path, mountpoint: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("mount", "--upper", layer, "--workdir", work, layer, mountpoint)
    assert_clean_error(result, EXIT_LAYER)
    assert_nothing_left(mountpoint)


def test_upper_that_is_a_file(tmp_path: Path, layer: Path, mountpoint: Path) -> None:
    upper = tmp_path / "upper-file"
    upper.write_text("not a directory\n")
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("mount", "--upper", upper, "--workdir", work, layer, mountpoint)
    assert_clean_error(result, EXIT_LAYER, mentions=[upper])
    assert_nothing_left(mountpoint)


def test_workdir_that_is_a_file(tmp_path: Path, layer: Path, mountpoint: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    work = tmp_path / "work-file"
    work.write_text("not a directory\n")
    result = run_cli("mount", "--upper", upper, "--workdir", work, layer, mountpoint)
    assert_clean_error(result, EXIT_LAYER, mentions=[work])
    assert_nothing_left(mountpoint)


def test_missing_lowerdir_in_the_fuse_overlayfs_form(tmp_path: Path, mountpoint: Path) -> None:
    missing = tmp_path / "no-such-layer"
    result = run_cli("-o", f"lowerdir={missing}", mountpoint)
    assert_clean_error(result, EXIT_LAYER, mentions=[missing])
    assert_nothing_left(mountpoint)


# ---------------------------------------------------------------------------- bad mountpoints


def test_missing_mountpoint(tmp_path: Path, layer: Path) -> None:
    missing = tmp_path / "no-such-mountpoint"
    result = run_cli("mount", layer, missing)
    assert_clean_error(result, EXIT_MOUNTPOINT, mentions=[missing])
    assert not missing.exists()


def test_mountpoint_that_is_a_file(tmp_path: Path, layer: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    result = run_cli("mount", layer, target)
    assert_clean_error(result, EXIT_MOUNTPOINT, mentions=[target])
    assert target.read_text() == "x"


def test_mountpoint_not_empty(layer: Path, mountpoint: Path) -> None:
    (mountpoint / "something").write_text("x")
    result = run_cli("mount", layer, mountpoint)
    assert_clean_error(result, EXIT_MOUNTPOINT, mentions=[mountpoint])
    assert_nothing_left(mountpoint)
    assert os.listdir(mountpoint) == ["something"]


@pytest.mark.skipif(
    shutil.which("fuse-overlayfs") is None or not os.access("/dev/fuse", os.R_OK | os.W_OK),
    reason="needs fuse-overlayfs and a usable /dev/fuse to make a mount (scripts/test)",
)
def test_mountpoint_already_mounted(tmp_path: Path, layer: Path, mountpoint: Path) -> None:
    # Something else is mounted there: fuse-overlayfs over empty layers (so it looks empty).
    empty_lowers = [tmp_path / "empty-1", tmp_path / "empty-2"]
    for path in empty_lowers:
        path.mkdir()
    with fuse_overlayfs_mounted(empty_lowers, mountpoint):
        assert os.listdir(mountpoint) == []
        result = run_cli("mount", layer, mountpoint)
        assert_clean_error(result, EXIT_MOUNTPOINT, mentions=[mountpoint])
        assert not daemon_pids(mountpoint, "unionfs")


def test_umount_of_something_not_mounted(mountpoint: Path) -> None:
    result = run_cli("umount", mountpoint)
    assert_clean_error(result, EXIT_MOUNTPOINT, mentions=[mountpoint])


def test_umount_of_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-mountpoint"
    result = run_cli("umount", missing)
    assert_clean_error(result, EXIT_MOUNTPOINT, mentions=[missing])


# ---------------------------------------------------------------------------- as an ordinary user


@contextlib.contextmanager
def dev_fuse_mode(mode: int) -> Iterator[None]:
    """Set /dev/fuse's mode for the duration, then restore it."""
    before = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", mode)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", before)


def _user_mountpoint(shared_tmp: Path, user: pwd.struct_passwd) -> Path:
    mountpoint = shared_tmp / "mnt"
    mountpoint.mkdir()
    os.chown(mountpoint, user.pw_uid, user.pw_gid)
    return mountpoint


def _world_readable_layer(shared_tmp: Path) -> Path:
    layer = shared_tmp / "layer"
    layer.mkdir()
    (layer / "file").write_text("data\n")
    return layer


@pytest.mark.root
def test_layer_the_user_may_not_read(ordinary_user: pwd.struct_passwd, shared_tmp: Path) -> None:
    private = shared_tmp / "private-layer"
    private.mkdir(mode=0o700)
    (private / "secret").write_text("x")
    lower = _world_readable_layer(shared_tmp)
    mountpoint = _user_mountpoint(shared_tmp, ordinary_user)
    with dev_fuse_mode(0o666):
        result = run_cli("mount", lower, private, mountpoint, user=ordinary_user)
    assert_clean_error(result, EXIT_PERMISSION, mentions=[private])
    assert_nothing_left(mountpoint)


@pytest.mark.root
def test_layer_inside_a_directory_the_user_may_not_enter(
    ordinary_user: pwd.struct_passwd, shared_tmp: Path
) -> None:
    closed = shared_tmp / "closed"
    closed.mkdir(mode=0o700)
    hidden = closed / "layer"
    hidden.mkdir()
    mountpoint = _user_mountpoint(shared_tmp, ordinary_user)
    with dev_fuse_mode(0o666):
        result = run_cli("mount", hidden, mountpoint, user=ordinary_user)
    assert_clean_error(result, EXIT_PERMISSION, mentions=[hidden])
    assert_nothing_left(mountpoint)


@pytest.mark.root
def test_mountpoint_the_user_may_not_write(
    ordinary_user: pwd.struct_passwd, shared_tmp: Path
) -> None:
    lower = _world_readable_layer(shared_tmp)
    mountpoint = shared_tmp / "root-owned-mnt"
    mountpoint.mkdir(mode=0o755)
    with dev_fuse_mode(0o666):
        result = run_cli("mount", lower, mountpoint, user=ordinary_user)
    assert_clean_error(result, EXIT_PERMISSION, mentions=[mountpoint])
    assert_nothing_left(mountpoint)


@pytest.mark.root
def test_dev_fuse_unusable(ordinary_user: pwd.struct_passwd, shared_tmp: Path) -> None:
    """The user meets a /dev/fuse of mode 0600. Only this command's private mount namespace
    sees that node (bound over /dev/fuse): changing the real one's mode would break every other
    FUSE mount made meanwhile on this machine (other tests', other runs')."""
    lower = _world_readable_layer(shared_tmp)
    mountpoint = _user_mountpoint(shared_tmp, ordinary_user)
    private_node = shared_tmp / "fuse-0600"
    os.mknod(private_node, stat.S_IFCHR | 0o600, os.stat("/dev/fuse").st_rdev)
    os.chmod(private_node, 0o600)
    command = [sys.executable, "-m", "unionfs", "mount", str(lower), str(mountpoint)]
    setpriv = ["setpriv", f"--reuid={ordinary_user.pw_uid}", f"--regid={ordinary_user.pw_gid}"]
    result = run_command(
        [
            *("unshare", "--mount", "--propagation", "private", "--", "sh", "-c"),
            'mount --bind "$1" /dev/fuse && shift && exec "$@"',
            *("sh", str(private_node), "env", "UNIONFS_SERVER=0", *setpriv, "--clear-groups"),
            *command,
        ],
        timeout=CLI_TIMEOUT,
        cwd="/",
    )
    assert_clean_error(result, EXIT_FUSE)
    assert "/dev/fuse" in result.stderr, result.stderr
    assert_nothing_left(mountpoint)

"""Permissions: ordinary users see exactly what the kernel lets them see on the underlying files,
``allow_other`` is off unless asked, an unprivileged mount cannot make a working setuid file or
device, and copy-up never widens permissions.

Root tests that run mounts as two ordinary users (``ufs-rel-a``, ``ufs-rel-b``, created with
``useradd`` when missing and left in place); /dev/fuse is made 0666 for the test and restored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mounts import (
    is_mounted,
    pid_from_log,
    unionfs_command,
    unionfs_mounted,
    unmount_fuse,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

USERS = ("ufs-rel-a", "ufs-rel-b")
REPO = str(Path(__file__).resolve().parents[2])


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
        )
        return pwd.getpwnam(name)


@pytest.fixture(scope="module")
def users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("needs root (creates users)")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    first, second = (ensure_user(name) for name in USERS)
    return first, second


@pytest.fixture
def fuse_for_all() -> Iterator[None]:
    """/dev/fuse usable by ordinary users for the test, restored afterwards."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A scratch directory ordinary users can reach (pytest's tmp dirs are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="unionfs-perm-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_as(
    user: pwd.struct_passwd, code: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` (sys.argv[1:] = args) as ``user``."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "HOME": "/"}
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    if check and result.returncode != 0:
        raise AssertionError(f"as {user.pw_name}: rc {result.returncode}\n{result.stderr}")
    return result


@contextlib.contextmanager
def user_mount(
    user: pwd.struct_passwd,
    layers: list[Path],
    mountpoint: Path,
    *,
    upper: Path | None = None,
    workdir: Path | None = None,
    options: tuple[str, ...] = (),
) -> Iterator[int]:
    """Mount as ``user``; yields the daemon pid; always unmounted (as root)."""
    log = mountpoint.with_name(mountpoint.name + ".log")
    log.write_text("")
    os.chown(log, user.pw_uid, user.pw_gid)
    argv = unionfs_command(
        layers, mountpoint, upper=upper, workdir=workdir, options=options, log=log
    )
    result = subprocess.run(
        argv,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "HOME": "/"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )
    pid = pid_from_log(log)
    try:
        assert result.returncode == 0 and is_mounted(mountpoint), result.stderr
        assert pid is not None
        yield pid
    finally:
        unmount_fuse(mountpoint, pids=[pid] if pid else [])
        text = log.read_text(errors="replace") if log.exists() else ""
        assert "Traceback" not in text, text


PROBE = """
import os, sys, json
out = {}
for path in sys.argv[1:]:
    entry = {}
    for name, mode in (("r", os.R_OK), ("w", os.W_OK), ("x", os.X_OK)):
        entry[name] = os.access(path, mode)
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").close()
        entry["open"] = 0
    except OSError as error:
        entry["open"] = error.errno
    out[os.path.basename(path) or path] = entry
out["/listing"] = sorted(os.listdir(os.path.dirname(sys.argv[1])))
out["/modes"] = [os.lstat(path).st_mode for path in sys.argv[1:]]
print(json.dumps(out, sort_keys=True))
"""


def build_lower(root: Path, owner: pwd.struct_passwd) -> Path:
    lower = root / "lower"
    lower.mkdir()
    os.chmod(lower, 0o755)
    entries = {
        "secret": (0, 0o600),
        "public": (0, 0o644),
        "group-only": (0, 0o640),
        "mine": (owner.pw_uid, 0o600),
        "exec-only": (0, 0o711),
    }
    for name, (uid, mode) in entries.items():
        (lower / name).write_text(f"{name}\n")
        os.chown(lower / name, uid, uid)
        os.chmod(lower / name, mode)
    (lower / "private").mkdir()
    (lower / "private" / "inside").write_text("inside\n")
    os.chmod(lower / "private", 0o700)
    (lower / "open-dir").mkdir()
    os.chmod(lower / "open-dir", 0o755)
    return lower


NAMES = ["secret", "public", "group-only", "mine", "exec-only", "private", "open-dir"]


def probe(user: pwd.struct_passwd, base: Path) -> str:
    return run_as(user, PROBE, *(str(base / name) for name in NAMES)).stdout


def test_user_sees_what_the_kernel_allows(
    users: tuple[pwd.struct_passwd, pwd.struct_passwd], fuse_for_all: None, shared_dir: Path
) -> None:
    user, _other = users
    lower = build_lower(shared_dir, user)
    upper, workdir, mnt = shared_dir / "upper", shared_dir / "work", shared_dir / "mnt"
    for path in (upper, workdir, mnt):
        path.mkdir()
        os.chown(path, user.pw_uid, user.pw_gid)
    direct = probe(user, lower)
    with user_mount(user, [lower], mnt, upper=upper, workdir=workdir) as pid:
        assert Path(f"/proc/{pid}/status").read_text().count(f"\t{user.pw_uid}\t") >= 1
        through = probe(user, mnt)
        assert through == direct
        # A write the kernel refuses on the lower file is refused through the mount too.
        code = run_as(
            user,
            "import sys\ntry:\n open(sys.argv[1], 'a').close()\nexcept OSError as e:"
            "\n print(e.errno)\nelse:\n print(0)",
            str(mnt / "public"),
        ).stdout.strip()
        assert int(code) == errno.EACCES
        assert not (upper / "public").exists()


def test_allow_other_is_off_unless_asked(
    users: tuple[pwd.struct_passwd, pwd.struct_passwd], fuse_for_all: None, shared_dir: Path
) -> None:
    user, other = users
    lower = build_lower(shared_dir, user)
    mnt = shared_dir / "mnt"
    mnt.mkdir()
    os.chown(mnt, user.pw_uid, user.pw_gid)
    listing = (
        "import os, sys\ntry:\n print(len(os.listdir(sys.argv[1])))\n"
        "except OSError as e:\n print(-e.errno)"
    )
    with user_mount(user, [lower], mnt):
        options = [
            line for line in Path("/proc/mounts").read_text().splitlines() if str(mnt) in line
        ]
        assert options and "allow_other" not in options[0]
        assert run_as(user, listing, str(mnt)).stdout.strip() == str(len(NAMES))
        assert run_as(other, listing, str(mnt)).stdout.strip() == str(-errno.EACCES)
    # A root mount that asks for allow_other lets the other user in (permissions still apply).
    with unionfs_mounted([lower], mnt, options=["allow_other"]):
        assert run_as(other, listing, str(mnt)).stdout.strip() == str(len(NAMES))
        assert probe(other, mnt) == probe(other, lower)


def test_unprivileged_mount_has_no_setuid_or_devices(
    users: tuple[pwd.struct_passwd, pwd.struct_passwd], fuse_for_all: None, shared_dir: Path
) -> None:
    user, _other = users
    lower = shared_dir / "lower"
    lower.mkdir()
    shutil.copy("/usr/bin/id", lower / "suid-id")
    os.chown(lower / "suid-id", 0, 0)
    os.chmod(lower / "suid-id", 0o4755)
    os.chmod(lower, 0o755)
    upper, workdir, mnt = shared_dir / "upper", shared_dir / "work", shared_dir / "mnt"
    for path in (upper, workdir, mnt):
        path.mkdir()
        os.chown(path, user.pw_uid, user.pw_gid)
    with user_mount(user, [lower], mnt, upper=upper, workdir=workdir):
        entry = [line for line in Path("/proc/mounts").read_text().splitlines() if str(mnt) in line]
        assert "nosuid" in entry[0].split()[3] and "nodev" in entry[0].split()[3]
        # The root-owned setuid binary runs without privilege through the mount.
        result = subprocess.run(
            [str(mnt / "suid-id"), "-u"],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.strip() == str(user.pw_uid)
        # Devices cannot be made (the kernel refuses mknod without CAP_MKNOD) ...
        made = run_as(
            user,
            "import os, sys, stat\ntry:\n os.mknod(sys.argv[1], stat.S_IFCHR | 0o666,"
            " os.makedev(1, 3))\nexcept OSError as e:\n print(e.errno)\nelse:\n print(0)",
            str(mnt / "null"),
        ).stdout.strip()
        assert int(made) == errno.EPERM
        assert not (upper / "null").exists()
        # ... and a setuid file the user makes is the user's own, in a nosuid mount.
        run_as(
            user,
            "import shutil, os, sys\nshutil.copy('/usr/bin/id', sys.argv[1])\n"
            "os.chmod(sys.argv[1], 0o4755)",
            str(mnt / "my-id"),
        )
        assert os.stat(upper / "my-id").st_uid == user.pw_uid


def test_copy_up_never_widens_permissions(
    users: tuple[pwd.struct_passwd, pwd.struct_passwd], fuse_for_all: None, shared_dir: Path
) -> None:
    user, _other = users
    lower = shared_dir / "lower"
    (lower / "dir").mkdir(parents=True)
    os.chmod(lower, 0o755)
    os.chown(lower / "dir", user.pw_uid, user.pw_gid)  # the user may rename inside it
    os.chmod(lower / "dir", 0o750)
    for name, uid, mode in [
        ("f640", user.pw_uid, 0o640),
        ("f600", user.pw_uid, 0o600),
        ("suid", 0, 0o4755),
        ("sgid", 0, 0o2755),
    ]:
        (lower / "dir" / name).write_text(name)
        os.chown(lower / "dir" / name, uid, uid)
        os.chmod(lower / "dir" / name, mode)
    modes = {}
    # 1. Root mount: everything is copied exactly, set-id bits included.
    root_upper = shared_dir / "root-upper"
    root_work = shared_dir / "root-work"
    mnt = shared_dir / "mnt"
    mnt.mkdir()
    with unionfs_mounted([lower], mnt, upper=root_upper, workdir=root_work):
        for name in ("f640", "f600", "suid", "sgid"):
            os.utime(mnt / "dir" / name, (1, 1))  # metadata copy-up
        (mnt / "dir" / "f640").open("a").close()  # data copy-up
        os.rename(mnt / "dir" / "f600", mnt / "dir" / "f600-moved")
        for name in ("f640", "f600-moved", "suid", "sgid"):
            st = os.stat(root_upper / "dir" / name)
            modes[name] = (stat.S_IMODE(st.st_mode), st.st_uid)
    assert modes == {
        "f640": (0o640, user.pw_uid),
        "f600-moved": (0o600, user.pw_uid),
        "suid": (0o4755, 0),
        "sgid": (0o2755, 0),
    }
    assert stat.S_IMODE(os.stat(root_upper / "dir").st_mode) == 0o750
    # 2. The user's mount: no copy may gain bits; set-id bits of files the user cannot own
    # (chown to root fails) must not survive on the user's own copy.
    upper, workdir = shared_dir / "upper", shared_dir / "work"
    for path in (upper, workdir):
        path.mkdir()
        os.chown(path, user.pw_uid, user.pw_gid)
    os.chown(mnt, user.pw_uid, user.pw_gid)
    with user_mount(user, [lower], mnt, upper=upper, workdir=workdir):
        run_as(
            user,
            "import os, sys\nd = sys.argv[1]\n"
            "open(os.path.join(d, 'f640'), 'a').close()\n"
            "os.rename(os.path.join(d, 'f600'), os.path.join(d, 'f600-moved'))\n"
            "os.rename(os.path.join(d, 'suid'), os.path.join(d, 'suid-moved'))\n"
            "os.rename(os.path.join(d, 'sgid'), os.path.join(d, 'sgid-moved'))\n",
            str(mnt / "dir"),
        )
        for name, widest in [
            ("f640", 0o640),
            ("f600-moved", 0o600),
            ("suid-moved", 0o755),
            ("sgid-moved", 0o755),
        ]:
            st = os.stat(upper / "dir" / name)
            assert stat.S_IMODE(st.st_mode) & ~widest == 0, (name, oct(st.st_mode))
        assert stat.S_IMODE(os.stat(upper / "dir").st_mode) == 0o750


def test_layer_directory_made_unreadable_while_mounted(
    users: tuple[pwd.struct_passwd, pwd.struct_passwd], fuse_for_all: None, shared_dir: Path
) -> None:
    """chmod 000 on a lower directory under a user's live mount: errors (or answers the
    kernel still caches), never a crash or a hang; chmod back and it works again."""
    user, _other = users
    lower = shared_dir / "lower"
    (lower / "dir" / "sub").mkdir(parents=True)
    for index in range(20):
        (lower / "dir" / f"f{index}").write_text(f"{index}\n")
    (lower / "keep").write_text("keep\n")
    for path in [lower, lower / "dir", lower / "dir" / "sub"]:
        os.chmod(path, 0o755)
    upper, workdir, mnt = shared_dir / "upper", shared_dir / "work", shared_dir / "mnt"
    for path in (upper, workdir, mnt):
        path.mkdir()
        os.chown(path, user.pw_uid, user.pw_gid)
    script = (
        "import os, sys, json\nd = sys.argv[1]\nout = []\n"
        "for action in (lambda: os.listdir(d), lambda: open(os.path.join(d, 'f1')).read(),"
        " lambda: open(os.path.join(d, 'f19')).read(),"
        " lambda: open(os.path.join(d, 'new'), 'w').close(),"
        " lambda: os.rename(os.path.join(d, 'f2'), os.path.join(d, 'g2')),"
        " lambda: os.listdir(os.path.join(d, 'sub'))):\n"
        "    try:\n        action()\n        out.append(0)\n"
        "    except OSError as error:\n        out.append(error.errno)\n"
        "print(json.dumps(out))\n"
    )
    with user_mount(user, [lower], mnt, upper=upper, workdir=workdir) as pid:
        assert run_as(user, "import os,sys; print(os.listdir(sys.argv[1]))", str(mnt / "dir"))
        os.chmod(lower / "dir", 0)
        try:
            result = run_as(user, script, str(mnt / "dir")).stdout.strip()
            codes = [int(code) for code in result.strip("[]").split(",")]
            assert set(codes) <= {0, errno.EACCES, errno.ENOENT, errno.EIO}, codes
            assert Path(f"/proc/{pid}").exists(), "the daemon died"
            listing = run_as(
                user, "import os,sys; print(sorted(os.listdir(sys.argv[1])))", str(mnt)
            )
            assert "keep" in listing.stdout
        finally:
            os.chmod(lower / "dir", 0o755)
        result = run_as(user, script, str(mnt / "dir")).stdout.strip()
        assert Path(f"/proc/{pid}").exists()

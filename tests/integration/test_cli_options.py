"""-o options through real mounts: what fuse-overlayfs and mount(8) pass is accepted or refused
in one line before anything is mounted; root's mounts get allow_other and suid as
fuse-overlayfs's do; suid/dev/allow_other as the options say; volatile, userxattr,
static_nlink, noxattrs, redirect_dir=off, fsname; the fuse.unionfs-py type through mount(8).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers, write_layer
from tests.support.mounts import (
    is_mounted,
    mount_entry,
    pid_from_log,
    unionfs_command,
    unionfs_mounted,
    unmount_fuse,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def unionfs(*args: str | Path, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "unionfs", *(str(arg) for arg in args)]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd="/")


def mount_options(mountpoint: Path) -> list[str]:
    entry = mount_entry(mountpoint)
    assert entry is not None
    return entry.options.split(",")


def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         *(str(arg) for arg in argv)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_mount8_and_fstab_options_do_not_fail_the_mount(tmp_layers: TmpLayers,
                                                        mountpoint: Path) -> None:  # fmt: skip
    """relatime, diratime, nodiratime, lazytime, nonempty, rootmode=, blksize= reached libfuse,
    which refused them: the mount failed."""
    (mountpoint / "already-here").write_text("x")
    options = [
        "relatime",
        "diratime",
        "nodiratime",
        "lazytime",
        "nonempty",
        "rootmode=40755",
        "blksize=4096",
        "strictatime",
        "defaults",
        "noauto",
        "_netdev",
        "nofail",
        "x-systemd.automount",
        "context=system_u:object_r:container_file_t:s0",
    ]
    with unionfs_mounted(tmp_layers({"f": "1"}), mountpoint, options=options) as mnt:
        assert (mnt / "f").read_text() == "1"


def test_refused_option_is_one_line_and_mounts_nothing(tmp_layers: TmpLayers,
                                                       mountpoint: Path) -> None:  # fmt: skip
    """max_read=N used to exit 0 and leave no mount."""
    layer = tmp_layers({"f": "1"})[0]
    for option in ("max_read=65536", "blkdev", "xattr_permissions=2", "nfs_export=on"):
        result = unionfs("mount", "-o", option, layer, mountpoint)
        assert result.returncode == 2, (option, result)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not is_mounted(mountpoint)
    overlay_form = unionfs("-o", f"lowerdir={layer},max_read=4096", mountpoint)
    assert overlay_form.returncode == 2 and "max_read" in overlay_form.stderr


def test_unknown_and_degraded_options_warn_once(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layer = tmp_layers({"f": "1"})[0]
    result = unionfs("mount", "-o", "frobnicate,xino=off,xino=off,acl", layer, mountpoint)
    try:
        assert result.returncode == 0, result.stderr
        warnings = result.stderr.splitlines()
        assert len(warnings) == 2 and all(line.startswith("unionfs: warning:") for line in warnings)
        assert not any("acl" in line for line in warnings)  # acl is the behaviour: no warning
    finally:
        unmount_fuse(mountpoint)


@pytest.mark.root
def test_root_mount_lets_every_uid_in_with_normal_permission_checks(shared_tmp: Path) -> None:
    """As root, allow_other (with default_permissions): another uid reads what its permissions
    allow, and only that."""
    layers = [write_layer(shared_tmp / "layer", {"public": "p", "secret": "s", "dir": DIR})]
    os.chmod(layers[0] / "secret", 0o600)
    mountpoint = shared_tmp / "mnt"
    mountpoint.mkdir()
    with unionfs_mounted(layers, mountpoint, upper=shared_tmp / "up") as mnt:
        options = mount_options(mnt)
        assert "allow_other" in options and "default_permissions" in options
        assert as_nobody("cat", mnt / "public").stdout == "p"
        denied = as_nobody("cat", mnt / "secret")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        wrote = as_nobody("sh", "-c", f"echo x > {mnt}/dir/new")
        assert wrote.returncode != 0 and "Permission denied" in wrote.stderr  # 0755 root dir
    with unionfs_mounted(layers, mountpoint, options=["allow_root"]) as mnt:
        # (libfuse mounts allow_root as allow_other and refuses other uids itself)
        refused = as_nobody("cat", mnt / "public")
        assert refused.returncode != 0 and "Permission denied" in refused.stderr


def _suid_id_layer(tmp_path: Path) -> Path:
    layer = tmp_path / "suid-layer"  # tmp_path: shared_tmp, which every user can reach
    layer.mkdir(mode=0o755)
    shutil.copy("/usr/bin/id", layer / "suid-id")
    os.chown(layer / "suid-id", 0, 0)
    os.chmod(layer / "suid-id", 0o4755)
    os.mknod(layer / "null", 0o666 | 0o020000, os.makedev(1, 3))
    return layer


@pytest.mark.root
@pytest.mark.parametrize(
    ("options", "euid", "devices"),
    [
        pytest.param([], "0", False, id="default"),
        pytest.param(["nosuid"], "65534", False, id="nosuid"),
        pytest.param(["nosuid", "suid", "dev"], "0", True, id="last-wins-and-dev"),
        pytest.param(["dev", "nodev"], "0", False, id="nodev"),
    ],
)
def test_suid_and_dev_as_the_options_say(
    shared_tmp: Path, options: list[str], euid: str, devices: bool
) -> None:
    layer = _suid_id_layer(shared_tmp)
    mountpoint = shared_tmp / "mnt"
    mountpoint.mkdir()
    with unionfs_mounted([layer], mountpoint, options=options) as mnt:
        flags = mount_options(mnt)
        assert ("nosuid" in flags) == (euid != "0") and ("nodev" in flags) == (not devices)
        ran = as_nobody(mnt / "suid-id", "-u")
        assert ran.returncode == 0 and ran.stdout.strip() == euid, ran
        opened = subprocess.run(["head", "-c", "0", str(mnt / "null")], capture_output=True,
                                text=True, check=False)  # fmt: skip
        assert (opened.returncode == 0) == devices, opened.stderr


@pytest.mark.root
def test_ordinary_user_gets_nosuid_nodev_and_no_allow_other(
    ordinary_user: object, shared_tmp: Path
) -> None:
    import pwd

    assert isinstance(ordinary_user, pwd.struct_passwd)
    uid = str(ordinary_user.pw_uid)
    layer = write_layer(shared_tmp / "layer", {"f": "1"})
    mnt = shared_tmp / "mnt"
    mnt.mkdir()
    os.chown(mnt, ordinary_user.pw_uid, ordinary_user.pw_gid)
    os.chmod("/dev/fuse", 0o666)
    for option, why in (("suid", "needs root"), ("dev", "needs root")):
        refused = unionfs("mount", "-o", option, layer, mnt, user=uid)
        assert refused.returncode == 5 and why in refused.stderr, refused
        assert refused.stderr.count("\n") == 1
    fuse_conf = Path("/etc/fuse.conf")
    if "user_allow_other" not in (fuse_conf.read_text() if fuse_conf.exists() else ""):
        refused = unionfs("mount", "-o", "allow_other", layer, mnt, user=uid)
        assert refused.returncode == 5 and "user_allow_other" in refused.stderr, refused
    mounted = unionfs("mount", layer, mnt, user=uid)
    assert mounted.returncode == 0, mounted.stderr
    try:
        flags = mount_options(mnt)
        assert "nosuid" in flags and "nodev" in flags and "allow_other" not in flags
    finally:
        unmount_fuse(mnt)


def test_volatile_mark_refuses_an_upper_left_by_a_crash(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layer = tmp_layers({"f": "1"})[0]
    upper, work, log = tmp_path / "up", tmp_path / "work", tmp_path / "daemon.log"
    mark = work / "work" / "incompat" / "volatile"
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work,
                         options=["volatile"]) as mnt:  # fmt: skip
        assert (mark / "dirty").is_file()
        (mnt / "g").write_text("2")
        fd = os.open(mnt / "g", os.O_RDONLY)
        try:
            os.fsync(fd)  # answered without syncing
        finally:
            os.close(fd)
    assert not mark.exists(), "a clean unmount syncs the upper and removes the mark"
    # A crash: the daemon is killed while mounted.
    argv = unionfs_command([layer], mountpoint, upper=upper, workdir=work, options=["volatile"],
                           log=log)  # fmt: skip
    assert subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode == 0
    pid = pid_from_log(log)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(600):
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            break
        time.sleep(0.05)
    unmount_fuse(mountpoint)
    assert mark.exists()
    refused = unionfs("mount", "--upper", upper, "--workdir", work, layer, mountpoint)
    assert refused.returncode == 3 and "volatile" in refused.stderr, refused
    assert refused.stderr.count("\n") == 1 and not is_mounted(mountpoint)
    with unionfs_mounted([layer], mountpoint, upper=upper, workdir=work,
                         options=["reuse_volatile"]) as mnt:  # fmt: skip
        assert (mnt / "g").read_text() == "2"
    assert not mark.exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.root
def test_kernel_volatile_mark_is_honoured(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path, require_overlay: None
) -> None:
    """Kernel overlayfs keeps its mark after umount: unionfs refuses that upper as it would."""
    layer = tmp_layers({"f": "1"})[0]
    upper, work = tmp_path / "up", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={layer},upperdir={upper},workdir={work},volatile", mountpoint],
                   check=True)  # fmt: skip
    (mountpoint / "k").write_text("k")
    subprocess.run(["umount", mountpoint], check=True)
    assert (work / "work" / "incompat" / "volatile").exists()
    refused = unionfs("mount", "--upper", upper, "--workdir", work, layer, mountpoint)
    assert refused.returncode == 3 and "reuse_volatile" in refused.stderr


@pytest.mark.root
def test_userxattr_writes_user_overlay_markers(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layer = tmp_layers({"d/x": "1"})[0]
    upper = tmp_path / "up"
    with unionfs_mounted([layer], mountpoint, upper=upper, options=["userxattr"]) as mnt:
        shutil.rmtree(mnt / "d")
        (mnt / "d").mkdir()
    assert os.getxattr(upper / "d", "user.overlay.opaque") == b"y"
    with pytest.raises(OSError):
        os.getxattr(upper / "d", "trusted.overlay.opaque")


def test_static_nlink_and_noxattrs(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    layer = tmp_layers({"d/a/x": "1", "d/b/y": "2", "f": "3"})[0]
    with unionfs_mounted([layer], mountpoint) as mnt:
        assert (mnt / "d").stat().st_nlink == 4
    with unionfs_mounted([layer], mountpoint, options=["static_nlink", "noxattrs=1"]) as mnt:
        assert (mnt / "d").stat().st_nlink == 1
        for call in (lambda: os.listxattr(mnt / "f"), lambda: os.getxattr(mnt / "f", "user.x")):
            with pytest.raises(OSError) as refused:
                call()
            assert refused.value.errno == errno.ENOTSUP
        assert b"pid" in os.getxattr(mnt, "user.unionfs.status")  # introspection still works


def test_redirect_dir_off_renames_of_lower_dirs_fail_exdev(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    layer = tmp_layers({"lower/x": "1"})[0]
    with unionfs_mounted([layer], mountpoint, upper=tmp_path / "up",
                         options=["redirect_dir=off"]) as mnt:  # fmt: skip
        with pytest.raises(OSError) as refused:
            os.rename(mnt / "lower", mnt / "moved")
        assert refused.value.errno == errno.EXDEV
        (mnt / "mine").mkdir()
        os.rename(mnt / "mine", mnt / "mine2")  # a directory only in the upper moves
        assert (mnt / "mine2").is_dir() and (mnt / "lower" / "x").read_text() == "1"


def test_fsname_is_the_source(tmp_layers: TmpLayers, mountpoint: Path) -> None:
    with unionfs_mounted(tmp_layers({"f": "1"}), mountpoint, options=["fsname=myimage"]) as mnt:
        entry = mount_entry(mnt)
        assert entry is not None and (entry.source, entry.fstype) == ("myimage", "fuse.unionfs-py")


@pytest.mark.root
def test_mount_t_and_fstab_reach_unionfs_not_unionfs_fuse(tmp_layers: TmpLayers,
                                                         mountpoint: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    """mount.fuse3 runs /usr/bin/unionfs (unionfs-fuse) for type fuse.unionfs; our type has its
    own mount(8) helper, installed by scripts/setup (reinstalled here for this clone)."""
    if shutil.which("mount") is None:
        pytest.skip("mount(8) missing")
    installed = subprocess.run([str(REPO / "scripts" / "containers-mount-helper")],
                               capture_output=True, text=True, check=False)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    layers = tmp_layers({"a": "base"}, {"b": "top"})
    upper, work = tmp_path / "up", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    options = f"lowerdir={layers[1]}:{layers[0]},upperdir={upper},workdir={work},relatime,nosuid"
    fake = subprocess.run(
        ["mount", "-f", "-t", "fuse.unionfs-py", "unionfs", str(mountpoint), "-o", options],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fake.returncode == 0 and not is_mounted(mountpoint), fake.stderr
    result = subprocess.run(
        ["mount", "-t", "fuse.unionfs-py", "unionfs", str(mountpoint), "-o", options],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    try:
        assert result.returncode == 0, result.stderr
        entry = mount_entry(mountpoint)
        assert entry is not None and entry.fstype == "fuse.unionfs-py"
        assert "nosuid" in entry.options.split(",")
        assert sorted(os.listdir(mountpoint)) == ["a", "b"]
        (mountpoint / "c").write_text("c")
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        unmount_fuse(mountpoint)
    assert (upper / "c").read_text() == "c"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"unionfs {mountpoint} fuse.unionfs-py {options},noauto 0 0\n")
    by_fstab = subprocess.run(["mount", "-T", str(fstab), str(mountpoint)], capture_output=True,
                              text=True, check=False, timeout=60)  # fmt: skip
    try:
        assert by_fstab.returncode == 0, by_fstab.stderr
        assert (mountpoint / "c").read_text() == "c"
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        unmount_fuse(mountpoint)


def test_debug_log_says_why_an_option_changes_nothing(tmp_layers: TmpLayers, mountpoint: Path,
                                                      tmp_path: Path) -> None:  # fmt: skip
    log = tmp_path / "daemon.log"
    with unionfs_mounted(tmp_layers({"f": "1"}), mountpoint, log=log, extra_args=["--debug"],
                         options=["nodiratime", "blksize=512"]):  # fmt: skip
        pass
    text = log.read_text()
    assert "option nodiratime accepted, no effect: the kernel never updates atimes" in text
    assert "option blksize=512 accepted, no effect" in text


def test_volatile_remount_waits_for_the_previous_daemon_to_finish(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """podman and buildah mount the same upper again right after unmounting it. The previous
    daemon syncs and removes its mark only after the kernel's unmount: a new mount meanwhile
    must wait for it (here: the old daemon is stopped until the new mount is waiting), not refuse
    the upper as crashed; and a mount of an upper still mounted is refused as in use."""
    layer = tmp_layers({"f": "1"})[0]
    upper, work, log = tmp_path / "up", tmp_path / "work", tmp_path / "first.log"
    argv = unionfs_command([layer], mountpoint, upper=upper, workdir=work, options=["volatile"],
                           log=log)  # fmt: skip
    assert subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode == 0
    first = pid_from_log(log)
    assert first is not None
    in_use = unionfs("mount", "--upper", upper, "--workdir", work, layer, tmp_path)
    assert in_use.returncode == 3 and "in use" in in_use.stderr, in_use
    os.kill(first, signal.SIGSTOP)
    second = None
    try:
        assert subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False).returncode == 0
        second_log = tmp_path / "second.log"
        second = subprocess.Popen(
            unionfs_command([layer], mountpoint, upper=upper, workdir=work,
                            options=["volatile"], log=second_log),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)  # let it find the mark of a daemon that still runs (not a timing claim)
        assert second.poll() is None, second.communicate()
        os.kill(first, signal.SIGCONT)
        _out, err = second.communicate(timeout=90)
        assert second.returncode == 0, err
        assert is_mounted(mountpoint) and (mountpoint / "f").read_text() == "1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGCONT)
        if second is not None and second.poll() is None:
            second.kill()
        unmount_fuse(mountpoint)

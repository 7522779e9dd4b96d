"""podman with unionfs as mount_program, as a podman user meets it: containers that do not run
as root, set-uid binaries, and user-namespace mappings (issue 10).

Each test runs with rootful podman and with rootless podman (an ordinary user with subuids,
made once). The image is a busybox rootfs made here, with an ``/etc/passwd`` that names
``nobody`` and a set-uid root program ``/usr/local/bin/showid`` (compiled statically here:
busybox drops set-uid privileges itself) that prints its real and effective uid.

What was wrong before: the mount had neither ``allow_other`` nor ``suid``, so any uid but the
mounting one got EACCES (``podman run --user 65534 IMG /bin/busybox id``: "permission denied"),
and set-uid binaries did not run set-uid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.podman_rig import (
    TEST_USER,
    PodmanRig,
    ensure_test_user,
    make_busybox_rootfs,
    missing_tools,
    run_setup_script,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

IMAGE = "localhost/users:1"
SHOWID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid()); return 0; }
"""
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def build_showid(directory: Path) -> Path | None:
    """A static set-uid-able program printing its uids, or None when it cannot be built."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = directory / "showid.c"
    source.write_text(SHOWID_C)
    binary = directory / "showid"
    built = subprocess.run(
        [compiler, "-static", "-O1", "-o", str(binary), str(source)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    return binary if built.returncode == 0 else None


def image_rootfs(directory: Path) -> Path:
    rootfs = directory / "rootfs"
    make_busybox_rootfs(rootfs, extra={"etc/passwd": PASSWD, "etc/group": GROUP})
    for applet in ("su", "whoami"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    showid = build_showid(directory)
    if showid is None:
        pytest.skip("no C compiler with a static libc (gcc, libc6-dev) to build a set-uid test")
    target = rootfs / "usr" / "local" / "bin" / "showid"
    target.parent.mkdir(parents=True)
    shutil.copy(showid, target)
    os.chown(target, 0, 0)
    os.chmod(target, 0o4755)
    return rootfs


@pytest.fixture(scope="module", params=[False, True], ids=["rootful", "rootless"])
def rig(request: pytest.FixtureRequest) -> Iterator[PodmanRig]:
    if os.geteuid() != 0:
        pytest.skip("needs root (installs podman, writes a private store, makes a test user)")
    run_setup_script()
    missing = missing_tools("podman", "runc", "busybox", "fusermount3")
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (scripts/containers-setup failed?)")
    rootless = bool(request.param)
    user = None
    if rootless:
        if missing_tools("newuidmap", "runuser", "useradd"):
            pytest.skip("rootless podman needs newuidmap (uidmap), runuser and useradd")
        ensure_test_user()
        user = TEST_USER
    rig = PodmanRig.create("unionfs", user=user)
    scratch = Path(tempfile.mkdtemp(prefix="users-image-", dir="/tmp"))
    try:
        rootfs = image_rootfs(scratch)
        tarball = rig.root / "users.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."],
                       check=True)  # fmt: skip
        if user is not None:
            shutil.chown(tarball, user, user)
        rig.podman("import", "-q", str(tarball), IMAGE)
        yield rig
    finally:
        rig.close()
        shutil.rmtree(scratch, ignore_errors=True)


def test_user_65534_runs_a_root_owned_binary(rig: PodmanRig) -> None:
    """podman run --user 65534 IMG /bin/busybox id: failed with 'stat /bin/busybox: permission
    denied' (no allow_other)."""
    result = rig.podman("run", "--rm", "--user", "65534", IMAGE, "/bin/busybox", "id",
                        check=False)  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n{rig.log_tail()}"
    assert result.stdout.startswith("uid=65534"), result.stdout
    written = rig.podman(
        "run",
        "--rm",
        "--user",
        "65534:65534",
        IMAGE,
        "sh",
        "-c",
        "echo x > /tmp/mine && ls -ln /tmp/mine && cat /etc/motd",
        check=False,
    )
    assert written.returncode == 0, written.stderr
    assert written.stdout.split()[2:4] == ["65534", "65534"] and "welcome" in written.stdout


def test_su_to_nobody_inside(rig: PodmanRig) -> None:
    result = rig.podman("run", "--rm", IMAGE, "su", "-s", "/bin/sh", "nobody", "-c", "id -u",
                        check=False)  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n{rig.log_tail()}"
    assert result.stdout.strip() == "65534"


def test_set_uid_binary_runs_set_uid(rig: PodmanRig) -> None:
    result = rig.podman("run", "--rm", "--user", "65534", IMAGE, "/usr/local/bin/showid",
                        check=False)  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n{rig.log_tail()}"
    assert result.stdout.strip() == "uid=65534 euid=0"


def _upper_files(rig: PodmanRig, name: str) -> dict[str, int]:
    upper = rig.podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).stdout
    found: dict[str, int] = {}
    root = upper.strip()
    assert os.path.isdir(root), f"no upper at {root!r}"
    for directory, _dirs, files in os.walk(root):
        for file in files:
            st = os.lstat(os.path.join(directory, file))
            found[os.path.join(directory, file)[len(root) :]] = st.st_blocks * 512
    return found


@pytest.mark.parametrize(
    "mapping",
    [
        pytest.param(["--userns=keep-id"], id="keep-id"),
        pytest.param(["--uidmap", "0:1:5000", "--gidmap", "0:1:5000"], id="uidmap"),
    ],
)
def test_user_namespace_mappings_show_the_image_owners_and_copy_nothing(
    rig: PodmanRig, mapping: list[str]
) -> None:
    """podman passes uidmapping=:0:1:5000 (and for keep-id several ranges): the image's files
    show with the container's owners, and starting the container copies no file data up."""
    if rig.user is None:
        pytest.skip(
            "rootful --uidmap: podman 4.3 mounts a chowned copy of the layers (mapped/0) and "
            "still passes uidmapping=, so every file shows as nobody and runc cannot open "
            "/etc/hostname; fuse-overlayfs fails the same way on this machine"
        )
    name = f"map-{mapping[0].strip('-').split('=')[0]}-{int(time.monotonic() * 1000)}"
    result = rig.podman("run", "--name", name, *mapping, IMAGE, "sh", "-c",
                        "ls -ln /bin/busybox /etc/motd /usr/local/bin/showid; id -u; "
                        "cat /bin/busybox > /dev/null", check=False)  # fmt: skip
    try:
        assert result.returncode == 0, f"{result.stderr}\n{rig.log_tail()}"
        listing = [line.split() for line in result.stdout.splitlines()[:3]]
        assert [(fields[2], fields[3]) for fields in listing] == [("0", "0")] * 3, result.stdout
        assert listing[2][0] == "-rwsr-xr-x", result.stdout
        if mapping[0] == "--userns=keep-id":
            assert result.stdout.splitlines()[3] == str(_rootless_uid(rig))
        assert "uidmapping=" in rig.log.read_text(), "podman passed no uidmapping"
        files = _upper_files(rig, name)
        # podman writes mount targets (empty) and, for keep-id, its user into /etc/passwd and
        # /etc/group; no image file is copied up.
        image_files = {path for path in files if path not in
                       ("/etc/passwd", "/etc/group", "/etc/hosts", "/etc/hostname", "/etc/mtab",
                        "/etc/resolv.conf", "/run/.containerenv")}  # fmt: skip
        assert image_files == set(), files
        assert sum(files.values()) <= 16 * 1024, files
    finally:
        rig.podman("rm", "-f", name, check=False)


def _rootless_uid(rig: PodmanRig) -> int:
    import pwd

    assert rig.user is not None
    return pwd.getpwnam(rig.user).pw_uid

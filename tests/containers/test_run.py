"""``unionfs.run.run_in_union``: mount, run a command as a rootless container, unmount.

Real mounts and real containers (bubblewrap, and the ``unshare -Urm`` + chroot fallback). Each
test checks that nothing stays mounted and the temporary upper is gone.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.podman_rig import (
    REPO,
    chown_tree,
    ensure_test_user,
    make_busybox_rootfs,
    mounts_under,
    unionfs_python,
)
from unionfs import run

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Temp dirs of run_in_union go under tmp_path so the test can see they are removed."""
    if shutil.which("busybox") is None:
        pytest.skip("busybox not installed (scripts/containers-setup)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("/dev/fuse not usable")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    assert mounts_under(tmp_path) == [], "run_in_union left a mount behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("unionfs-run-")]


@pytest.fixture
def rootfs(scratch: Path) -> Path:
    root = scratch / "base"
    make_busybox_rootfs(root)
    return root


def test_run_returns_exit_code_with_temporary_upper(rootfs: Path, scratch: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap not installed")
    out = scratch / "out.txt"
    script = "echo hello > /tmp/x && rm /data/gone && cat /tmp/x && ls /data && id -u && exit 7"
    with out.open("w") as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            rc = run.run_in_union([rootfs], ["sh", "-c", script], upper=None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    assert rc == 7
    assert out.read_text().split() == ["hello", "dir", "keep", "0"]
    assert (rootfs / "data" / "gone").exists(), "the lower layer was written"


def test_run_with_upper_keeps_changes(rootfs: Path, scratch: Path) -> None:
    upper = scratch / "upper"
    rc = run.run_in_union(
        [rootfs], ["sh", "-c", "echo kept > /data/new && rm /data/gone"], upper=upper
    )
    assert rc == 0
    assert (upper / "data" / "new").read_text() == "kept\n"
    st = os.lstat(upper / "data" / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    rc = run.run_in_union(
        [rootfs], ["sh", "-c", "test ! -e /data/gone && test -f /data/new"], upper=upper
    )
    assert rc == 0, "a second run over the same upper sees the first run's changes"


def test_run_unshare_fallback_without_bwrap(
    rootfs: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    argv = run.container_argv(scratch, ["true"])
    assert Path(argv[0]).name == "unshare"
    upper = scratch / "upper"
    rc = run.run_in_union(
        [rootfs], ["sh", "-c", "echo via-unshare > /tmp/u && test -d /proc/self && exit 3"],
        upper=upper,
    )  # fmt: skip
    assert rc == 3
    assert (upper / "tmp" / "u").read_text() == "via-unshare\n"


def test_run_bad_layer_raises_run_error_with_mount_exit_code(scratch: Path) -> None:
    with pytest.raises(run.RunError) as caught:
        run.run_in_union([scratch / "missing"], ["true"], upper=None)
    assert caught.value.exit_code == 3
    assert "\n" not in str(caught.value)


def test_run_empty_command_is_usage_error(rootfs: Path) -> None:
    with pytest.raises(run.RunError) as caught:
        run.run_in_union([rootfs], [], upper=None)
    assert caught.value.exit_code == 2


def test_image_command_and_env() -> None:
    config = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["PATH=/x", "A=b=c"]}
    assert run.image_command(config, []) == ["/bin/sh", "-c", "echo hi"]
    assert run.image_command(config, ["ls"]) == ["/bin/sh", "-c", "ls"]
    assert run.image_env(config) == {"PATH": "/x", "HOME": "/root", "A": "b=c"}


@pytest.mark.root
def test_run_as_ordinary_user(tmp_path: Path) -> None:
    """An ordinary user (no capabilities) runs a container on unionfs: fusermount3 + bwrap."""
    if shutil.which("busybox") is None or shutil.which("bwrap") is None:
        pytest.skip("busybox and bwrap needed (scripts/containers-setup)")
    uid, gid = ensure_test_user()
    home = Path(tempfile.mkdtemp(prefix="run-user-", dir="/tmp"))
    try:
        make_busybox_rootfs(home / "base")
        chown_tree(home, uid, gid)
        code = (
            "import sys; from pathlib import Path; from unionfs.run import run_in_union;"
            f"sys.exit(run_in_union([Path('{home}/base')],"
            " ['sh', '-c', 'echo me > /data/me && rm /data/gone && id -u'],"
            f" upper=Path('{home}/upper')))"
        )
        proc = subprocess.run(
            ["runuser", "-u", os.environ.get("UNIONFS_TEST_USER", "unionfs-ct"), "--",
             "env", f"PYTHONPATH={REPO}", f"TMPDIR={home}", unionfs_python(), "-c", code],
            capture_output=True, text=True, timeout=90, check=False, cwd=home,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["0"], proc.stdout
        new = home / "upper" / "data" / "me"
        assert new.read_text() == "me\n" and new.stat().st_uid == uid
        st = os.lstat(home / "upper" / "data" / "gone")
        assert stat.S_ISCHR(st.st_mode) or (home / "upper" / "data" / ".wh.gone").exists()
        assert mounts_under(home) == []
    finally:
        for entry in mounts_under(home):
            subprocess.run(["fusermount3", "-uz", entry], check=False)
        shutil.rmtree(home, ignore_errors=True)

"""Fixtures for every test: root/overlayfs requirements, layer and mountpoint makers, leak check.

- ``@pytest.mark.root`` tests skip with a reason unless run as root (CI runs as root).
- ``require_root`` / ``require_overlay``: the same as fixtures; the overlayfs probe runs once.
- ``ordinary_user`` (a system user made once, root only) and ``shared_tmp`` (a tmp dir it can
  reach) for tests of the unprivileged path; run commands as it with ``tests.support.run_as``.
- ``tmp_layers(spec, spec, ...)`` writes layers (base first) under the test's tmp dir, see
  ``tests.support.write_layer`` for the spec format; ``mountpoint`` is an empty directory.
- At the end of the session, any mount left under pytest's tmp dir is unmounted and reported as
  an error: every test must clean up after itself (use ``tests.support.mounts``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LayerSpec, TmpLayers, mounts, run_as, write_layer
from tests.support.mounts import (
    daemon_pids,
    is_mounted,
    mounts_under,
    overlay_available,
    unmount_fuse,
)

# pytest deletes old temporary directories with shutil.rmtree, which recurses once per level:
# a test that builds a tree deeper than the default limit (1000) would crash a later session.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip("needs root (marked root); CI runs as root")


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root; CI runs as root")


@pytest.fixture(scope="session")
def _overlay_unavailable_reason(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    return overlay_available(tmp_path_factory.mktemp("overlay-probe"))


@pytest.fixture
def require_overlay(_overlay_unavailable_reason: str | None) -> None:
    if _overlay_unavailable_reason is not None:
        pytest.skip(_overlay_unavailable_reason)


@pytest.fixture
def tmp_layers(tmp_path: Path) -> TmpLayers:
    """``tmp_layers(spec_base, spec_next, ...)`` -> the layer directories, base first.

    Each call makes fresh directories (``layers/0``, ``layers/1``, ... numbered across calls).
    """
    counter = itertools.count()

    def make(*specs: LayerSpec) -> list[Path]:
        return [write_layer(tmp_path / "layers" / str(next(counter)), spec) for spec in specs]

    return make


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    """An empty directory to mount on."""
    path = tmp_path / "mnt"
    path.mkdir()
    return path


ORDINARY_USER = "unionfs-test"


@pytest.fixture(scope="session")
def ordinary_user() -> pwd.struct_passwd:
    """An unprivileged system user for tests of the non-root path (root only, else skip).

    Made with useradd on first use and kept (concurrent test runs may share it); run commands as
    it with ``tests.support.run_as``. Skips if this interpreter is not usable by that user.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to act as an ordinary user (CI runs as root)")
    if shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("needs useradd and setpriv")
    try:
        user = pwd.getpwnam(ORDINARY_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/sbin/nologin", ORDINARY_USER],
            check=False,
            capture_output=True,
        )
        user = pwd.getpwnam(ORDINARY_USER)  # made by us or, just now, by a concurrent run
    probe = run_as(user, [sys.executable, "-c", "import unionfs"])
    if probe.returncode != 0:
        pytest.skip(
            f"{sys.executable} is not usable by an ordinary user "
            f"(a venv inside a private home?): {probe.stderr.strip()}"
        )
    return user


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory every user can reach (pytest's own is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="unionfs-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for entry in path.rglob("*"):
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink() and not is_mounted(entry):
                    entry.chmod(0o755)
        for mount in mounts_under(path):
            unmount_fuse(mount.mountpoint)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


@pytest.fixture(autouse=True)
def _mount_watchdog(request: pytest.FixtureRequest) -> None:
    """Set the mount watchdog a little below this test's timeout (see mounts.watchdog_seconds)."""
    marker = request.node.get_closest_marker("timeout")
    timeout: float = 0.0
    if marker is not None and (marker.args or "timeout" in marker.kwargs):
        timeout = float(marker.args[0] if marker.args else marker.kwargs["timeout"])
    else:
        with contextlib.suppress(ValueError, TypeError):
            timeout = float(request.config.getini("timeout") or 0)
    if timeout > 0:
        mounts.watchdog_seconds = max(5.0, timeout - min(30.0, timeout / 5))


@pytest.fixture(scope="session", autouse=True)
def _no_mounts_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    base = tmp_path_factory.getbasetemp()
    left = mounts_under(base)
    if not left:
        return
    for entry in sorted(left, key=lambda e: len(e.mountpoint), reverse=True):
        if entry.fstype.startswith("fuse"):
            pids = [
                pid
                for program in ("unionfs", "fuse-overlayfs")
                for pid in daemon_pids(entry.mountpoint, program)
            ]
            with contextlib.suppress(AssertionError):
                unmount_fuse(entry.mountpoint, pids=pids)
        else:
            subprocess.run(["umount", "-l", entry.mountpoint], check=False, capture_output=True)
    pytest.fail(
        "mounts left behind by tests (now removed): "
        + ", ".join(f"{e.mountpoint} ({e.fstype})" for e in left),
        pytrace=False,
    )

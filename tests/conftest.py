"""Fixtures for every test: root/overlayfs requirements, layer and mountpoint makers, leak check.

- ``@pytest.mark.root`` tests skip with a reason unless run as root (CI runs as root).
- ``require_root`` / ``require_overlay``: the same as fixtures; the overlayfs probe runs once.
- ``tmp_layers(spec, spec, ...)`` writes layers (base first) under the test's tmp dir, see
  ``tests.support.write_layer`` for the spec format; ``mountpoint`` is an empty directory.
- At the end of the session, any mount left under pytest's tmp dir is unmounted and reported as
  an error: every test must clean up after itself (use ``tests.support.mounts``).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LayerSpec, TmpLayers, write_layer
from tests.support.mounts import mounts_under, overlay_available, unmount_fuse

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


@pytest.fixture(scope="session", autouse=True)
def _no_mounts_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    base = tmp_path_factory.getbasetemp()
    left = mounts_under(base)
    if not left:
        return
    for entry in sorted(left, key=lambda e: len(e.mountpoint), reverse=True):
        if entry.fstype.startswith("fuse"):
            unmount_fuse(entry.mountpoint)
        else:
            os.system(f"umount -l '{entry.mountpoint}' 2>/dev/null")
    pytest.fail(
        "mounts left behind by tests (now removed): "
        + ", ".join(f"{e.mountpoint} ({e.fstype})" for e in left),
        pytrace=False,
    )

"""Layer resolution without a mount: the union read rules on real temp directories."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.support import DIR, OPAQUE, WHITEOUT, Symlink, TmpLayers
from unionfs.layer import Layer
from unionfs.stack import Stack


def make_stack(layer_dirs: list[Path]) -> Stack:
    """Layers base first, as on the command line; the Stack wants them top first."""
    return Stack(
        [Layer(str(path), index, writable=False) for index, path in enumerate(reversed(layer_dirs))]
    )


def names(stack: Stack, *path: bytes) -> list[bytes]:
    sources = stack.root_sources()
    for component in path:
        resolved = stack.resolve(sources, component)
        assert resolved is not None and resolved.kind == stat.S_IFDIR
        sources = resolved.sources
    return sorted(name for name, _ in stack.list_merged(sources))


def test_top_layer_wins(tmp_layers: TmpLayers) -> None:
    stack = make_stack(tmp_layers({"f": "base", "d/x": "1"}, {"f": "top", "d/y": "2"}))
    resolved = stack.resolve(stack.root_sources(), b"f")
    assert resolved is not None and resolved.top.layer.index == 0
    assert names(stack, b"d") == [b"x", b"y"]


@pytest.mark.root
def test_overlay_whiteout_and_opaque(tmp_layers: TmpLayers) -> None:
    stack = make_stack(
        tmp_layers(
            {"gone": "x", "d/old": "1", "keep": "k"}, {"gone": WHITEOUT, "d": OPAQUE, "d/new": "2"}
        )
    )
    assert stack.resolve(stack.root_sources(), b"gone") is None
    assert names(stack) == [b"d", b"keep"]
    assert names(stack, b"d") == [b"new"]


def test_oci_whiteout_and_opaque(tmp_layers: TmpLayers) -> None:
    stack = make_stack(
        tmp_layers(
            {"gone": "x", "d/old": "1"}, {".wh.gone": "", "d/.wh..wh..opq": "", "d/new": "2"}
        )
    )
    assert stack.resolve(stack.root_sources(), b"gone") is None
    assert stack.resolve(stack.root_sources(), b".wh.gone") is None
    assert names(stack) == [b"d"]
    assert names(stack, b"d") == [b"new"]


def test_file_shadows_directory_and_reverse(tmp_layers: TmpLayers) -> None:
    stack = make_stack(tmp_layers({"a/inner": "1", "b": "file"}, {"a": "now a file", "b/x": "1"}))
    a = stack.resolve(stack.root_sources(), b"a")
    b = stack.resolve(stack.root_sources(), b"b")
    assert a is not None and a.kind == stat.S_IFREG and len(a.sources) == 1
    assert b is not None and b.kind == stat.S_IFDIR and len(b.sources) == 1
    assert names(stack, b"b") == [b"x"]


def test_whiteout_hides_only_lower_layers(tmp_layers: TmpLayers) -> None:
    # OCI: a layer may delete NAME and add it again; its own NAME shows.
    stack = make_stack(tmp_layers({"d/a": "1"}, {".wh.d": "", "d/b": "2"}))
    assert names(stack, b"d") == [b"b"]


def test_symlinks_are_never_followed(tmp_layers: TmpLayers, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    stack = make_stack(tmp_layers({"esc": Symlink(str(outside)), "up": Symlink("../..")}))
    for name in (b"esc", b"up"):
        resolved = stack.resolve(stack.root_sources(), name)
        assert resolved is not None and resolved.kind == stat.S_IFLNK
    # Asking for a path *through* the symlink finds nothing rather than the outside.
    layer = stack.layers[0]
    assert layer.listing((b"esc",)) is None
    assert layer.try_lstat((b"esc", b"secret")) is None


def test_redirect_points_lower_lookup_elsewhere(tmp_layers: TmpLayers) -> None:
    layers = tmp_layers({"old/f": "1"}, {"new": DIR, ".wh.old": ""})
    os.setxattr(layers[1] / "new", "user.overlay.redirect", b"/old")
    stack = make_stack(layers)
    assert names(stack) == [b"new"]
    assert names(stack, b"new") == [b"f"]


def test_redirect_cannot_climb_out(tmp_layers: TmpLayers) -> None:
    layers = tmp_layers({"f": "1"}, {"new": DIR})
    os.setxattr(layers[1] / "new", "user.overlay.redirect", b"/../../etc")
    assert names(make_stack(layers), b"new") == []


def test_hundred_layers(tmp_layers: TmpLayers) -> None:
    stack = make_stack(tmp_layers(*({f"d/f{index}": str(index)} for index in range(100))))
    assert len(names(stack, b"d")) == 100

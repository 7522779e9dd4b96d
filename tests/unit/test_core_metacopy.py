"""Metadata-only chains and redirects through several layers (a rotated upper is a lower layer
full of ``overlay.metacopy`` files), resolved without a mount, as kernel overlayfs does."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers
from unionfs.layer import Layer
from unionfs.stack import Chain, Resolved, Stack

METACOPY = "user.overlay.metacopy"
REDIRECT = "user.overlay.redirect"
OPAQUE = "user.overlay.opaque"


def make_stack(layer_dirs: list[Path]) -> Stack:
    """Layers base first, as on the command line; the Stack wants them top first."""
    return Stack(
        [Layer(str(path), index, writable=False) for index, path in enumerate(reversed(layer_dirs))]
    )


def metacopy(path: Path, size: int, redirect: bytes | None = None) -> None:
    """A metadata-only file as an upper holds it: all hole, ``overlay.metacopy``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    os.setxattr(path, METACOPY, b"")
    if redirect is not None:
        os.setxattr(path, REDIRECT, redirect)


def resolve_path(stack: Stack, path: str) -> tuple[Resolved, Chain]:
    sources = stack.root_sources()
    parts = path.encode().split(b"/")
    for name in parts[:-1]:
        resolved = stack.resolve(sources, name)
        assert resolved is not None and resolved.kind == stat.S_IFDIR, name
        sources = resolved.sources
    resolved = stack.resolve(sources, parts[-1])
    assert resolved is not None, path
    return resolved, stack.chain(resolved, parts[-1])


def where(layers: list[Path], stack: Stack, source: object) -> str:
    """``"<base-first layer index>:<path>"`` of a Source (None: "-")."""
    if source is None:
        return "-"
    layer = source.layer  # type: ignore[attr-defined]
    index = len(layers) - 1 - layer.index
    return f"{index}:" + "/".join(part.decode() for part in source.path)  # type: ignore[attr-defined]


def test_plain_file_has_no_chain(tmp_layers: TmpLayers) -> None:
    layers = tmp_layers({"a/f": "data"})
    stack = make_stack(layers)
    _, chain = resolve_path(stack, "a/f")
    assert chain == Chain(False, None, None, None)


def test_three_generations_of_renames(tmp_layers: TmpLayers) -> None:
    """mv a/foo a/bar (gen 1), mv a/bar a/foo (gen 2): the data is still gen 0's a/foo."""
    layers = tmp_layers({"a/foo": "hello world\n"}, {"a": DIR}, {"a": DIR})
    metacopy(layers[1] / "a/bar", 12, b"/a/foo")
    metacopy(layers[2] / "a/foo", 12, b"bar")
    stack = make_stack(layers)
    resolved, chain = resolve_path(stack, "a/foo")
    assert where(layers, stack, resolved.top) == "2:a/foo"
    assert chain.metacopy and chain.redirect == (False, (b"bar",))
    assert where(layers, stack, chain.below) == "1:a/bar"  # the kernel's origin
    assert where(layers, stack, chain.data) == "0:a/foo"


def test_chain_without_redirects_goes_by_name(tmp_layers: TmpLayers) -> None:
    """chmod in every generation: each layer's copy is metadata only, at the same path."""
    layers = tmp_layers({"f": "x" * 100}, {}, {}, {})
    for layer in layers[1:]:
        metacopy(layer / "f", 100)
    stack = make_stack(layers)
    _, chain = resolve_path(stack, "f")
    assert where(layers, stack, chain.below) == "2:f"
    assert where(layers, stack, chain.data) == "0:f"


def test_absolute_redirect_walks_through_a_redirected_directory(tmp_layers: TmpLayers) -> None:
    """Gen 1 renamed directory x to y; gen 2 moved y/f to the root as g. The absolute path
    "/y/f" is followed through y's own redirect in the layer below (the kernel's walk)."""
    layers = tmp_layers({"x/f": "payload"}, {"y": DIR}, {})
    os.setxattr(layers[1] / "y", REDIRECT, b"/x")
    metacopy(layers[2] / "g", 7, b"/y/f")
    stack = make_stack(layers)
    _, chain = resolve_path(stack, "g")
    assert where(layers, stack, chain.data) == "0:x/f"


def test_absolute_redirect_is_a_path_in_the_merged_lower_namespace(
    tmp_layers: TmpLayers,
) -> None:
    """A new a/foo made above an old rename must not be taken for the renamed file's data:
    the redirect names where the data shows below, not a path in a particular layer."""
    layers = tmp_layers({"a/foo": "old data"}, {"a": DIR, "a/foo": "new file"}, {"a": DIR})
    metacopy(layers[1] / "a/bar", 8, b"/a/foo")  # gen 1: mv a/foo a/bar, then a new a/foo
    metacopy(layers[2] / "moved", 8, b"/a/bar")  # gen 2: mv a/bar /moved
    stack = make_stack(layers)
    _, chain = resolve_path(stack, "moved")
    assert where(layers, stack, chain.data) == "0:a/foo"


@pytest.mark.parametrize(
    "below",
    ["nothing", "whiteout", "directory", "symlink", "opaque ancestor"],
)
def test_broken_chain_has_no_data(below: str, tmp_layers: TmpLayers) -> None:
    base = {"f": "data", "x/f": "data"}
    layers = tmp_layers(base, {}, {})
    middle, top = layers[1], layers[2]
    if below == "whiteout":
        (middle / ".wh.f").write_text("")
    elif below == "directory":
        (middle / "f").mkdir()
    elif below == "symlink":
        os.symlink("x/f", middle / "f")
    elif below == "opaque ancestor":
        (middle / "x").mkdir()
        os.setxattr(middle / "x", OPAQUE, b"y")
    target = b"/x/f" if below == "opaque ancestor" else None
    if below == "nothing":
        layers = layers[1:]  # no data anywhere
    metacopy(top / "f", 4, target)
    stack = make_stack(layers)
    _, chain = resolve_path(stack, "f")
    assert chain.metacopy and chain.data is None


def test_empty_metacopy_file_is_not_followed(tmp_layers: TmpLayers) -> None:
    layers = tmp_layers({"f": "data"}, {})
    metacopy(layers[1] / "f", 0)
    stack = make_stack(layers)
    _, chain = resolve_path(stack, "f")
    assert not chain.metacopy


def test_origin_candidate_by_name_and_by_redirect(tmp_layers: TmpLayers) -> None:
    layers = tmp_layers({"f": "one", "g": "two"}, {"f": "copied", "h": "moved"})
    os.setxattr(layers[1] / "h", REDIRECT, b"g")  # a completed metacopy keeps its redirect
    stack = make_stack(layers)
    for name, redirect, expected in (("f", None, "0:f"), ("h", (False, (b"g",)), "0:g")):
        resolved = stack.resolve(stack.root_sources(), name.encode())
        assert resolved is not None
        candidate = stack.origin_candidate(resolved, name.encode(), redirect)
        assert where(layers, stack, candidate) == expected


def test_directory_redirect_chain_across_generations(tmp_layers: TmpLayers) -> None:
    """mv d e (gen 1, relative redirect), mv e sub/e (gen 2, absolute "/e" in the lower
    namespace): the merged directory still lists gen 0's content."""
    layers = tmp_layers({"d/inner": "1"}, {"e": DIR}, {"sub/e": DIR})
    os.setxattr(layers[1] / "e", REDIRECT, b"d")
    os.setxattr(layers[2] / "sub/e", REDIRECT, b"/e")
    stack = make_stack(layers)
    sources = stack.walk((b"sub", b"e"))
    assert sources is not None
    assert [name for name, _ in stack.list_merged(sources)] == [b"inner"]

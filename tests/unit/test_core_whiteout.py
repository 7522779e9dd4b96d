"""Whiteout, opaque and redirect encodings (pure functions, no filesystem)."""

from __future__ import annotations

import pytest

from unionfs import whiteout


@pytest.mark.parametrize(
    ("name", "target"),
    [
        (b".wh.file", b"file"),
        (b".wh..hidden", b".hidden"),
        (b".wh..wh..opq", None),  # the opaque marker is not a whiteout
        (b".wh.", None),
        (b".wh..", None),
        (b".wh...", None),  # a whiteout of ".." hides nothing
        (b"file", None),
        (b"x.wh.file", None),
    ],
)
def test_oci_whiteout_target(name: bytes, target: bytes | None) -> None:
    assert whiteout.oci_whiteout_target(name) == target


def test_hidden_names_are_every_wh_prefix() -> None:
    assert whiteout.is_hidden_name(b".wh.anything")
    assert whiteout.is_hidden_name(b".wh..wh..opq")
    assert not whiteout.is_hidden_name(b"wh.file")


@pytest.mark.parametrize(
    "name",
    ["trusted.overlay.opaque", "user.overlay.redirect", "user.fuseoverlayfs.opaque",
     "trusted.overlay.origin"],
)
def test_private_xattrs(name: str) -> None:
    assert whiteout.is_private_xattr(name)


@pytest.mark.parametrize("name", ["user.foo", "security.capability", "trusted.other"])
def test_public_xattrs(name: str) -> None:
    assert not whiteout.is_private_xattr(name)


@pytest.mark.parametrize(
    ("value", "opaque"), [(b"y", True), (b"y\0", True), (b"x", False), (b"n", False), (None, False)]
)
def test_opaque_values(value: bytes | None, opaque: bool) -> None:
    assert whiteout.opaque_value_means_opaque(value) is opaque


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (b"/a/b", (True, (b"a", b"b"))),
        (b"name", (False, (b"name",))),
        (b"/a/../etc", None),  # climbing out is refused
        (b"../x", None),
        (b"a/b", None),  # relative redirects are one name
        (b"", None),
        (None, None),
        (b"/", None),
    ],
)
def test_parse_redirect(value: bytes | None, parsed: object) -> None:
    assert whiteout.parse_redirect(value) == parsed


def test_redirect_round_trip() -> None:
    path = (b"usr", b"lib", b"python3")
    assert whiteout.parse_redirect(whiteout.encode_redirect(path)) == (True, path)

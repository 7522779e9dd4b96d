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
    [
        "trusted.overlay.opaque",
        "user.overlay.redirect",
        "user.fuseoverlayfs.opaque",
        "trusted.overlay.origin",
    ],
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


def test_origin_is_the_kernel_ovl_fb_layout() -> None:
    # What Linux 6.18 wrote for an ext4 lower (null UUID) with a FILEID_INO32_GEN handle.
    handle = bytes.fromhex("03a0210027217d5a")
    origin = whiteout.encode_origin(1, handle, bytes(16), big_endian=False)
    assert origin.hex() == "00fb1d0001" + "00" * 16 + "03a0210027217d5a"
    assert whiteout.index_name(origin) == origin.hex().encode()
    uuid = bytes(range(16))
    assert whiteout.encode_origin(1, handle, uuid, big_endian=True)[3] == 1
    assert whiteout.encode_origin(1, handle, uuid, big_endian=False)[5:21] == uuid


@pytest.mark.parametrize(
    ("handle_type", "handle", "uuid"),
    [(1, b"x" * 240, bytes(16)), (300, b"x", bytes(16)), (1, b"x", b"short")],
)
def test_origin_refuses_what_does_not_fit(handle_type: int, handle: bytes, uuid: bytes) -> None:
    with pytest.raises(ValueError):
        whiteout.encode_origin(handle_type, handle, uuid, big_endian=False)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (b"U+0", ("U", 0)),
        (b"U-1", ("U", -1)),
        (b"L+2\0", ("L", 2)),
        (b"U+12", ("U", 12)),
        (b"", None),
        (None, None),
        (b"X+1", None),
        (b"U1", None),
        (b"U+", None),
        (b"U+x", None),
    ],
)
def test_nlink_records(value: bytes | None, parsed: tuple[str, int] | None) -> None:
    assert whiteout.parse_nlink(value) == parsed


def test_nlink_record_round_trip() -> None:
    for difference in (-3, -1, 0, 1, 7):
        assert whiteout.parse_nlink(whiteout.encode_nlink(difference)) == ("U", difference)
    assert whiteout.encode_nlink(0) == b"U+0"


def test_index_entry_unused_only_when_no_name_is_left() -> None:
    assert whiteout.index_entry_unused(1, ("U", -1))
    assert not whiteout.index_entry_unused(1, ("U", 0))  # one lower name still shows it
    assert not whiteout.index_entry_unused(2, ("U", -1))  # an upper name links it
    assert not whiteout.index_entry_unused(1, None)  # no record: keep it
    assert not whiteout.index_entry_unused(1, ("L", -5))  # relative to the lower: keep it

"""Pure encoding of whiteouts, opaque markers and redirects, in both on-disk formats.

Overlay (kernel) format: a whiteout is a character device 0/0; an opaque directory carries
``trusted.overlay.opaque=y`` (``user.overlay.opaque=y`` unprivileged); a renamed lower
directory carries ``overlay.redirect``. Since Linux 6.7 a whiteout may also be a zero-size
regular file with ``overlay.whiteout`` inside a directory marked ``overlay.opaque=x``.
OCI format: ``.wh.NAME`` hides NAME in lower layers; ``.wh..wh..opq`` makes its directory opaque.
fuse-overlayfs also writes ``user.fuseoverlayfs.opaque``.
"""

from __future__ import annotations

OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE_MARKER = b".wh..wh..opq"

TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
FUSE_OVERLAYFS_PREFIX = "user.fuseoverlayfs."
PRIVATE_PREFIXES = (TRUSTED_PREFIX, USER_PREFIX, FUSE_OVERLAYFS_PREFIX)

OPAQUE_XATTRS = (
    TRUSTED_PREFIX + "opaque",
    USER_PREFIX + "opaque",
    FUSE_OVERLAYFS_PREFIX + "opaque",
)
REDIRECT_XATTRS = (TRUSTED_PREFIX + "redirect", USER_PREFIX + "redirect")
WHITEOUT_XATTRS = (TRUSTED_PREFIX + "whiteout", USER_PREFIX + "whiteout")
# A metadata-only copy-up: the upper file holds metadata, its data is still in a lower file
# (the same path below, or the absolute ``overlay.redirect`` path). Kernel: metacopy=on.
METACOPY_XATTRS = (TRUSTED_PREFIX + "metacopy", USER_PREFIX + "metacopy")


# Since Linux 6.7 overlayfs lets users set overlay xattrs through the mount by escaping them:
# ``trusted.overlay.X`` set through the mount is stored as ``trusted.overlay.overlay.X``.
ESCAPED_PREFIXES = (TRUSTED_PREFIX + "overlay.", USER_PREFIX + "overlay.")


def is_private_xattr(name: str) -> bool:
    """Overlay bookkeeping xattrs (stored form) are never shown through the merged view."""
    return name.startswith(PRIVATE_PREFIXES) and not name.startswith(ESCAPED_PREFIXES)


def is_copied_xattr(name: str) -> bool:
    """xattrs a copy-up keeps: everything but our own bookkeeping (escaped ones are data)."""
    return not is_private_xattr(name)


def shown_xattr_name(stored: str) -> str | None:
    """The name a stored xattr has in the merged view (None: hidden)."""
    for prefix in (TRUSTED_PREFIX, USER_PREFIX):
        if stored.startswith(prefix + "overlay."):
            return prefix + stored[len(prefix) + len("overlay.") :]
    return None if is_private_xattr(stored) else stored


def stored_xattr_name(shown: str) -> str | None:
    """Where an xattr named in the merged view is stored (None: not settable)."""
    for prefix in (TRUSTED_PREFIX, USER_PREFIX):
        if shown.startswith(prefix):
            return prefix + "overlay." + shown[len(prefix) :]
    return None if shown.startswith(FUSE_OVERLAYFS_PREFIX) else shown


def oci_whiteout_target(name: bytes) -> bytes | None:
    """The name hidden by an OCI whiteout file ``name``, or None if it is not one.

    ``.wh..wh..opq`` is the opaque marker, not a whiteout; ``.wh.`` with an empty, ``.`` or
    ``..`` target is malformed and hides nothing.
    """
    if not name.startswith(OCI_WHITEOUT_PREFIX) or name == OCI_OPAQUE_MARKER:
        return None
    target = name[len(OCI_WHITEOUT_PREFIX) :]
    if target in (b"", b".", b"..") or b"/" in target:
        return None
    return target


def is_hidden_name(name: bytes) -> bool:
    """Names that never appear in the merged view (every ``.wh.`` name)."""
    return name.startswith(OCI_WHITEOUT_PREFIX)


def oci_whiteout_name(name: bytes) -> bytes:
    return OCI_WHITEOUT_PREFIX + name


def opaque_value_means_opaque(value: bytes | None) -> bool:
    return value is not None and value.rstrip(b"\0") == b"y"


def opaque_value_allows_xattr_whiteouts(value: bytes | None) -> bool:
    return value is not None and value.rstrip(b"\0") == b"x"


def parse_redirect(value: bytes | None) -> tuple[bool, tuple[bytes, ...]] | None:
    """Decode an ``overlay.redirect`` value to (absolute, components), None if invalid.

    Absolute redirects (``/a/b``) are looked up from the layer root; a relative one is a
    single name in the same parent directory. Components that would climb (``..``) or are
    empty make the whole value invalid, so a hostile layer cannot redirect outside itself.
    """
    if not value:
        return None
    value = value.rstrip(b"\0")
    absolute = value.startswith(b"/")
    parts = tuple(part for part in value.split(b"/") if part)
    if not parts or any(part in (b".", b"..") for part in parts):
        return None
    if not absolute and len(parts) != 1:
        return None
    return absolute, parts


def encode_redirect(path: tuple[bytes, ...]) -> bytes:
    return b"/" + b"/".join(path)


# Hard links copied up (kernel ``index=on``): the upper inode carries ``overlay.origin``, the
# file handle of the lower inode it was copied from (struct ovl_fb: version 0, magic 0xfb,
# length, flags, handle type, the lower filesystem's UUID, the handle bytes), and is also
# linked as ``WORKDIR/index/<hex of that handle>``, so that every other lower name of the
# same inode finds it. ``overlay.nlink`` keeps the merged link count: "U+N"/"U-N" relative
# to the upper inode's link count, or "L+N"/"L-N" relative to the lower inode's.
ORIGIN_XATTRS = (TRUSTED_PREFIX + "origin", USER_PREFIX + "origin")
NLINK_XATTRS = (TRUSTED_PREFIX + "nlink", USER_PREFIX + "nlink")
_FH_VERSION = 0
_FH_MAGIC = 0xFB
_FH_HEADER = 21  # version, magic, len, flags, type + 16-byte uuid
_FH_FLAG_BIG_ENDIAN = 1


def encode_origin(handle_type: int, handle: bytes, uuid: bytes, *, big_endian: bool) -> bytes:
    """The ``overlay.origin`` value (and, in hex, the index name) of a lower inode."""
    if len(uuid) != 16 or not 0 <= handle_type <= 255 or _FH_HEADER + len(handle) > 255:
        raise ValueError("file handle does not fit an overlay origin")
    flags = _FH_FLAG_BIG_ENDIAN if big_endian else 0
    header = bytes((_FH_VERSION, _FH_MAGIC, _FH_HEADER + len(handle), flags, handle_type))
    return header + uuid + handle


def index_name(origin: bytes) -> bytes:
    return origin.hex().encode()


def parse_nlink(value: bytes | None) -> tuple[str, int] | None:
    """``overlay.nlink`` as (base, difference): base "U" (upper) or "L" (lower); None if
    missing or malformed (the kernel then uses the upper inode's count)."""
    if not value:
        return None
    text = value.rstrip(b"\0").decode("ascii", errors="replace")
    if len(text) < 3 or text[0] not in "UL" or text[1] not in "+-":
        return None
    try:
        return text[0], int(text[1:])
    except ValueError:
        return None


def index_entry_unused(upper_nlink: int, record: tuple[str, int] | None) -> bool:
    """Does an index entry linked ``upper_nlink`` times (1: by the index only) with this
    ``overlay.nlink`` record stand for no name at all (merged link count 0)?"""
    return upper_nlink == 1 and record is not None and record[0] == "U" and 1 + record[1] <= 0


def encode_nlink(upper_difference: int) -> bytes:
    """The ``overlay.nlink`` value for a merged count of upper link count + difference."""
    return b"U%+d" % upper_difference

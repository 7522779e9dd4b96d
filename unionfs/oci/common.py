"""What every part of the OCI annex shares: its errors, result records, the layout of an
imported image (constants), tar member names, and the progress line."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from unionfs import whiteout
from unionfs.exitcodes import EXIT_LAYER


class Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


log = logging.getLogger("unionfs.oci")  # one logger for the whole annex

MANIFEST_NAME = "manifest.json"
LAYERS_DIR = "layers"
MANIFEST_MEDIA_TYPE = "application/vnd.unionfs.image.v1+json"
NAME_MAX = 255
# The on-disk format is ``unionfs.whiteout``'s; these are its names as ``str`` (tar member names).
WHITEOUT_PREFIX = os.fsdecode(whiteout.OCI_WHITEOUT_PREFIX)
OPAQUE_MARKER = os.fsdecode(whiteout.OCI_OPAQUE_MARKER)
# unionfs's own introspection xattrs (``unionfs.introspection``) never travel in an image.
UNIONFS_PREFIXES = ("trusted.unionfs.", "user.unionfs.")
EXCLUDED_EXPORT_XATTRS = ("security.selinux",)


def is_image_private_xattr(name: str) -> bool:
    """An xattr in an image that is overlay or unionfs bookkeeping (dropped on import): a
    hostile image must never plant a whiteout, an opaque mark or a redirect as an xattr."""
    return name.startswith(whiteout.PRIVATE_PREFIXES + UNIONFS_PREFIXES)


def exported_xattr_name(stored: str) -> str | None:
    """The name an upper's stored xattr has in an exported layer, or None when it is not
    exported: the name the mount shows (an escaped ``trusted.overlay.overlay.X`` is the user's
    ``trusted.overlay.X``), never bookkeeping, never an SELinux label."""
    shown = whiteout.shown_xattr_name(stored)
    if shown is None or shown.startswith(UNIONFS_PREFIXES) or shown in EXCLUDED_EXPORT_XATTRS:
        return None
    return shown


COPY_CHUNK = 1 << 20
# Errors that concern one member only (skip it with a warning); anything else aborts the import.
MEMBER_ERRNOS = frozenset(
    {errno.ELOOP, errno.ENOTDIR, errno.EEXIST, errno.EPERM, errno.EACCES, errno.EINVAL,
     errno.ENAMETOOLONG, errno.EISDIR, errno.ENOENT, errno.EMLINK, errno.ENOTEMPTY}
)  # fmt: skip


class ImageError(Exception):
    """A broken or unusable image, layer or upper. The CLI prints it on one line, exit 3."""

    exit_code = EXIT_LAYER

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line


class SkipMember(Exception):
    """One tar member is hostile or not permitted: skip it with a warning."""


@dataclasses.dataclass
class LayerInfo:
    directory: Path
    digest: str  # digest of the blob as stored (maybe compressed)
    diff_id: str  # digest of the uncompressed tar
    members: int = 0
    skipped: int = 0


@dataclasses.dataclass
class ImportResult:
    dest: Path
    manifest: Path
    layers: list[LayerInfo]  # base first, including layers that were already there
    new_layers: list[LayerInfo]
    warnings: list[str]
    config: dict[str, Any]

    @property
    def layer_dirs(self) -> list[Path]:
        return [layer.directory for layer in self.layers]


@dataclasses.dataclass
class DiffResult:
    digest: str  # sha256 of the bytes written (the blob digest)
    diff_id: str  # sha256 of the uncompressed tar
    size: int  # bytes written
    compressed: bool
    members: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    hardlinks: int = 0
    redirects: int = 0
    metacopies: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return f"digest {self.digest}\ndiff_id {self.diff_id}"


# --------------------------------------------------------------------------------------------
# Small utilities


class Progress:
    """A single self-overwriting stderr line, only on a TTY."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self.last = 0.0
        self.shown = False

    def update(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        sys.stderr.write(f"\r\033[K{self.label}: {text}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.enabled and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def split_member_name(name: str) -> tuple[str, ...]:
    """Tar member name -> components; raise SkipMember for absolute/``..``/over-long names."""
    if name.startswith("/"):
        raise SkipMember("absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise SkipMember("'..' component")
    for part in parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise SkipMember(f"name component longer than {NAME_MAX} bytes")
    return parts

"""OCI image layers in and out: ``import_image`` (image -> layer dirs) and ``diff_upper``
(upper layer -> OCI layer tarball).

Public interface (wired into the CLI by ``unionfs.cli``):

``import_image(image: Path, dest: Path, *, progress: bool) -> ImportResult``
    ``image`` is an OCI image layout directory (``oci-layout`` + ``index.json``), an OCI archive
    (the same in a tar: ``podman save --format oci-archive``), a ``docker save``/``podman save``
    tarball or extracted directory (``manifest.json``), or a bare layer tarball (one layer).
    Layers are unpacked base first into ``dest/layers/<n>-<shortdigest>/`` and listed in
    ``dest/manifest.json`` (see :func:`image_layers`). When ``dest`` already holds an image
    imported by us, a bare layer tarball is stacked *on top* of the existing ones (this is how a
    ``diff_upper`` tarball is added as a new layer; the same tarball again adds nothing); an
    image adds only the layers ``dest`` does not start with already (the same image again adds
    nothing) and is refused when ``dest``'s layers are not its first ones. ``dest`` must
    otherwise be missing or empty. A failed import removes every layer it unpacked (and
    ``dest`` when it made it): ``dest`` is as before.
    Conversion: ``.wh.NAME`` becomes an overlay whiteout (char device 0/0) when ``mknod`` of one
    works here, else it stays a ``.wh.NAME`` file (unionfs reads both); ``.wh..wh..opq`` becomes
    ``trusted.overlay.opaque=y`` as root, ``user.overlay.opaque=y`` otherwise, or stays a marker
    file when the filesystem refuses xattrs. Owners are kept when root, modes, mtimes, PAX
    ``SCHILY.xattr.*`` xattrs (except overlay bookkeeping ones), hard links within the layer, and
    device nodes when ``mknod`` is permitted.
    Hostile members are skipped with a one-line warning (on the ``unionfs.oci`` logger, and in
    ``ImportResult.warnings``): absolute paths, ``..`` components, names over 255 bytes, members
    whose parent is a symlink (that includes a symlink planted by an earlier member), hard links
    to outside the layer or to members not extracted before, device nodes for an unprivileged
    user. Nothing is ever written outside ``dest``: every path component is opened relative to its
    parent directory fd with ``O_NOFOLLOW``; no path is ever joined through an extracted entry.
    A broken image (bad JSON, missing blob, digest mismatch, unknown compression) raises
    :class:`ImageError`; the CLI prints its one-line message and exits 3. gzip layers are read with
    the stdlib, zstd layers with the ``zstandard`` module or the ``zstd`` program when present.

``diff_upper(upper: Path, out: Path | BinaryIO, *, progress: bool, lowers=None, gzip=None)``
    ``-> DiffResult``
    Export an upper (writable) layer as an OCI layer tarball (PAX format, sorted, deterministic):
    overlay whiteouts (char 0/0) and ``.wh.NAME`` files become ``.wh.NAME`` entries; opaque
    directories (``{trusted,user}.overlay.opaque=y``, ``user.fuseoverlayfs.opaque=y`` or a
    ``.wh..wh..opq`` file) get one ``DIR/.wh..wh..opq`` entry; hard links inside the upper become
    tar hard links; xattrs are written as PAX ``SCHILY.xattr.*`` except overlay/fuse-overlayfs
    bookkeeping ones and ``security.selinux``. A directory carrying ``overlay.redirect`` (a renamed
    lower directory) is exported *fully*: its merged content is read from ``lowers`` (paths,
    base first, needed only in that case: :class:`ImageError` otherwise), it is marked opaque, and a
    whiteout for the old name is added unless the upper already holds one. A metadata-only
    copy-up (a file with ``overlay.metacopy``) is exported with its data read from the lower file
    it stands for (its ``overlay.redirect`` path, else the same path); that also needs ``lowers``.
    Works on a live mount's upper too (files changing while read may fail with
    :class:`ImageError`). ``out`` ending in
    ``.gz``/``.tgz`` (or ``gzip=True``) is gzip-compressed. The result carries the sha256 digest of
    the bytes written (``digest``) and of the uncompressed tar (``diff_id``); the CLI prints them.

``image_layers(dest: Path) -> list[Path]``
    The layer directories of an imported image, base first (for ``unionfs mount --image DEST``).
    Raises :class:`ImageError` when the manifest is missing or points outside ``dest``.

``image_config(dest: Path) -> dict``: the image's runtime config (``Env``, ``Cmd``, ...), maybe {}.

Progress: a one-line counter on stderr, only when ``progress`` is true and stderr is a TTY.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip as gzip_module
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from unionfs import safeio
from unionfs.layer import Layer
from unionfs.stack import Stack


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LAYERS_DIR = "layers"
MANIFEST_MEDIA_TYPE = "application/vnd.unionfs.image.v1+json"
NAME_MAX = 255
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
METACOPY_XATTRS = ("trusted.overlay.metacopy", "user.overlay.metacopy")
PRIVATE_XATTR_PREFIXES = (
    "trusted.overlay.",
    "user.overlay.",
    "user.fuseoverlayfs.",
    "trusted.unionfs.",
    "user.unionfs.",
)
EXCLUDED_EXPORT_XATTRS = ("security.selinux",)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
COPY_CHUNK = 1 << 20
# Errors that concern one member only (skip it with a warning); anything else aborts the import.
MEMBER_ERRNOS = frozenset(
    {errno.ELOOP, errno.ENOTDIR, errno.EEXIST, errno.EPERM, errno.EACCES, errno.EINVAL,
     errno.ENAMETOOLONG, errno.EISDIR, errno.ENOENT, errno.EMLINK, errno.ENOTEMPTY}
)  # fmt: skip


class ImageError(Exception):
    """A broken or unusable image, layer or upper. The CLI prints it on one line, exit 3."""

    exit_code = 3

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


class _Progress:
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


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class _HashingReader(io.RawIOBase):
    """Reads through to ``raw`` while hashing and counting the bytes."""

    def __init__(self, raw: _Reader, on_read: Callable[[int], None] | None = None) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        self.count += n
        if self.on_read is not None:
            self.on_read(n)
        return n

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _HashingWriter(io.RawIOBase):
    def __init__(self, raw: io.RawIOBase | gzip_module.GzipFile | IO[bytes] | BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.raw.write(view)
        self.hash.update(view)
        self.count += len(view)
        return len(view)

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _can_mknod_whiteout(dir_fd: int) -> bool:
    """Whether a 0/0 char device can be created here (root, or unprivileged since Linux 5.8)."""
    name = f".unionfs-probe-{os.getpid()}"
    try:
        os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=dir_fd)
    except OSError:
        return False
    os.unlink(name, dir_fd=dir_fd)
    return True


def _split_member_name(name: str) -> tuple[str, ...]:
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


def _remove_entry(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` whatever it is (a directory recursively, never following)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o700)
        for entry in os.listdir(fd):
            _remove_entry(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _xattr_path(dir_fd: int, name: str | None) -> str:
    """Reach ``name`` in ``dir_fd`` for an l*xattr call without re-walking any path."""
    base = f"/proc/self/fd/{dir_fd}"
    return base if name is None else f"{base}/{name}"


# --------------------------------------------------------------------------------------------
# Image sources


class _Source:
    """Access to an image's files: a directory or an (uncompressed or compressed) tarball."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.names: set[str] = set()
        if path.is_dir():
            return
        try:
            self.tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by close())
        except (tarfile.TarError, OSError) as error:
            raise ImageError(f"{path}: not an image directory or tarball ({error})") from error
        try:
            self.names = {m.name.removeprefix("./") for m in self.tar.getmembers()}
        except (tarfile.TarError, OSError, EOFError) as error:
            self.tar.close()
            raise ImageError(f"{path}: truncated or corrupt tarball ({error})") from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def has(self, name: str) -> bool:
        if self.tar is None:
            parts = _split_member_name(name)
            fd = os.open(self.path, DIR_FLAGS)
            try:
                for part in parts[:-1]:
                    new = os.open(part, DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = new
                st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
                return stat.S_ISREG(st.st_mode)
            except OSError:
                return False
            finally:
                os.close(fd)
        return name in self.names

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        try:
            parts = _split_member_name(name)
        except SkipMember as error:
            raise ImageError(f"{self.path}: bad blob reference {name!r}: {error}") from None
        if not parts:
            raise ImageError(f"{self.path}: empty blob reference")
        if self.tar is None:
            fd = os.open(self.path, DIR_FLAGS)
            try:
                for part in parts[:-1]:
                    new = os.open(part, DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = new
                file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as error:
                raise ImageError(f"{self.path}: cannot open {name}: {error.strerror}") from None
            finally:
                os.close(fd)
            with os.fdopen(file_fd, "rb") as opened:
                yield opened
            return
        member = None
        for candidate in (name, "./" + name):
            with contextlib.suppress(KeyError):
                member = self.tar.getmember(candidate)
                break
        # Old ``docker save`` archives share a layer.tar between images with a symlink; tarfile
        # resolves such links to another member of the archive (never to the filesystem).
        if member is None or not (member.isfile() or member.issym() or member.islnk()):
            raise ImageError(f"{self.path}: missing blob {name}")
        try:
            extracted = self.tar.extractfile(member)
        except KeyError:
            extracted = None
        if extracted is None:
            raise ImageError(f"{self.path}: cannot read {name}")
        with extracted:
            yield extracted

    def read_json(self, name: str) -> Any:
        with self.open(name) as f:
            data = f.read(64 << 20)
        try:
            return json.loads(data)
        except ValueError as error:
            raise ImageError(f"{self.path}: {name} is not valid JSON ({error})") from None


@dataclasses.dataclass
class _LayerRef:
    blob: str  # path of the blob inside the source
    digest: str | None  # expected digest of the blob bytes (None: unknown)
    diff_id: str | None  # expected digest of the uncompressed tar (None: unknown)
    media_type: str = ""


def _blob_path(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    if (
        algorithm != "sha256"
        or len(hexdigest) != 64
        or not all(c in "0123456789abcdef" for c in hexdigest)
    ):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    return f"blobs/sha256/{hexdigest}"


def _pick_manifest(source: _Source, index: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{source.path}: index lists no manifests")
    if depth > 4:
        raise ImageError(f"{source.path}: nested indexes too deep")

    def score(m: dict[str, Any]) -> int:
        platform = m.get("platform") or {}
        arch = platform.get("architecture")
        if platform.get("os") not in (None, "linux"):
            return 0
        return 2 if arch in (None, "amd64", os.uname().machine) else 1

    chosen = max(manifests, key=score)
    document = source.read_json(_blob_path(str(chosen.get("digest", ""))))
    if not isinstance(document, dict):
        raise ImageError(f"{source.path}: manifest is not an object")
    if "manifests" in document:  # an image index: descend
        return _pick_manifest(source, document, depth + 1)
    return document


def _read_layout(source: _Source) -> tuple[list[_LayerRef], dict[str, Any]]:
    """Layer references (base first) and image config of any supported image form."""
    if source.has("index.json"):
        index = source.read_json("index.json")
        if not isinstance(index, dict):
            raise ImageError(f"{source.path}: index.json is not an object")
        manifest = _pick_manifest(source, index)
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{source.path}: manifest has no layers list")
        config: dict[str, Any] = {}
        diff_ids: list[Any] = []
        config_ref = manifest.get("config") or {}
        if isinstance(config_ref, dict) and config_ref.get("digest"):
            blob = _blob_path(str(config_ref["digest"]))
            if source.has(blob):
                document = source.read_json(blob)
                if isinstance(document, dict):
                    config = document
                    diff_ids = list((document.get("rootfs") or {}).get("diff_ids") or [])
        refs = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or "digest" not in layer:
                raise ImageError(f"{source.path}: malformed layer entry {i}")
            digest = str(layer["digest"])
            diff_id = str(diff_ids[i]) if i < len(diff_ids) else None
            refs.append(
                _LayerRef(_blob_path(digest), digest, diff_id, str(layer.get("mediaType", "")))
            )
        return refs, config
    if source.has("manifest.json"):
        manifest_list = source.read_json("manifest.json")
        if not isinstance(manifest_list, list) or not manifest_list:
            raise ImageError(f"{source.path}: manifest.json is not a docker save manifest")
        entry = manifest_list[0]
        if not isinstance(entry, dict) or not isinstance(entry.get("Layers"), list):
            raise ImageError(f"{source.path}: manifest.json has no Layers")
        config = {}
        diff_ids = []
        if entry.get("Config"):
            document = source.read_json(str(entry["Config"]))
            if isinstance(document, dict):
                config = document
                diff_ids = list((document.get("rootfs") or {}).get("diff_ids") or [])
        refs = []
        for i, blob in enumerate(entry["Layers"]):
            diff_id = str(diff_ids[i]) if i < len(diff_ids) else None
            # docker-archive layers are stored uncompressed: their digest is the diff_id.
            refs.append(_LayerRef(str(blob), None, diff_id))
        return refs, config
    if source.tar is not None:
        return [_LayerRef("", None, None, "bare layer")], {}
    raise ImageError(f"{source.path}: neither an OCI layout (index.json) nor a docker save dir")


# --------------------------------------------------------------------------------------------
# Decompression


def _decompressed(stream: io.RawIOBase) -> _Reader:
    """Wrap a layer blob stream into its uncompressed tar stream (gzip, zstd or plain)."""
    buffered = io.BufferedReader(stream, buffer_size=COPY_CHUNK)
    head = buffered.peek(4)[:4]
    if head[:2] == b"\x1f\x8b":
        return gzip_module.GzipFile(fileobj=buffered, mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        return _zstd_reader(buffered)
    return buffered


def _zstd_reader(stream: _Reader) -> _Reader:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        reader: _Reader = zstandard.ZstdDecompressor().stream_reader(stream)
        return reader
    program = shutil.which("zstd")
    if program is None:
        raise ImageError(
            "layer is zstd-compressed: install the 'zstandard' Python package or the zstd program"
        )
    return _PipeReader([program, "-dc"], stream)


class _PipeReader(io.RawIOBase):
    """Stream ``source`` through a filter program, reading its stdout."""

    def __init__(self, command: list[str], source: _Reader) -> None:
        import threading

        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdout = self.proc.stdout
        stdin = self.proc.stdin

        def feed() -> None:
            try:
                while chunk := source.read(COPY_CHUNK):
                    stdin.write(chunk)
            except (BrokenPipeError, ValueError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    stdin.close()

        self.feeder = threading.Thread(target=feed, daemon=True)
        self.feeder.start()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stdout.read(len(buffer))
        buffer[: len(data)] = data
        if not data:
            self.feeder.join()
            if self.proc.wait() != 0:
                assert self.proc.stderr is not None
                message = self.proc.stderr.read().decode(errors="replace").strip()
                raise ImageError(f"zstd failed: {message}")
        return len(data)


# --------------------------------------------------------------------------------------------
# Layer extraction


class _LayerWriter:
    """Unpack one layer tar stream into the directory ``root_fd`` refers to, safely."""

    def __init__(
        self, root_fd: int, *, label: str, mknod_ok: bool, warn: Callable[[str], None]
    ) -> None:
        self.root_fd = root_fd
        self.label = label
        self.is_root = os.geteuid() == 0
        self.mknod_ok = mknod_ok
        self.warn = warn
        # In a user namespace euid 0 may not write trusted.* xattrs: fall back to user.*.
        self.opaque_xattrs = (
            ("trusted.overlay.opaque", "user.overlay.opaque")
            if self.is_root
            else ("user.overlay.opaque",)
        )
        self.chown_failures = 0
        self.directories: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
        self.extracted: set[tuple[str, ...]] = set()  # non-directories written by this layer
        self.members = 0
        self.skipped = 0
        self.xattr_failures: dict[str, int] = {}

    # -- walking

    def _open_parent(self, parts: tuple[str, ...], *, create: bool) -> int:
        """Open the directory holding ``parts[-1]``, component by component, never following."""
        fd = os.dup(self.root_fd)
        try:
            for part in parts[:-1]:
                try:
                    new = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    new = os.open(part, DIR_FLAGS, dir_fd=fd)
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise SkipMember(
                            f"parent {part!r} is a symlink or not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = new
            return fd
        except BaseException:
            os.close(fd)
            raise

    # -- members

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self.members += 1
        try:
            self._add(member, tar)
        except SkipMember as reason:
            self.skipped += 1
            self.warn(f"{self.label}: skipped {member.name!r}: {reason}")
        except OSError as error:
            if error.errno not in MEMBER_ERRNOS:
                raise ImageError(f"{self.label}: {member.name!r}: {error}") from None
            self.skipped += 1
            self.warn(f"{self.label}: skipped {member.name!r}: {error.strerror or error}")

    def _add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        parts = _split_member_name(member.name)
        if not parts:  # the layer root itself ("./"): keep our own root's metadata
            return
        name = parts[-1]
        if name == OPAQUE_MARKER:
            self._opaque(parts)
            return
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, name[len(WHITEOUT_PREFIX) :])
            return
        if member.isdir():
            self._directory(parts, member)
            return
        if member.islnk():
            self._hardlink(parts, member)
            return
        if not (
            member.isreg() or member.issym() or member.ischr() or member.isblk() or member.isfifo()
        ):
            raise SkipMember(f"unsupported member type {member.type!r}")
        if (member.ischr() or member.isblk()) and not self._device_allowed(member):
            raise SkipMember("device node not permitted for an unprivileged user")
        parent = self._open_parent(parts, create=True)
        try:
            _remove_entry(parent, name)
            if member.isreg():
                self._regular(parent, name, member, tar)
            else:
                if member.issym():
                    os.symlink(member.linkname, name, dir_fd=parent)
                elif member.isfifo():
                    os.mkfifo(name, 0o600, dir_fd=parent)
                else:
                    kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                    device = os.makedev(member.devmajor, member.devminor)
                    os.mknod(name, kind | 0o600, device, dir_fd=parent)
                self._metadata_by_name(parent, name, member)
            self.extracted.add(parts)
        finally:
            os.close(parent)

    def _device_allowed(self, member: tarfile.TarInfo) -> bool:
        if member.ischr() and member.devmajor == 0 and member.devminor == 0:
            return self.mknod_ok  # an overlay-format whiteout: allowed unprivileged since 5.8
        return self.is_root

    def _regular(
        self, parent: int, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=parent,
        )  # fmt: skip
        try:
            source = tar.extractfile(member)
            if source is not None:
                remaining = member.size
                while remaining > 0:
                    chunk = source.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        raise SkipMember("truncated member data")
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    remaining -= len(chunk)
            self._metadata_fd(fd, member, name)
        finally:
            os.close(fd)

    def _hardlink(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        try:
            target = _split_member_name(member.linkname)
        except SkipMember as reason:
            raise SkipMember(f"hard link target {member.linkname!r}: {reason}") from None
        if not target or target not in self.extracted:
            raise SkipMember(f"hard link to {member.linkname!r}, not a member extracted before")
        if target == parts:
            return
        target_parent = self._open_parent(target, create=False)
        try:
            parent = self._open_parent(parts, create=True)
            try:
                _remove_entry(parent, parts[-1])
                os.link(
                    target[-1], parts[-1], src_dir_fd=target_parent, dst_dir_fd=parent,
                    follow_symlinks=False,
                )  # fmt: skip
                self.extracted.add(parts)
            finally:
                os.close(parent)
        finally:
            os.close(target_parent)

    def _directory(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        parent = self._open_parent(parts, create=True)
        try:
            name = parts[-1]
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                _remove_entry(parent, name)
                st = None
            if st is None:
                os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            try:
                self._xattrs(fd, None, member)
            finally:
                os.close(fd)
            self.extracted.discard(parts)
            self.directories.append((parts, member))
        finally:
            os.close(parent)

    def _whiteout(self, parts: tuple[str, ...], target: str) -> None:
        if target in ("", ".", ".."):
            raise SkipMember("malformed whiteout")
        parent = self._open_parent(parts, create=True)
        try:
            try:
                os.stat(target, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                # OCI: a whiteout only hides lower layers, never this layer's own entry.
                return
            if self.mknod_ok:
                os.mknod(target, stat.S_IFCHR | 0o000, 0, dir_fd=parent)
            else:
                name = WHITEOUT_PREFIX + target
                _remove_entry(parent, name)
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o000,
                             dir_fd=parent)  # fmt: skip
                os.close(fd)
        finally:
            os.close(parent)

    def _opaque(self, parts: tuple[str, ...]) -> None:
        parent = self._open_parent(parts, create=True)
        try:
            for attribute in self.opaque_xattrs:
                try:
                    os.setxattr(parent, attribute, b"y")
                    return
                except OSError as error:
                    if error.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                        raise
            _remove_entry(parent, OPAQUE_MARKER)
            fd = os.open(OPAQUE_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o000, dir_fd=parent)  # fmt: skip
            os.close(fd)
        finally:
            os.close(parent)

    # -- metadata

    def _xattr_items(self, member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attribute = key[len("SCHILY.xattr.") :]
            if attribute.startswith(PRIVATE_XATTR_PREFIXES):
                self.warn(
                    f"{self.label}: dropped overlay-private xattr {attribute} on {member.name!r}"
                )
                continue
            yield attribute, value.encode("utf-8", "surrogateescape")

    def _xattrs(self, fd: int, name: str | None, member: tarfile.TarInfo) -> None:
        for attribute, value in self._xattr_items(member):
            try:
                if name is None:
                    os.setxattr(fd, attribute, value)
                else:
                    os.setxattr(_xattr_path(fd, name), attribute, value, follow_symlinks=False)
            except OSError as error:
                key = (
                    f"{attribute.split('.')[0]}.* ({errno.errorcode.get(error.errno or 0, error)})"
                )
                self.xattr_failures[key] = self.xattr_failures.get(key, 0) + 1

    def _metadata_fd(self, fd: int, member: tarfile.TarInfo, name: str) -> None:
        self._xattrs(fd, None, member)
        if self.is_root:
            self._chown(lambda: os.fchown(fd, member.uid, member.gid))
        os.fchmod(fd, member.mode & 0o7777)
        ns = int(member.mtime * 1_000_000_000)
        os.utime(fd, ns=(ns, ns))

    def _chown(self, call: Callable[[], None]) -> None:
        # Root in a user namespace cannot give away unmapped ids (EINVAL/EPERM): keep ours.
        try:
            call()
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EPERM):
                raise
            self.chown_failures += 1

    def _metadata_by_name(self, parent: int, name: str, member: tarfile.TarInfo) -> None:
        self._xattrs(parent, name, member)
        if self.is_root:
            self._chown(
                lambda: os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
            )
        if not member.issym():
            # Linux cannot chmod without following; ``name`` is the fifo/device we just made
            # in a directory only this import writes.
            os.chmod(name, member.mode & 0o7777, dir_fd=parent)
        ns = int(member.mtime * 1_000_000_000)
        os.utime(name, ns=(ns, ns), dir_fd=parent, follow_symlinks=False)

    def finish(self) -> None:
        """Directory metadata last, deepest first, so modes like 0555 do not block children."""
        seen: set[tuple[str, ...]] = set()
        for parts, member in sorted(self.directories, key=lambda item: -len(item[0])):
            if parts in seen:
                continue
            seen.add(parts)
            try:
                parent = self._open_parent(parts, create=False)
            except (OSError, SkipMember):
                continue  # replaced by a later member
            try:
                fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
            except OSError:
                os.close(parent)
                continue
            try:
                if self.is_root:
                    self._chown(lambda: os.fchown(fd, member.uid, member.gid))  # noqa: B023
                os.fchmod(fd, member.mode & 0o7777)
                ns = int(member.mtime * 1_000_000_000)
                os.utime(fd, ns=(ns, ns))
            except OSError as error:
                self.warn(f"{self.label}: metadata of {member.name!r}: {error.strerror}")
            finally:
                os.close(fd)
                os.close(parent)
        if self.chown_failures:
            self.warn(f"{self.label}: owner of {self.chown_failures} member(s) not kept (unmapped)")
        for key, count in sorted(self.xattr_failures.items()):
            self.warn(f"{self.label}: {count} xattr(s) {key} could not be set")


# --------------------------------------------------------------------------------------------
# import_image


def _open_dest(dest: Path) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """Open (creating) ``dest``; return its fd and the layers/config of an image already there."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, DIR_FLAGS)
    except OSError as error:
        raise ImageError(f"{dest}: cannot use as destination: {error.strerror}") from None
    existing: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    entries = os.listdir(fd)
    if entries:
        if MANIFEST_NAME not in entries:
            os.close(fd)
            raise ImageError(f"{dest}: destination is not empty and holds no unionfs image")
        document = _load_manifest(dest)
        existing = list(document["layers"])
        config = dict(document.get("config") or {})
    return fd, existing, config


def _load_manifest(dest: Path) -> dict[str, Any]:
    try:
        fd = os.open(dest, DIR_FLAGS)
        try:
            mfd = os.open(MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        with os.fdopen(mfd, "rb") as f:
            document = json.loads(f.read(16 << 20))
    except OSError as error:
        raise ImageError(f"{dest}: no image manifest ({error.strerror})") from None
    except ValueError as error:
        raise ImageError(f"{dest}/{MANIFEST_NAME}: invalid JSON ({error})") from None
    if (
        not isinstance(document, dict)
        or document.get("mediaType") != MANIFEST_MEDIA_TYPE
        or not isinstance(document.get("layers"), list)
    ):
        raise ImageError(f"{dest}/{MANIFEST_NAME}: not a unionfs image manifest")
    for layer in document["layers"]:
        if not isinstance(layer, dict) or not _valid_layer_dir_name(layer.get("dir")):
            raise ImageError(f"{dest}/{MANIFEST_NAME}: bad layer entry {layer!r}")
    return document


def _valid_layer_dir_name(value: object) -> bool:
    if not isinstance(value, str) or not value.startswith(LAYERS_DIR + "/"):
        return False
    name = value[len(LAYERS_DIR) + 1 :]
    return bool(name) and "/" not in name and name not in (".", "..")


def image_layers(dest: Path) -> list[Path]:
    """Layer directories of an image imported into ``dest``, base first."""
    document = _load_manifest(dest)
    layers = []
    for layer in document["layers"]:
        path = dest / layer["dir"]
        if path.is_symlink() or not path.is_dir():
            raise ImageError(f"{path}: layer directory missing")
        layers.append(path)
    return layers


def image_config(dest: Path) -> dict[str, Any]:
    """The image's runtime config (``Env``, ``Cmd``, ``Entrypoint``, ``WorkingDir``), maybe {}."""
    config = _load_manifest(dest).get("config") or {}
    return dict(config) if isinstance(config, dict) else {}


def _write_manifest(dest_fd: int, document: dict[str, Any]) -> None:
    data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    tmp = f".{MANIFEST_NAME}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dest_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dest_fd)  # fmt: skip
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, MANIFEST_NAME, src_dir_fd=dest_fd, dst_dir_fd=dest_fd)


def import_image(
    image: Path, dest: Path, *, progress: bool, warn: Callable[[str], None] | None = None
) -> ImportResult:
    """Unpack ``image`` into ``dest`` (see the module docstring). Raises :class:`ImageError`;
    a failed import leaves ``dest`` as it was (the layers it unpacked are removed, and ``dest``
    itself when this import made it)."""
    try:
        return _import_image(image, dest, progress=progress, warn=warn)
    except (tarfile.TarError, EOFError, gzip_module.BadGzipFile, zlib_error()) as error:
        raise ImageError(f"{image}: truncated or corrupt image ({error})") from None


def _import_image(
    image: Path, dest: Path, *, progress: bool, warn: Callable[[str], None] | None
) -> ImportResult:
    warnings: list[str] = []

    def _warn(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)
        else:
            log.warning("%s", message)

    if not image.exists():
        raise ImageError(f"{image}: no such image")
    made_dest = not dest.exists()
    source = _Source(image)
    try:
        refs, config = _read_layout(source)
        bare = not source.has("index.json") and not source.has("manifest.json")
        dest_fd, existing, old_config = _open_dest(dest)
    except BaseException:
        source.close()
        if made_dest:
            with contextlib.suppress(OSError):
                dest.rmdir()
        raise
    made: list[str] = []  # layer directories this import created (removed if it fails)
    made_layers_dir = False
    layers_fd = -1
    try:
        refs = _layers_to_import(image, dest, refs, existing, bare=bare)
        with contextlib.suppress(FileExistsError):
            os.mkdir(LAYERS_DIR, 0o755, dir_fd=dest_fd)
            made_layers_dir = True
        layers_fd = os.open(LAYERS_DIR, DIR_FLAGS, dir_fd=dest_fd)
        mknod_ok = _can_mknod_whiteout(layers_fd)
        new_layers: list[LayerInfo] = []
        bar = _Progress(progress, f"import {image.name}")
        try:
            for i, ref in enumerate(refs):
                number = len(existing) + i
                info = _import_layer(
                    source, ref, dest, layers_fd, number,
                    label=f"layer {i + 1}/{len(refs)}", mknod_ok=mknod_ok, warn=_warn, bar=bar,
                )  # fmt: skip
                made.append(info.directory.name)
                new_layers.append(info)
        finally:
            bar.close()
        runtime = config.get("config") if isinstance(config.get("config"), dict) else None
        merged_config = dict(runtime) if runtime else old_config
        all_layers = [
            LayerInfo(
                dest / layer["dir"], str(layer.get("digest", "")), str(layer.get("diff_id", ""))
            )
            for layer in existing
        ] + new_layers
        document = {
            "schemaVersion": 1,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "layers": [
                {
                    "dir": f"{LAYERS_DIR}/{layer.directory.name}",
                    "digest": layer.digest,
                    "diff_id": layer.diff_id,
                }
                for layer in all_layers
            ],
            "config": merged_config,
            "source": str(image),
        }
        if new_layers or not existing:
            _write_manifest(dest_fd, document)
    except BaseException:
        if layers_fd >= 0:
            for name in made:
                with contextlib.suppress(OSError):
                    _remove_entry(layers_fd, name)
        if made_dest or made_layers_dir:
            with contextlib.suppress(OSError):
                os.rmdir(LAYERS_DIR, dir_fd=dest_fd)  # only when empty now
        if made_dest:
            with contextlib.suppress(OSError):
                dest.rmdir()
        raise
    finally:
        if layers_fd >= 0:
            os.close(layers_fd)
        os.close(dest_fd)
        source.close()
    return ImportResult(
        dest=dest, manifest=dest / MANIFEST_NAME, layers=all_layers, new_layers=new_layers,
        warnings=warnings, config=merged_config,
    )  # fmt: skip


def _layer_key(digest: object, diff_id: object) -> tuple[str, str]:
    return (str(digest or ""), str(diff_id or ""))


def _same_layer(ref: _LayerRef, existing: dict[str, Any]) -> bool:
    """Whether an image's layer is the layer already unpacked (by diff_id, else digest)."""
    if ref.diff_id and existing.get("diff_id"):
        return bool(ref.diff_id == existing["diff_id"])
    if ref.digest and existing.get("digest"):
        return bool(ref.digest == existing["digest"])
    return False


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(COPY_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _layers_to_import(
    image: Path, dest: Path, refs: list[_LayerRef], existing: list[dict[str, Any]], *, bare: bool
) -> list[_LayerRef]:
    """Which of ``image``'s layers to unpack into ``dest``: all of them into an empty ``dest``;
    a bare layer tarball goes on top (not again when it already is the top layer); an image
    whose first layers are already there adds the rest (nothing when it is all there); an image
    that does not start with ``dest``'s layers is refused."""
    if not existing:
        return refs
    if bare:
        if refs and existing[-1].get("digest") == _file_digest(image):
            return []  # importing the same layer again changes nothing
        return refs
    count = len(existing)
    if count > len(refs) or not all(
        _same_layer(ref, layer) for ref, layer in zip(refs, existing, strict=False)
    ):
        raise ImageError(
            f"{dest} already holds another image ({count} layers) that {image} does not "
            "start with: import it into an empty directory (a bare layer tarball is stacked "
            "on top instead)"
        )
    return refs[count:]


def _import_layer(
    source: _Source, ref: _LayerRef, dest: Path, layers_fd: int, number: int, *,
    label: str, mknod_ok: bool, warn: Callable[[str], None], bar: _Progress,
) -> LayerInfo:  # fmt: skip
    staging = f".staging-{number}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        _remove_entry(layers_fd, staging)
    os.mkdir(staging, 0o755, dir_fd=layers_fd)
    root_fd = os.open(staging, DIR_FLAGS, dir_fd=layers_fd)
    done = 0

    def on_read(n: int) -> None:
        nonlocal done
        done += n
        bar.update(f"{label} {_human(done)}")

    try:
        with contextlib.ExitStack() as stack:
            if ref.blob:
                raw: IO[bytes] = stack.enter_context(source.open(ref.blob))
            else:  # a bare layer tarball: the image file itself
                raw = stack.enter_context(open(source.path, "rb"))
            hashed = _HashingReader(raw, on_read)
            tar_stream = _decompressed(hashed)
            uncompressed = _HashingReader(tar_stream)
            writer = _LayerWriter(root_fd, label=label, mknod_ok=mknod_ok, warn=warn)
            try:
                with tarfile.open(fileobj=uncompressed, mode="r|") as tar:
                    for member in tar:
                        writer.add(member, tar)
            except (tarfile.TarError, EOFError, gzip_module.BadGzipFile, zlib_error()) as error:
                raise ImageError(f"{label}: corrupt layer tar: {error}") from None
            uncompressed.drain()
            hashed.drain()
            writer.finish()
        digest = hashed.digest()
        diff_id = uncompressed.digest()
        if ref.digest is not None and ref.digest != digest:
            raise ImageError(
                f"{label}: digest mismatch: manifest says {ref.digest}, blob is {digest}"
            )
        if ref.diff_id is not None and ref.diff_id != diff_id:
            raise ImageError(
                f"{label}: diff_id mismatch: config says {ref.diff_id}, tar is {diff_id}"
            )
        final = f"{number:03d}-{diff_id.split(':', 1)[1][:12]}"
        with contextlib.suppress(FileNotFoundError):
            _remove_entry(layers_fd, final)
        os.rename(staging, final, src_dir_fd=layers_fd, dst_dir_fd=layers_fd)
        bar.update(f"{label} {_human(done)} done", force=True)
        return LayerInfo(
            dest / LAYERS_DIR / final, ref.digest or digest, diff_id,
            members=writer.members, skipped=writer.skipped,
        )  # fmt: skip
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_entry(layers_fd, staging)
        raise
    finally:
        os.close(root_fd)


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


# --------------------------------------------------------------------------------------------
# diff_upper


def _read_xattrs(fd: int, name: str | None) -> dict[str, bytes]:
    path: int | str = fd if name is None else _xattr_path(fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False) if name else os.listxattr(fd)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return {}
        raise
    values = {}
    for attribute in names:
        try:
            values[attribute] = (
                os.getxattr(fd, attribute) if name is None
                else os.getxattr(path, attribute, follow_symlinks=False)
            )  # fmt: skip
        except OSError:
            continue
    return values


def _is_opaque(xattrs: dict[str, bytes]) -> bool:
    return any(xattrs.get(a, b"").rstrip(b"\0") == b"y" for a in OPAQUE_XATTRS)


def _redirect_of(xattrs: dict[str, bytes]) -> tuple[bool, tuple[str, ...]] | None:
    for attribute in REDIRECT_XATTRS:
        value = xattrs.get(attribute)
        if not value:
            continue
        text = os.fsdecode(value.rstrip(b"\0"))
        parts = tuple(p for p in text.split("/") if p)
        if not parts or any(p in (".", "..") for p in parts):
            raise ImageError(f"invalid {attribute} value {value!r}")
        return text.startswith("/"), parts
    return None


def _is_whiteout_dev(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _LowerView:
    """Read-only merged view of the lower layers (top first), by unionfs's own lookup rules
    (``unionfs.stack``, those of kernel overlayfs): redirected directories and chains of
    metadata-only files in the lower layers (rotated uppers) are followed."""

    def __init__(self, lowers_top_first: list[Path]) -> None:
        self.layers: list[Layer] = []
        try:
            for index, path in enumerate(lowers_top_first):
                self.layers.append(Layer(str(path), index, writable=False))
        except BaseException:
            self.close()
            raise
        self.stack = Stack(self.layers)

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
        self.layers = []

    def data_file(
        self,
        parent: tuple[str, ...],
        name: str,
        redirect: tuple[bool, tuple[str, ...]] | None,
    ) -> int | None:
        """The data of metadata-only file ``name`` (carrying ``redirect``) whose directory's
        lower content is at ``parent``, opened read-only: the end of its metacopy chain."""
        sources = self.stack.walk(tuple(os.fsencode(part) for part in parent))
        target = None
        if redirect is not None:
            target = (redirect[0], tuple(os.fsencode(part) for part in redirect[1]))
        data = self.stack.data_below(sources or [], os.fsencode(name), target)
        if data is None:
            return None
        return safeio.open_lower_file(*data.layer.parent_and_name(data.path))

    def merged_dirs(self, parts: tuple[str, ...]) -> list[int]:
        """Directory fds (the caller closes them) making up the merged lower directory at
        ``parts`` in the lower layers' merged namespace, top first."""
        sources = self.stack.walk(tuple(os.fsencode(part) for part in parts)) or []
        fds = []
        for source in sources:
            try:
                fds.append(os.dup(source.layer.dir_fd(source.path)))
            except OSError:
                continue
        return fds


class _TarExporter:
    def __init__(self, tar: tarfile.TarFile, result: DiffResult, bar: _Progress) -> None:
        self.tar = tar
        self.result = result
        self.bar = bar
        self.links: dict[tuple[int, int], str] = {}
        self.lowers: _LowerView | None = None
        self.bytes = 0

    def _info(self, name: str, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = st.st_mtime_ns // 1_000_000_000
        pax: dict[str, str] = {}
        if st.st_mtime_ns % 1_000_000_000:
            pax["mtime"] = f"{st.st_mtime_ns / 1e9:.9f}"
        for attribute, value in sorted(xattrs.items()):
            if attribute.startswith(PRIVATE_XATTR_PREFIXES) or attribute in EXCLUDED_EXPORT_XATTRS:
                continue
            pax["SCHILY.xattr." + attribute] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
        return info

    def _marker(self, name: str, st: os.stat_result) -> None:
        info = tarfile.TarInfo(name)
        info.mode = 0o000
        info.mtime = st.st_mtime_ns // 1_000_000_000
        info.uname = info.gname = ""
        self.tar.addfile(info)
        self.result.members += 1

    def directory(self, fd: int, prefix: str, lower: tuple[str, ...]) -> None:
        """Export the children of directory ``fd`` (path ``prefix``, '' for the root).

        ``lower`` is where this directory's lower content lives (its own path unless it or a
        parent was renamed): metadata-only copies find their data below it.
        """
        names = sorted(os.listdir(fd))
        for name in names:
            path = f"{prefix}{name}"
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if name == OPAQUE_MARKER:
                continue  # emitted with its directory
            if _is_whiteout_dev(st):
                if name.startswith(WHITEOUT_PREFIX):
                    continue  # fuse-overlayfs's ".wh..opq" device and similar bookkeeping
                self._marker(f"{prefix}{WHITEOUT_PREFIX}{name}", st)
                self.result.whiteouts += 1
                continue
            if name.startswith(WHITEOUT_PREFIX):
                if stat.S_ISREG(st.st_mode):
                    self._marker(path, st)
                    self.result.whiteouts += 1
                else:
                    self.result.warnings.append(f"skipped {path!r}: reserved .wh. name")
                continue
            self.entry(fd, name, path, st, lower)

    def entry(
        self,
        parent: int,
        name: str,
        path: str,
        st: os.stat_result,
        lower: tuple[str, ...],
        *,
        from_lower: bool = False,
    ) -> None:
        self.bar.update(f"{self.result.members} entries, {_human(self.bytes)}")
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            try:
                xattrs = _read_xattrs(fd, None)
                redirect = _redirect_of(xattrs)
                info = self._info(path + "/", st, xattrs)
                info.type = tarfile.DIRTYPE
                self.tar.addfile(info)
                self.result.members += 1
                opaque = _is_opaque(xattrs) or os.path.lexists(_xattr_path(fd, OPAQUE_MARKER))
                if redirect is not None:
                    self._redirected(fd, path, redirect, st)
                    return
                if opaque:
                    self._marker(f"{path}/{OPAQUE_MARKER}", st)
                    self.result.opaque_dirs += 1
                self.directory(fd, path + "/", (*lower, name))
            finally:
                os.close(fd)
            return
        if stat.S_ISSOCK(st.st_mode):
            self.result.warnings.append(f"skipped socket {path!r}")
            return
        xattrs = _read_xattrs(parent, name)
        info = self._info(path, st, xattrs)
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in self.links:
            info.type = tarfile.LNKTYPE
            info.linkname = self.links[key]
            self.tar.addfile(info)
            self.result.members += 1
            self.result.hardlinks += 1
            return
        if st.st_nlink > 1:
            self.links[key] = path
        if stat.S_ISREG(st.st_mode):
            info.type = tarfile.REGTYPE
            if any(a in xattrs for a in METACOPY_XATTRS):
                fd = self._metacopy_data(path, name, xattrs, lower, from_lower=from_lower)
                info.size = os.fstat(fd).st_size
            else:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                info.size = os.fstat(fd).st_size
            with os.fdopen(fd, "rb") as f:
                try:
                    self.tar.addfile(info, f)
                except OSError as error:
                    raise ImageError(f"{path}: changed while exporting ({error})") from None
            self.bytes += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(name, dir_fd=parent)
            self.tar.addfile(info)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
            self.tar.addfile(info)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.tar.addfile(info)
        else:
            self.result.warnings.append(f"skipped {path!r}: unsupported file type")
            return
        self.result.members += 1

    def _metacopy_data(
        self,
        path: str,
        name: str,
        xattrs: dict[str, bytes],
        lower: tuple[str, ...],
        *,
        from_lower: bool = False,
    ) -> int:
        """The fd of a metadata-only file's data, found in the lower layers as kernel
        overlayfs finds it: at its redirect, else at its name in its directory's lower
        content (``lower``), following the chain of older metadata-only copies down to a
        file holding data. ``from_lower``: the file itself is in a lower layer (a merged
        directory's content), where the search starts from it (its redirect applies below
        it only)."""
        if self.lowers is None:
            raise ImageError(
                f"{path}: metadata-only copy-up (overlay.metacopy); its data lives in the lower"
                " layers: pass the lower layers to export it"
            )
        redirect = None if from_lower else _redirect_of(xattrs)
        fd = self.lowers.data_file(lower, name, redirect)
        if fd is None:
            where = "/".join(redirect[1]) if redirect is not None else "/".join((*lower, name))
            raise ImageError(f"{path}: data of metadata-only copy ({where}) missing")
        self.result.metacopies += 1
        return fd

    def _redirected(
        self, fd: int, path: str, redirect: tuple[bool, tuple[str, ...]], st: os.stat_result
    ) -> None:
        """A renamed lower directory: emit its full merged content, opaque, old name whited out."""
        if self.lowers is None:
            raise ImageError(
                f"{path}: directory was renamed (overlay.redirect); its content lives in the lower"
                " layers: pass the lower layers to export it"
            )
        self.result.redirects += 1
        absolute, parts = redirect
        here = tuple(path.split("/"))
        origin = parts if absolute else (*here[:-1], *parts)
        self._marker(f"{path}/{OPAQUE_MARKER}", st)
        self.result.opaque_dirs += 1
        self._merged(fd, origin, path)
        if origin != here:
            old = "/".join((*origin[:-1], WHITEOUT_PREFIX + origin[-1]))
            upper_has_whiteout = False
            try:
                parent = self._upper_open(origin[:-1])
            except OSError:
                parent = None
            if parent is not None:
                try:
                    # Anything at the old name (usually the whiteout the rename left) hides it.
                    os.stat(origin[-1], dir_fd=parent, follow_symlinks=False)
                    upper_has_whiteout = True
                except FileNotFoundError:
                    upper_has_whiteout = os.path.lexists(
                        _xattr_path(parent, WHITEOUT_PREFIX + origin[-1])
                    )
                finally:
                    os.close(parent)
            if not upper_has_whiteout:
                self._marker(old, st)
                self.result.whiteouts += 1

    upper_fd: int = -1

    def _upper_open(self, parts: tuple[str, ...]) -> int:
        fd = os.dup(self.upper_fd)
        for part in parts:
            try:
                new = os.open(part, DIR_FLAGS, dir_fd=fd)
            finally:
                os.close(fd)
            fd = new
        return fd

    def _merged(self, upper_fd: int | None, origin: tuple[str, ...], path: str) -> None:
        """Emit every child of the merged directory (upper_fd over lowers at ``origin``)."""
        assert self.lowers is not None
        layers = [] if upper_fd is None else [upper_fd]
        lower_fds = self.lowers.merged_dirs(origin)
        try:
            seen: set[str] = set()
            hidden: set[str] = set()
            children: list[tuple[str, int, int]] = []  # (name, layer index, kind)
            upper_opaque = False
            for index, dfd in enumerate([*layers, *lower_fds]):
                if index > 0 and upper_opaque:
                    break
                for name in sorted(os.listdir(dfd)):
                    if name == OPAQUE_MARKER:
                        continue
                    if name.startswith(WHITEOUT_PREFIX):
                        hidden.add(name[len(WHITEOUT_PREFIX) :])
                        continue
                    if name in seen or name in hidden:
                        continue
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if _is_whiteout_dev(st):
                        hidden.add(name)
                        continue
                    seen.add(name)
                    children.append((name, index, st.st_mode))
                if index == 0 and upper_fd is not None:
                    upper_opaque = _is_opaque(_read_xattrs(dfd, None))
            all_fds = [*layers, *lower_fds]
            for name, index, mode in sorted(children):
                dfd = all_fds[index]
                child_path = f"{path}/{name}"
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(mode):
                    cfd = os.open(name, DIR_FLAGS, dir_fd=dfd)
                    try:
                        xattrs = _read_xattrs(cfd, None)
                        info = self._info(child_path + "/", st, xattrs)
                        info.type = tarfile.DIRTYPE
                        self.tar.addfile(info)
                        self.result.members += 1
                        sub_upper = cfd if (index == 0 and upper_fd is not None) else None
                        sub_origin = (*origin, name)
                        redirect = _redirect_of(xattrs) if sub_upper is not None else None
                        if redirect is not None:  # renamed again inside a renamed directory
                            absolute, parts = redirect
                            sub_origin = parts if absolute else (*origin, *parts)
                        self._merged(sub_upper, sub_origin, child_path)
                    finally:
                        os.close(cfd)
                else:
                    from_lower = index > 0 or upper_fd is None
                    self.entry(dfd, name, child_path, st, origin, from_lower=from_lower)
        finally:
            for lfd in lower_fds:
                os.close(lfd)


def diff_upper(
    upper: Path,
    out: Path | BinaryIO,
    *,
    progress: bool,
    lowers: list[Path] | None = None,
    gzip: bool | None = None,
) -> DiffResult:
    """Export ``upper`` as an OCI layer tarball (see the module docstring)."""
    try:
        upper_fd = os.open(upper, DIR_FLAGS)
    except OSError as error:
        raise ImageError(f"{upper}: cannot open upper layer: {error.strerror}") from None
    if gzip is None:
        gzip = isinstance(out, Path) and out.name.endswith((".gz", ".tgz"))
    bar = _Progress(progress, f"diff {upper.name}")
    result = DiffResult(digest="", diff_id="", size=0, compressed=gzip)
    view = _LowerView(list(reversed(lowers))) if lowers else None
    tmp_path: Path | None = None
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(out, Path):
                tmp_path = out.with_name(f".{out.name}.tmp-{os.getpid()}")
                raw: IO[bytes] | BinaryIO = stack.enter_context(open(tmp_path, "wb"))
            else:
                raw = out
            blob = _HashingWriter(raw)
            sink: io.RawIOBase | gzip_module.GzipFile = blob
            if gzip:
                sink = gzip_module.GzipFile(fileobj=blob, mode="wb", mtime=0, compresslevel=6)
                stack.callback(sink.close)
            tar_hash = _HashingWriter(sink)
            with tarfile.open(
                fileobj=tar_hash, mode="w|", format=tarfile.PAX_FORMAT,
                encoding="utf-8", errors="surrogateescape",
            ) as tar:  # fmt: skip
                exporter = _TarExporter(tar, result, bar)
                exporter.upper_fd = upper_fd
                exporter.lowers = view
                exporter.directory(upper_fd, "", ())
        result.diff_id = tar_hash.digest()
        result.digest = blob.digest()
        result.size = blob.count
        if tmp_path is not None and isinstance(out, Path):
            os.rename(tmp_path, out)
            tmp_path = None
    except OSError as error:
        raise ImageError(f"{upper}: export failed: {error}") from None
    finally:
        bar.close()
        os.close(upper_fd)
        if view is not None:
            view.close()
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
    for message in result.warnings:
        log.warning("%s", message)
    return result

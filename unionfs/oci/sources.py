"""Image sources: an OCI layout, an OCI archive, a ``docker save`` tarball or directory, or a
bare layer tarball; which layers (base first) and which config they hold."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from unionfs import safeio
from unionfs.oci.common import ImageError, SkipMember, split_member_name


def _encoded(parts: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(os.fsencode(part) for part in parts)


class Source:
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
            parts = split_member_name(name)
            root = safeio.open_dir_path(self.path)
            try:
                fd = safeio.open_below(root, _encoded(parts[:-1]))
                try:
                    return stat.S_ISREG(safeio.lstat(fd, os.fsencode(parts[-1])).st_mode)
                finally:
                    os.close(fd)
            except OSError:
                return False
            finally:
                os.close(root)
        return name in self.names

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        try:
            parts = split_member_name(name)
        except SkipMember as error:
            raise ImageError(f"{self.path}: bad blob reference {name!r}: {error}") from None
        if not parts:
            raise ImageError(f"{self.path}: empty blob reference")
        if self.tar is None:
            root = safeio.open_dir_path(self.path)
            try:
                fd = safeio.open_below(root, _encoded(parts[:-1]))
                try:
                    file_fd = safeio.open_file(fd, os.fsencode(parts[-1]), os.O_RDONLY)
                finally:
                    os.close(fd)
            except OSError as error:
                raise ImageError(f"{self.path}: cannot open {name}: {error.strerror}") from None
            finally:
                os.close(root)
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
class LayerRef:
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


def _pick_manifest(source: Source, index: dict[str, Any], depth: int = 0) -> dict[str, Any]:
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


def read_layout(source: Source) -> tuple[list[LayerRef], dict[str, Any]]:
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
                LayerRef(_blob_path(digest), digest, diff_id, str(layer.get("mediaType", "")))
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
            refs.append(LayerRef(str(blob), None, diff_id))
        return refs, config
    if source.tar is not None:
        return [LayerRef("", None, None, "bare layer")], {}
    raise ImageError(f"{source.path}: neither an OCI layout (index.json) nor a docker save dir")

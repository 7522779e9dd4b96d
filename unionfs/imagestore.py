"""Find an image's layer directories in a Docker overlay2 store or a containers-storage store.

``unionfs mount --store DIR IMAGE MOUNTPOINT`` names an image where an engine keeps it; this
module turns (DIR, IMAGE) into the image's layer directories, base first, from the store's own
metadata. Two layouts are read, detected from what DIR holds:

- **Docker overlay2** (moby ``daemon/graphdriver/overlay2`` and ``image/``, ``layer/``):
  ``image/overlay2/repositories.json`` maps names (``busybox:latest``, familiar form) to image
  IDs; ``image/overlay2/imagedb/content/sha256/<id>`` is the image config, whose
  ``rootfs.diff_ids`` list the layers base first; a layer's chain ID is ``diff_id`` for the
  base and ``sha256(parent_chain_id + " " + diff_id)`` above it;
  ``image/overlay2/layerdb/sha256/<chain>/cache-id`` names ``overlay2/<cache-id>/diff``. A
  layer directory's ``lower`` file lists the layers below it as ``l/<short>`` links
  (``overlay2/l/<short>`` -> ``../<cache-id>/diff``).
- **containers-storage** (podman, buildah, CRI-O; ``storage.conf`` driver ``overlay`` or
  ``vfs``): ``overlay-images/images.json`` lists images (``id``, ``names``, top ``layer``),
  ``overlay-layers/layers.json`` (and ``volatile-layers.json``) lists layers with their
  ``parent``; a layer's files are ``overlay/<id>/diff``, with the same ``lower`` file of ``l/``
  links as Docker's. With the ``vfs`` driver (``vfs-images``, ``vfs-layers``) every layer
  ``vfs/dir/<id>`` is a full copy of the tree up to it, so only the top one is mounted.

IMAGE is a name or tag (``alpine``, ``alpine:3``, ``docker.io/library/alpine:latest``), a full
image ID (``sha256:`` optional) or a unique prefix of one. The store is trusted for nothing: it
is opened read-only (``O_NOATIME`` where allowed, so not even atimes change), every path is
walked one component at a time from the store's directory fd with ``O_NOFOLLOW``, an ID or
link that would leave the store is refused, and where a layer's ``lower`` file is present its
links must agree with the metadata's order. Every problem is a ``StoreError``: one line, exit
code ``EXIT_STORE``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from unionfs.exitcodes import EXIT_STORE

MAX_JSON = 256 * 1024 * 1024  # a metadata file larger than this is damage, not metadata
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX = re.compile(r"[0-9a-f]+")
DOCKER = "docker-overlay2"
CONTAINERS = "containers-storage"


class StoreError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = EXIT_STORE
        self.message = message


@dataclass(frozen=True, slots=True)
class Candidate:
    """One image a store holds: its ID, its names, and how to find its layers."""

    image_id: str  # 64 hex digits
    names: tuple[str, ...]
    top_layer: str = ""  # containers-storage: the top layer's ID


@dataclass(frozen=True, slots=True)
class StoreImage:
    kind: str  # DOCKER or CONTAINERS
    image_id: str
    names: tuple[str, ...]
    layers: list[str]  # absolute layer directories, base first


# pure helpers (unit-tested without a store) ---------------------------------------------
def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Docker's layer chain IDs (``sha256:...``), base first, from an image's diff IDs."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            digest = hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
            chains.append("sha256:" + digest)
    return chains


def _hex_of(digest: object, what: str) -> str:
    """The 64 hex digits of ``sha256:HEX`` (or bare HEX); StoreError otherwise."""
    if not isinstance(digest, str):
        raise StoreError(f"{what}: not a digest: {digest!r}")
    text = digest.removeprefix("sha256:")
    if not HEX64.fullmatch(text):
        raise StoreError(f"{what}: not a sha256 digest: {digest!r}")
    return text


def docker_candidates(repositories: object) -> dict[str, Candidate]:
    """``repositories.json`` -> image ID -> Candidate (with every name pointing at it)."""
    if not isinstance(repositories, dict):
        raise StoreError("repositories.json is damaged (not an object)")
    repos = repositories.get("Repositories", {})
    if not isinstance(repos, dict):
        raise StoreError("repositories.json is damaged (Repositories is not an object)")
    names: dict[str, list[str]] = {}
    for references in repos.values():
        if not isinstance(references, dict):
            raise StoreError("repositories.json is damaged (a repository is not an object)")
        for reference, image in references.items():
            names.setdefault(_hex_of(image, "repositories.json"), []).append(str(reference))
    return {image: Candidate(image, tuple(found)) for image, found in names.items()}


def containers_candidates(images: object) -> dict[str, Candidate]:
    """containers-storage ``images.json`` -> image ID -> Candidate."""
    if not isinstance(images, list):
        raise StoreError("images.json is damaged (not a list)")
    found: dict[str, Candidate] = {}
    for entry in images:
        if not isinstance(entry, dict):
            raise StoreError("images.json is damaged (an image is not an object)")
        image_id, names, layer = entry.get("id"), entry.get("names") or [], entry.get("layer")
        if not isinstance(image_id, str) or not HEX64.fullmatch(image_id):
            raise StoreError(f"images.json is damaged (image id {image_id!r})")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise StoreError(f"images.json is damaged (names of {image_id[:12]})")
        if not isinstance(layer, str) or not layer:
            raise StoreError(f"images.json: image {image_id[:12]} has no top layer")
        found[image_id] = Candidate(image_id, tuple(names), layer)
    return found


def containers_layer_chain(layers: Sequence[object], top: str) -> list[str]:
    """Layer IDs from the base to ``top``, following ``parent`` in ``layers.json`` entries."""
    parents: dict[str, str] = {}
    incomplete: set[str] = set()
    for entry in layers:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise StoreError("layers.json is damaged (a layer without an id)")
        parent = entry.get("parent") or ""
        if not isinstance(parent, str):
            raise StoreError(f"layers.json is damaged (parent of {entry['id'][:12]})")
        parents[entry["id"]] = parent
        flags = entry.get("flags")
        if isinstance(flags, dict) and flags.get("incomplete"):
            incomplete.add(entry["id"])
    chain: list[str] = []
    layer = top
    while layer:
        if layer not in parents:
            raise StoreError(f"layers.json has no layer {layer[:12]}")
        if layer in chain:
            raise StoreError(f"layers.json is damaged (layer {layer[:12]} is its own ancestor)")
        if layer in incomplete:
            raise StoreError(f"layer {layer[:12]} is incomplete (an interrupted pull or build)")
        chain.append(layer)
        layer = parents[layer]
    chain.reverse()
    return chain


def name_forms(image: str) -> list[str]:
    """The names ``image`` may be stored under: as given, with ``:latest`` when it has no tag
    or digest, in familiar form (Docker: ``busybox:latest``) and fully qualified
    (containers-storage: ``docker.io/library/busybox:latest``, ``localhost/x:latest``)."""
    last = image.rsplit("/", 1)[-1]
    tagged = image if (":" in last or "@" in image) else image + ":latest"
    forms = [image, tagged]
    familiar = tagged.removeprefix("docker.io/").removeprefix("library/")
    forms.append(familiar)
    first = familiar.split("/", 1)[0]
    if "/" not in familiar:
        forms += ["docker.io/library/" + familiar, "localhost/" + familiar]
    elif "." not in first and ":" not in first and first != "localhost":
        forms += ["docker.io/" + familiar, "localhost/" + familiar]
    return list(dict.fromkeys(forms))


def match_image(candidates: Mapping[str, Candidate], image: str) -> Candidate:
    """The one candidate ``image`` names: by name first, then by ID or unique ID prefix."""
    wanted = name_forms(image)
    for form in wanted:
        named = [c for c in candidates.values() if form in c.names]
        if len(named) == 1:
            return named[0]
    text = image.removeprefix("sha256:")
    if text and HEX.fullmatch(text):
        matches = [c for key, c in candidates.items() if key.startswith(text)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            shown = ", ".join(sorted(c.image_id[:12] for c in matches)[:4])
            raise StoreError(f"image ID prefix {image!r} is ambiguous ({shown})")
    raise StoreError(f"no image {image!r} in the store")


def link_target(text: bytes) -> str:
    """The layer ID an ``l/<short>`` link names: its target must be ``../<ID>/diff``."""
    parts = text.split(b"/")
    if len(parts) != 3 or parts[0] != b".." or parts[2] != b"diff" or not _plain(parts[1]):
        raise StoreError(f"layer link -> {text.decode(errors='replace')} points outside the store")
    return parts[1].decode(errors="surrogateescape")


def _plain(component: bytes) -> bool:
    return bool(component) and component not in (b".", b"..") and b"/" not in component


# the store directory ---------------------------------------------------------------------
class StoreDir:
    """A store root behind an fd: read-only, O_NOATIME where allowed, O_NOFOLLOW throughout."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)
        try:
            self.fd = self._open(self.path, os.O_DIRECTORY)
        except FileNotFoundError:
            raise StoreError(f"store {path} does not exist") from None
        except NotADirectoryError:
            raise StoreError(f"store {path} is not a directory") from None
        except OSError as error:
            raise StoreError(f"store {path}: {error.strerror}") from None

    def close(self) -> None:
        os.close(self.fd)

    @staticmethod
    def _open(name: str | bytes, flags: int, dir_fd: int | None = None) -> int:
        flags |= os.O_RDONLY | os.O_CLOEXEC
        if dir_fd is not None:
            flags |= os.O_NOFOLLOW
        try:
            return os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
        except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
            return os.open(name, flags, dir_fd=dir_fd)

    @contextmanager
    def walk(self, parts: Sequence[str], *, directory: bool) -> Iterator[int]:
        """An fd of ``parts`` below the store root, walked component by component."""
        fds: list[int] = []
        shown = "/".join(parts)
        try:
            current = self.fd
            for index, part in enumerate(parts):
                name = os.fsencode(part)
                if not _plain(name):
                    raise StoreError(f"{shown}: {part!r} would leave the store")
                last = index == len(parts) - 1
                flags = os.O_DIRECTORY if (directory or not last) else 0
                try:
                    current = self._open(name, flags, current)
                except OSError as error:
                    raise self._walk_error(parts[: index + 1], error) from None
                fds.append(current)
            yield current
        finally:
            for fd in fds:
                os.close(fd)

    def _walk_error(self, parts: Sequence[str], error: OSError) -> StoreError:
        shown = "/".join(parts)
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            parent = parts[:-1]
            try:
                with self.walk(parent, directory=True) if parent else _same(self.fd) as fd:
                    st = os.stat(os.fsencode(parts[-1]), dir_fd=fd, follow_symlinks=False)
            except OSError:
                return StoreError(f"{shown}: {error.strerror}")
            if stat.S_ISLNK(st.st_mode):
                return StoreError(f"{shown} is a symlink: it may point outside the store")
            return StoreError(f"{shown} has the wrong type (the store is damaged)")
        if error.errno == errno.ENOENT:
            return StoreError(f"{shown} is missing from the store")
        return StoreError(f"{shown}: {error.strerror}")

    def exists(self, parts: Sequence[str]) -> bool:
        try:
            with self.walk(parts, directory=False):
                return True
        except StoreError:
            return False

    def read_json(self, parts: Sequence[str]) -> Any:
        shown = "/".join(parts)
        with self.walk(parts, directory=False) as fd:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_JSON:
                raise StoreError(f"{shown} is no metadata file (the store is damaged)")
            data = _read_all(fd)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{shown} is damaged (not JSON)") from None

    def read_text(self, parts: Sequence[str]) -> str:
        with self.walk(parts, directory=False) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"{'/'.join(parts)} is no file (the store is damaged)")
            return _read_all(fd, limit=65536).decode(errors="surrogateescape").strip()

    def read_link(self, parts: Sequence[str]) -> bytes:
        with self.walk(parts[:-1], directory=True) as parent:
            try:
                return os.readlink(os.fsencode(parts[-1]), dir_fd=parent)
            except FileNotFoundError:
                raise StoreError(f"{'/'.join(parts)} is missing from the store") from None
            except OSError:
                raise StoreError(f"{'/'.join(parts)} is no link (the store is damaged)") from None

    def listdir(self, parts: Sequence[str]) -> list[str]:
        with self.walk(parts, directory=True) as fd:
            return os.listdir(fd)  # (a dup of fd: O_NOATIME holds for the reads too)

    def layer_dir(self, parts: Sequence[str]) -> str:
        """The absolute path of layer directory ``parts``, checked to be a real directory
        reached without a symlink."""
        with self.walk(parts, directory=True):
            pass
        return os.path.join(self.path, *parts)


@contextmanager
def _same(fd: int) -> Iterator[int]:
    yield fd


def _read_all(fd: int, limit: int = MAX_JSON) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise StoreError("a metadata file is too large (the store is damaged)")
    return b"".join(chunks)


# the two layouts --------------------------------------------------------------------------
DOCKER_ROOT = ("image", "overlay2")
CS_DRIVERS = {  # driver -> (images.json, layers dir, layer path from an ID)
    "overlay": ("overlay-images", "overlay-layers", ("overlay", "{}", "diff")),
    "vfs": ("vfs-images", "vfs-layers", ("vfs", "dir", "{}")),
}


def detect(store: StoreDir) -> list[str]:
    """The layouts ``store`` holds: DOCKER, ``CONTAINERS + ":" + driver``."""
    kinds = []
    if store.exists([*DOCKER_ROOT, "imagedb"]) or store.exists([*DOCKER_ROOT, "repositories.json"]):
        kinds.append(DOCKER)
    for driver, (images, _layers, _path) in CS_DRIVERS.items():
        if store.exists([images, "images.json"]):
            kinds.append(f"{CONTAINERS}:{driver}")
    return kinds


def find_image(store_path: str, image: str) -> StoreImage:
    """The layers of ``image`` in the store at ``store_path`` (base first)."""
    store = StoreDir(store_path)
    try:
        kinds = detect(store)
        if not kinds:
            raise StoreError(
                f"{store_path} is neither a Docker overlay2 store (image/overlay2/) nor a "
                "containers-storage store (overlay-images/images.json)"
            )
        found: list[tuple[str, Candidate]] = []
        errors: list[StoreError] = []
        for kind in kinds:
            try:
                found.append((kind, match_image(_candidates(store, kind), image)))
            except StoreError as error:
                errors.append(error)
        if not found:
            raise min(errors, key=lambda error: error.message.startswith("no image "))
        if len({candidate.image_id for _, candidate in found}) > 1:
            raise StoreError(f"image {image!r} is in more than one layout of {store_path}")
        kind, candidate = found[0]
        if kind == DOCKER:
            layers = _docker_layers(store, candidate)
        else:
            layers = _containers_layers(store, kind.split(":", 1)[1], candidate)
        return StoreImage(kind.split(":", 1)[0], candidate.image_id, candidate.names, layers)
    finally:
        store.close()


def _candidates(store: StoreDir, kind: str) -> dict[str, Candidate]:
    if kind == DOCKER:
        candidates: dict[str, Candidate] = {}
        if store.exists([*DOCKER_ROOT, "repositories.json"]):
            candidates = docker_candidates(store.read_json([*DOCKER_ROOT, "repositories.json"]))
        content = [*DOCKER_ROOT, "imagedb", "content", "sha256"]
        if store.exists(content):
            for name in store.listdir(content):
                if HEX64.fullmatch(name) and name not in candidates:
                    candidates[name] = Candidate(name, ())
        return candidates
    images_dir = CS_DRIVERS[kind.split(":", 1)[1]][0]
    return containers_candidates(store.read_json([images_dir, "images.json"]))


def _docker_layers(store: StoreDir, candidate: Candidate) -> list[str]:
    short = candidate.image_id[:12]
    config = store.read_json([*DOCKER_ROOT, "imagedb", "content", "sha256", candidate.image_id])
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not diff_ids:
        raise StoreError(f"image {short}: its config has no rootfs.diff_ids (damaged)")
    for diff_id in diff_ids:
        _hex_of(diff_id, f"image {short}: rootfs.diff_ids")
    cache_ids = []
    for chain in chain_ids(diff_ids):
        cache_file = [*DOCKER_ROOT, "layerdb", "sha256", _hex_of(chain, "chain ID"), "cache-id"]
        cache_id = store.read_text(cache_file)
        if not cache_id or not _plain(os.fsencode(cache_id)):
            raise StoreError(f"{'/'.join(cache_file)}: {cache_id!r} would leave the store")
        cache_ids.append(cache_id)
    layers = [store.layer_dir(["overlay2", cache_id, "diff"]) for cache_id in cache_ids]
    _check_lower_file(store, "overlay2", cache_ids)
    return layers


def _containers_layers(store: StoreDir, driver: str, candidate: Candidate) -> list[str]:
    _images, layers_dir, pattern = CS_DRIVERS[driver]
    entries: list[object] = []
    for name in ("layers.json", "volatile-layers.json"):
        if name == "layers.json" or store.exists([layers_dir, name]):
            document = store.read_json([layers_dir, name])
            if not isinstance(document, list):
                raise StoreError(f"{layers_dir}/{name} is damaged (not a list)")
            entries.extend(document)
    chain = containers_layer_chain(entries, candidate.top_layer)
    for layer in chain:
        if not _plain(os.fsencode(layer)):
            raise StoreError(f"layers.json: layer ID {layer!r} would leave the store")
    if driver == "vfs":  # each vfs layer is a full copy of the tree up to it: only the top
        return [store.layer_dir([part.format(chain[-1]) for part in pattern])]
    layers = [store.layer_dir([part.format(layer) for part in pattern]) for layer in chain]
    _check_lower_file(store, "overlay", chain)
    return layers


def _check_lower_file(store: StoreDir, driver_dir: str, layer_ids: Sequence[str]) -> None:
    """A top layer's ``lower`` file (``l/A:l/B``, the layers below it, nearest first) must
    name, through its ``l/`` links, exactly the layers the metadata puts below it."""
    top = layer_ids[-1]
    if not store.exists([driver_dir, top, "lower"]):
        if len(layer_ids) > 1 and store.exists([driver_dir, top, "link"]):
            raise StoreError(f"{driver_dir}/{top[:12]}: the lower file is missing (damaged)")
        return
    text = store.read_text([driver_dir, top, "lower"])
    named = []
    for entry in (item for item in text.split(":") if item):
        parts = entry.split("/")
        if len(parts) != 2 or parts[0] != "l" or not _plain(os.fsencode(parts[1])):
            raise StoreError(f"{driver_dir}/{top[:12]}/lower: {entry!r} points outside the store")
        target = store.read_link([driver_dir, "l", parts[1]])
        try:
            named.append(link_target(target))
        except StoreError:
            raise StoreError(
                f"{driver_dir}/l/{parts[1]} -> {target.decode(errors='replace')} points "
                "outside the store"
            ) from None
    expected = list(reversed(layer_ids[:-1]))
    if named != expected:
        raise StoreError(
            f"{driver_dir}/{top[:12]}/lower disagrees with the image metadata (damaged store)"
        )

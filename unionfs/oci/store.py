"""The image store: ``import_image`` into ``DEST/layers/`` + ``DEST/manifest.json``, and
``image_layers``/``image_config`` reading it back."""

from __future__ import annotations

import contextlib
import gzip as gzip_module
import hashlib
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from unionfs import safeio
from unionfs.oci.common import (
    COPY_CHUNK,
    LAYERS_DIR,
    MANIFEST_MEDIA_TYPE,
    MANIFEST_NAME,
    ImageError,
    ImportResult,
    LayerInfo,
    Progress,
    human,
    log,
)
from unionfs.oci.compression import HashingReader, decompressed, zlib_error
from unionfs.oci.extraction import LayerWriter, can_mknod_whiteout, remove_entry
from unionfs.oci.sources import LayerRef, Source, read_layout


def _open_dest(dest: Path) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """Open (creating) ``dest``; return its fd and the layers/config of an image already there."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd = safeio.open_dir_path(dest)
    except OSError as error:
        raise ImageError(f"{dest}: cannot use as destination: {error.strerror}") from None
    existing: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    entries = [os.fsdecode(name) for name, _kind in safeio.list_dir(fd)]
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
        fd = safeio.open_dir_path(dest)
        try:
            mfd = safeio.open_file(fd, os.fsencode(MANIFEST_NAME), os.O_RDONLY)
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
    tmp = os.fsencode(f".{MANIFEST_NAME}.tmp")
    with contextlib.suppress(FileNotFoundError):
        safeio.unlink(dest_fd, tmp)
    fd = safeio.open_file(dest_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    safeio.renameat2(dest_fd, tmp, dest_fd, os.fsencode(MANIFEST_NAME))


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
    source = Source(image)
    try:
        refs, config = read_layout(source)
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
            safeio.mkdir(dest_fd, os.fsencode(LAYERS_DIR), 0o755)
            made_layers_dir = True
        layers_fd = safeio.open_dir(dest_fd, os.fsencode(LAYERS_DIR))
        mknod_ok = can_mknod_whiteout(layers_fd)
        new_layers: list[LayerInfo] = []
        bar = Progress(progress, f"import {image.name}")
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
                    remove_entry(layers_fd, name)
        if made_dest or made_layers_dir:
            with contextlib.suppress(OSError):
                safeio.rmdir(dest_fd, os.fsencode(LAYERS_DIR))  # only when empty now
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


def _same_layer(ref: LayerRef, existing: dict[str, Any]) -> bool:
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
    image: Path, dest: Path, refs: list[LayerRef], existing: list[dict[str, Any]], *, bare: bool
) -> list[LayerRef]:
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
    source: Source, ref: LayerRef, dest: Path, layers_fd: int, number: int, *,
    label: str, mknod_ok: bool, warn: Callable[[str], None], bar: Progress,
) -> LayerInfo:  # fmt: skip
    staging = f".staging-{number}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        remove_entry(layers_fd, staging)
    safeio.mkdir(layers_fd, os.fsencode(staging), 0o755)
    root_fd = safeio.open_dir(layers_fd, os.fsencode(staging))
    done = 0

    def on_read(n: int) -> None:
        nonlocal done
        done += n
        bar.update(f"{label} {human(done)}")

    try:
        with contextlib.ExitStack() as stack:
            if ref.blob:
                raw: IO[bytes] = stack.enter_context(source.open(ref.blob))
            else:  # a bare layer tarball: the image file itself
                raw = stack.enter_context(open(source.path, "rb"))
            hashed = HashingReader(raw, on_read)
            tar_stream = decompressed(hashed)
            uncompressed = HashingReader(tar_stream)
            writer = LayerWriter(root_fd, label=label, mknod_ok=mknod_ok, warn=warn)
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
            remove_entry(layers_fd, final)
        safeio.renameat2(layers_fd, os.fsencode(staging), layers_fd, os.fsencode(final))
        bar.update(f"{label} {human(done)} done", force=True)
        return LayerInfo(
            dest / LAYERS_DIR / final, ref.digest or digest, diff_id,
            members=writer.members, skipped=writer.skipped,
        )  # fmt: skip
    except BaseException:
        with contextlib.suppress(OSError):
            remove_entry(layers_fd, staging)
        raise
    finally:
        os.close(root_fd)

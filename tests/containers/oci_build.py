"""Build OCI layers, OCI image layouts and docker-save archives in tests (no registry, no tools)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

MTIME = 1_700_000_000


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LayerTar:
    """A layer tarball built member by member (PAX format, so xattrs and long names work)."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None, **attrs: Any) -> LayerTar:
        info.mtime = int(attrs.pop("mtime", MTIME))
        info.uid = int(attrs.pop("uid", 0))
        info.gid = int(attrs.pop("gid", 0))
        xattrs = attrs.pop("xattrs", None) or {}
        assert isinstance(xattrs, dict)
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        assert not attrs, attrs
        if data is not None:
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        else:
            self.tar.addfile(info)
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **attrs: Any) -> LayerTar:
        info = tarfile.TarInfo(name)
        info.mode = mode
        return self._add(info, data, **attrs)

    def dir(self, name: str, mode: int = 0o755, **attrs: Any) -> LayerTar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = mode
        return self._add(info, **attrs)

    def symlink(self, name: str, target: str, **attrs: Any) -> LayerTar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        info.mode = 0o777
        return self._add(info, **attrs)

    def hardlink(self, name: str, target: str, **attrs: Any) -> LayerTar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.LNKTYPE
        info.linkname = target
        info.mode = 0o644
        return self._add(info, **attrs)

    def device(self, name: str, major: int, minor: int, *, block: bool = False) -> LayerTar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.BLKTYPE if block else tarfile.CHRTYPE
        info.devmajor, info.devminor = major, minor
        info.mode = 0o600
        return self._add(info)

    def fifo(self, name: str, mode: int = 0o644) -> LayerTar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.FIFOTYPE
        info.mode = mode
        return self._add(info)

    def whiteout(self, name: str) -> LayerTar:
        return self.file(name, b"", mode=0)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        zstd = shutil.which("zstd")
        assert zstd is not None
        return subprocess.run(
            [zstd, "-q", "-c"], input=data, capture_output=True, check=True
        ).stdout
    assert how == "none"
    return data


MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def write_oci_layout(
    root: Path,
    layers: list[bytes],
    *,
    compression: list[str] | None = None,
    runtime_config: dict[str, object] | None = None,
    nested_index: bool = False,
) -> Path:
    """An OCI image layout directory holding one image whose layers are ``layers`` (base first)."""
    compression = compression or ["gzip"] * len(layers)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return digest

    descriptors = []
    for data, how in zip(layers, compression, strict=True):
        blob = compress(data, how)
        descriptors.append({"mediaType": MEDIA[how], "digest": put(blob), "size": len(blob)})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": runtime_config or {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(data) for data in layers]},
    }
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(config_bytes),
            "size": len(config_bytes),
        },
        "layers": descriptors,
    }
    manifest_bytes = json.dumps(manifest).encode()
    descriptor = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest_bytes),
        "size": len(manifest_bytes),
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    if nested_index:
        inner = {"schemaVersion": 2, "manifests": [descriptor]}
        inner_bytes = json.dumps(inner).encode()
        descriptor = {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": put(inner_bytes),
            "size": len(inner_bytes),
        }
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    return root


def write_docker_archive(path: Path, layers: list[bytes]) -> Path:
    """A ``docker save`` tarball (uncompressed ``<id>/layer.tar`` layers + manifest.json)."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(d) for d in layers]},
    }
    config_bytes = json.dumps(config).encode()
    config_name = sha256(config_bytes).split(":")[1] + ".json"
    names = [f"{sha256(d).split(':')[1]}/layer.tar" for d in layers]
    manifest = [{"Config": config_name, "RepoTags": ["localhost/test:1"], "Layers": names}]
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("manifest.json", json.dumps(manifest).encode())
        add(config_name, config_bytes)
        for name, data in zip(names, layers, strict=True):
            add(name, data)
    return path


def tar_directory(root: Path, out: Path) -> Path:
    """An OCI layout directory packed as an OCI archive (``podman save --format oci-archive``)."""
    with tarfile.open(out, "w") as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name)
    return out

"""The deterministic benchmark data set, generated from a seed and cached under benchmarks/.cache.

Layout of one data set (``.cache/<scale>-v<VERSION>-s<SEED>/``), every stack a set of layer
directories (base first) plus ``merged``, the same tree as one plain directory for the native
system (files hard-linked to the layers' files, so it must only ever be read):

- ``tree``     2 layers, ~20,000 files in ~2,000 directories under ``t/``; every directory exists
               in both layers (so every directory merges), 10% of the files exist in both layers
               (the upper copy wins). ``tree.paths`` lists every merged path below the root.
- ``bigdir``   one directory ``big/`` with 10,000 entries, 90% in the base layer, 10% on top.
- ``bigfile``  ``big.bin`` (1 GiB) in the base layer.
- ``midfile``  ``mid.bin`` (256 MiB) in the base layer (the copy-up workload).
- ``sparse``   ``sparse.img``: 4 GiB apparent size (1 GiB small), 16 data extents of 256 KiB.
- ``rootfs``   a Python rootfs layer (the interpreter, its stdlib, its libraries found with ldd)
               and an ``app`` layer on top with ``/app/main.py``.
- ``stack``    100 layers ``0`` .. ``99``, the same 20 directories in each; the lookup targets
               are files of layer 0 listed in ``stack.paths``. Stacks of 1, 2, 10 and 100 layers
               are prefixes of it.
- ``empty``    2 nearly empty layers with a ``dest/`` directory: the target of write workloads.
- ``small.tar`` 5,000 small files in 50 directories.

``manifest.json`` is written last: a data set without it is incomplete and is regenerated.
Bump ``VERSION`` whenever the generator changes what it writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VERSION = 4
SEED = 20240605
MIB = 1 << 20
GIB = 1 << 30

CACHE_ROOT = Path(__file__).resolve().parent / ".cache"

# What the container-start workload imports inside the chroot.
CONTAINER_IMPORTS = (
    "json",
    "asyncio",
    "email.parser",
    "http.client",
    "decimal",
    "xml.etree.ElementTree",
    "argparse",
    "logging",
    "dataclasses",
    "pathlib",
    "subprocess",
    "hashlib",
    "zlib",
    "sqlite3",
    "ssl",
    "urllib.request",
    "csv",
    "uuid",
)


@dataclass(frozen=True)
class Scale:
    """How big each part of the data set is."""

    name: str
    tree_dirs: int
    tree_files: int
    bigdir_entries: int
    big_file: int
    mid_file: int
    sparse_size: int
    tar_files: int
    stack_layers: int
    stack_files: int


FULL = Scale("full", 2000, 20000, 10000, GIB, 256 * MIB, 4 * GIB, 5000, 100, 2000)
SMALL = Scale("small", 200, 2000, 2000, 64 * MIB, 16 * MIB, GIB, 1000, 100, 500)


@dataclass(frozen=True)
class Stack:
    """A stack of layer directories (base first) and the same tree as one plain directory."""

    name: str
    layers: tuple[Path, ...]
    merged: Path

    @property
    def parent(self) -> Path:
        return self.layers[0].parent


@dataclass
class Dataset:
    """Paths into one generated data set."""

    root: Path
    scale: Scale
    manifest: dict[str, object]

    def stack(self, name: str) -> Stack:
        if name.startswith("stack"):
            count = int(name[len("stack") :])
            base = self.root / "stack"
            layers = tuple(base / str(index) for index in range(count))
            return Stack(name, layers, base / f"merged{count}")
        base = self.root / name
        names = ("l0", "l1")
        return Stack(name, tuple(base / layer for layer in names), base / "merged")

    @property
    def tree_paths(self) -> Path:
        return self.root / "tree.paths"

    @property
    def stack_paths(self) -> Path:
        return self.root / "stack.paths"

    @property
    def tarball(self) -> Path:
        return self.root / "small.tar"

    @property
    def python_in_rootfs(self) -> str:
        return str(self.manifest.get("python", ""))

    @property
    def rootfs_error(self) -> str:
        return str(self.manifest.get("rootfs_error", ""))


def lookup_counts(scale: Scale) -> tuple[int, ...]:
    return tuple(count for count in (1, 2, 10, 100) if count <= scale.stack_layers)


def dataset_dir(scale: Scale, seed: int = SEED) -> Path:
    return CACHE_ROOT / f"{scale.name}-v{VERSION}-s{seed}"


def ensure(scale: Scale, seed: int = SEED, log: bool = True) -> Dataset:
    """The data set for this scale and seed, generated now unless a complete one is cached."""
    root = dataset_dir(scale, seed)
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") == VERSION and manifest.get("seed") == seed:
            return Dataset(root, scale, manifest)
    return _generate(root, scale, seed, log)


def _generate(root: Path, scale: Scale, seed: int, log: bool) -> Dataset:
    manifest_path = root / "manifest.json"
    # Stale versions of this scale go; other scales stay.
    if CACHE_ROOT.exists():
        for old in CACHE_ROOT.glob(f"{scale.name}-v*"):
            if old != root:
                _remove_tree(old)
    if root.exists():
        _remove_tree(root)
    root.mkdir(parents=True)
    started = time.monotonic()
    if log:
        print(f"bench: generating the {scale.name} data set in {root} (once)", flush=True)
    rnd = random.Random(seed)
    manifest: dict[str, object] = {"version": VERSION, "seed": seed, "scale": scale.name}
    manifest["tree"] = _make_tree(root, scale, rnd)
    _make_bigdir(root, scale, rnd)
    _make_big_files(root, scale, rnd)
    _make_sparse(root, scale)
    _make_empty(root)
    _make_tarball(root, scale, rnd)
    _make_stack(root, scale, rnd)
    manifest.update(_make_rootfs(root))
    dataset = Dataset(root, scale, manifest)
    for name in ("tree", "bigdir", "bigfile", "midfile", "sparse", "rootfs", "empty"):
        _merge(dataset.stack(name))
    for count in lookup_counts(scale):
        _merge(dataset.stack(f"stack{count}"))
    manifest["generated_in_s"] = round(time.monotonic() - started, 1)
    subprocess.run(["sync"], check=False)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if log:
        print(f"bench: data set ready in {manifest['generated_in_s']} s", flush=True)
    return dataset


def _remove_tree(path: Path) -> None:
    """rm -rf a cached data set, refusing to descend into anything mounted below it."""
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            mountpoint = line.split()[1]
            if mountpoint == str(path) or mountpoint.startswith(prefix):
                raise RuntimeError(f"refusing to remove {path}: {mountpoint} is mounted")
    shutil.rmtree(path, ignore_errors=True)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _make_tree(root: Path, scale: Scale, rnd: random.Random) -> dict[str, int]:
    """2 layers; every directory in both; files spread over both, 10% in both."""
    layers = [root / "tree" / "l0", root / "tree" / "l1"]
    directories: list[tuple[str, int]] = [("t", 0)]
    while len(directories) < scale.tree_dirs:
        parent, depth = rnd.choice(directories)
        if depth >= 4:
            continue
        directories.append((f"{parent}/d{len(directories):04d}", depth + 1))
    for layer in layers:
        for directory, _ in directories:
            (layer / directory).mkdir(parents=True, exist_ok=True)
    paths = [directory for directory, _ in directories]
    both = 0
    for index in range(scale.tree_files):
        directory = rnd.choice(directories)[0]
        name = f"{directory}/f{index:05d}.txt"
        size = rnd.randrange(0, 8192)
        where = rnd.random()
        if where < 0.45:
            targets = [layers[0]]
        elif where < 0.9:
            targets = [layers[1]]
        else:
            targets = layers
            both += 1
        for layer in targets:
            _write(layer / name, rnd.randbytes(size))
        paths.append(name)
    (root / "tree.paths").write_text("\n".join(paths) + "\n")
    return {"dirs": len(directories), "files": scale.tree_files, "in_both_layers": both}


def _make_bigdir(root: Path, scale: Scale, rnd: random.Random) -> None:
    layers = [root / "bigdir" / "l0", root / "bigdir" / "l1"]
    for layer in layers:
        (layer / "big").mkdir(parents=True)
    for index in range(scale.bigdir_entries):
        layer = layers[0] if index % 10 else layers[1]
        _write(layer / "big" / f"entry-{index:05d}", rnd.randbytes(rnd.randrange(0, 64)))


def _chunks(size: int, rnd: random.Random) -> Iterator[bytes]:
    block = bytearray(rnd.randbytes(MIB))
    for index in range(size // MIB):
        block[:8] = index.to_bytes(8, "little")
        yield bytes(block)


def _make_big_files(root: Path, scale: Scale, rnd: random.Random) -> None:
    for stack, name, size in (
        ("bigfile", "big.bin", scale.big_file),
        ("midfile", "mid.bin", scale.mid_file),
    ):
        base = root / stack / "l0"
        base.mkdir(parents=True)
        _write(root / stack / "l1" / "README", b"top layer\n")
        with open(base / name, "wb") as handle:
            for chunk in _chunks(size, rnd):
                handle.write(chunk)
        os.chmod(base / name, 0o644)


def _make_sparse(root: Path, scale: Scale) -> None:
    base = root / "sparse" / "l0"
    base.mkdir(parents=True)
    _write(root / "sparse" / "l1" / "README", b"top layer\n")
    extent = 256 * 1024
    with open(base / "sparse.img", "wb") as handle:
        for index in range(16):
            handle.seek(index * (scale.sparse_size // 16))
            handle.write(bytes([index + 1]) * extent)
        handle.truncate(scale.sparse_size)
    os.chmod(base / "sparse.img", 0o644)


def _make_empty(root: Path) -> None:
    for layer in ("l0", "l1"):
        (root / "empty" / layer / "dest").mkdir(parents=True)
        _write(root / "empty" / layer / f"README.{layer}", b"write workloads land here\n")


def _make_tarball(root: Path, scale: Scale, rnd: random.Random) -> None:
    with tarfile.open(root / "small.tar", "w", format=tarfile.GNU_FORMAT) as archive:
        for directory in range(50):
            info = tarfile.TarInfo(f"src/p{directory:02d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1_700_000_000
            archive.addfile(info)
        for index in range(scale.tar_files):
            data = rnd.randbytes(rnd.randrange(0, 4096))
            info = tarfile.TarInfo(f"src/p{index % 50:02d}/file{index:05d}.py")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            archive.addfile(info, _BytesReader(data))


class _BytesReader:
    """A minimal file object for tarfile.addfile."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = len(self._data) - self._offset
        chunk = self._data[self._offset : self._offset + size]
        self._offset += len(chunk)
        return chunk


def _make_stack(root: Path, scale: Scale, rnd: random.Random) -> None:
    """Layers 0..N-1 sharing 20 directories; lookup targets live in layer 0 only."""
    base = root / "stack"
    directories = [f"s{index:02d}" for index in range(20)]
    for layer in range(scale.stack_layers):
        for directory in directories:
            (base / str(layer) / directory).mkdir(parents=True)
        for extra in range(5):
            directory = directories[(layer + extra) % len(directories)]
            _write(base / str(layer) / directory / f"layer{layer}-{extra}", b"x" * extra)
    paths = list(directories)
    for index in range(scale.stack_files):
        name = f"{directories[index % len(directories)]}/base{index:05d}"
        _write(base / "0" / name, rnd.randbytes(rnd.randrange(0, 512)))
        paths.append(name)
    (root / "stack.paths").write_text("\n".join(paths) + "\n")


_ROOTFS_SKIP = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
}


def _make_rootfs(root: Path) -> dict[str, object]:
    """The interpreter, its stdlib and its shared libraries at their host paths; /app on top."""
    layer = root / "rootfs" / "l0"
    app = root / "rootfs" / "l1" / "app"
    layer.mkdir(parents=True)
    app.mkdir(parents=True)
    imports = ", ".join(CONTAINER_IMPORTS)
    _write(
        app / "main.py",
        f"import {imports}\nprint('container ready', len(json.dumps({{'ok': 1}})))\n".encode(),
    )
    executable = Path(os.path.realpath(sys.executable))
    stdlib = Path(os.path.dirname(os.__file__))
    try:
        _copy_file(executable, layer)
        for directory, subdirs, files in os.walk(stdlib):
            subdirs[:] = sorted(
                name
                for name in subdirs
                if name not in _ROOTFS_SKIP and not name.startswith("config-")
            )
            for name in files:
                if ".opt-" in name:
                    continue
                _copy_file(Path(directory) / name, layer)
        binaries = [executable, *sorted((stdlib / "lib-dynload").glob("*.so"))]
        for library in _shared_libraries(binaries):
            _copy_file(Path(library), layer)
        (layer / "tmp").mkdir(mode=0o1777, exist_ok=True)
        (layer / "dev").mkdir(exist_ok=True)
        result = subprocess.run(
            ["chroot", str(layer.parent / "l0"), str(executable), "-c", "import encodings"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            return {"python": str(executable), "rootfs_error": result.stderr.strip()[-300:]}
    except (OSError, subprocess.SubprocessError) as error:
        return {"python": str(executable), "rootfs_error": str(error)}
    return {"python": str(executable), "rootfs_error": ""}


def _copy_file(source: Path, layer: Path) -> None:
    """Copy SOURCE (symlinks resolved) to the same absolute path inside LAYER."""
    target = layer / str(source).lstrip("/")
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(source), target)


def _shared_libraries(binaries: list[Path]) -> set[str]:
    libraries: set[str] = set()
    for binary in binaries:
        result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            parts = line.split()
            if "=>" in parts:
                index = parts.index("=>")
                if index + 1 < len(parts) and parts[index + 1].startswith("/"):
                    libraries.add(parts[index + 1])
            elif parts and parts[0].startswith("/"):
                libraries.add(parts[0])
    return libraries


def _merge(stack: Stack) -> None:
    """The native system's tree: the layers' files hard-linked into one directory, top wins."""
    stack.merged.mkdir(parents=True, exist_ok=True)
    for layer in stack.layers:
        subprocess.run(
            ["cp", "-al", "--remove-destination", f"{layer}/.", f"{stack.merged}/"], check=True
        )

"""``unionfs mount --store DIR IMAGE MOUNTPOINT`` (and ``run``) on real image stores.

Two stores, both holding one image built here from three OCI layer tarballs (no registry):

- **containers-storage, written by real podman** (``podman --root DIR --storage-driver overlay``
  or ``vfs``, ``pull oci-archive:...`` of an archive made by ``oci_build``), mounted by its
  full name, its short name and a prefix of its ID;
- **Docker overlay2**, laid out by this test as dockerd does. The layout is documented by
  moby's sources: ``daemon/graphdriver/overlay2/overlay.go`` (``overlay2/<cache-id>/diff``,
  the ``link`` file, ``overlay2/l/<short>`` -> ``../<cache-id>/diff`` symlinks and the
  ``lower`` file ``l/A:l/B`` listing the layers below, nearest first),
  ``layer/layer_store.go`` + ``layer/filestore.go``
  (``image/overlay2/layerdb/sha256/<chain-id>/{cache-id,diff,parent,size}``, chain IDs from
  ``layer.CreateChainID``: ``sha256(parent_chain + " " + diff_id)``), ``image/fs.go``
  (``image/overlay2/imagedb/content/sha256/<image-id>``, the config whose ``rootfs.diff_ids``
  order the layers) and ``reference/store.go`` (``image/overlay2/repositories.json``:
  ``{"Repositories": {"NAME": {"NAME:TAG": "sha256:ID"}}}``, familiar names).

The merged tree is compared with the tree the layer tarballs describe (applied here, OCI
whiteouts and opaque markers included). Every bad input (unknown image, ambiguous ID prefix,
damaged JSON, missing layer directory, links and IDs leading out of the store, no store at all)
must give one line on stderr, exit code 7, no mount, and leave the store exactly as it was:
contents, modes, owners, xattrs, mtimes and atimes of every entry (read with O_NOATIME here).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.containers.oci_build import LayerTar, sha256, tar_directory, write_oci_layout
from tests.containers.podman_rig import missing_tools, run_setup_script
from tests.support.mounts import fuse_mounted, is_mounted, unionfs_command

EXIT_STORE = 7
IS_ROOT = os.geteuid() == 0
IMAGE = "localhost/storetest:1"
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not IS_ROOT, reason="stores with whiteouts and podman --root need root"),
]


# the image --------------------------------------------------------------------------------
def image_layers() -> list[bytes]:
    busybox = shutil.which("busybox")
    base = LayerTar().dir("etc").file("etc/a", b"one\n").file("etc/b", b"bee\n")
    base = base.dir("old").file("old/1", b"1").file("old/2", b"2").symlink("link", "etc/a")
    base = base.dir("bin")
    if busybox is not None:
        base = base.file("bin/busybox", Path(busybox).read_bytes(), mode=0o755)
        base = base.symlink("bin/cat", "busybox").symlink("bin/sh", "busybox")
    middle = (
        LayerTar()
        .file("etc/a", b"two\n", mode=0o600)
        .whiteout("etc/.wh.b")
        .dir("old")
        .whiteout("old/.wh..wh..opq")
        .file("old/3", b"3")
        .bytes()
    )
    top = LayerTar().dir("srv").file("srv/data", b"x" * 70000).whiteout(".wh.link").bytes()
    return [base.bytes(), middle, top]


def expected_tree(layers: list[bytes]) -> dict[str, tuple[str, bytes, int]]:
    """The tree the layer tarballs describe, applied base first with OCI whiteout rules:
    path -> (type, contents or link target, permission bits)."""
    tree: dict[str, tuple[str, bytes, int]] = {}

    def remove(path: str) -> None:
        for key in [k for k in tree if k == path or k.startswith(path + "/")]:
            del tree[key]

    for data in layers:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                path = member.name.rstrip("/")
                parent, _, name = path.rpartition("/")
                if name == ".wh..wh..opq":
                    for key in [k for k in tree if parent == "" or k.startswith(parent + "/")]:
                        del tree[key]
                    continue
                if name.startswith(".wh."):
                    remove(f"{parent}/{name[4:]}" if parent else name[4:])
                    continue
                if member.isdir():
                    if tree.get(path, ("",))[0] != "dir":
                        remove(path)
                    tree[path] = ("dir", b"", member.mode & 0o7777)
                    continue
                remove(path)
                if member.issym():
                    tree[path] = ("symlink", member.linkname.encode(), 0o777)
                else:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    tree[path] = ("file", extracted.read(), member.mode & 0o7777)
    return tree


def merged_tree(root: Path) -> dict[str, tuple[str, bytes, int]]:
    tree: dict[str, tuple[str, bytes, int]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            key = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                tree[key] = ("dir", b"", stat.S_IMODE(st.st_mode))
            elif stat.S_ISLNK(st.st_mode):
                tree[key] = ("symlink", os.fsencode(os.readlink(path)), 0o777)
            else:
                tree[key] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return tree


def assert_image_tree(root: Path, layers: list[bytes]) -> None:
    expected, seen = expected_tree(layers), merged_tree(root)
    assert sorted(seen) == sorted(expected)
    for path, (kind, data, mode) in expected.items():
        assert seen[path][0] == kind, path
        assert seen[path][1] == data, path
        if kind != "symlink":
            assert seen[path][2] == mode, path


# a fingerprint that reads nothing without O_NOATIME ---------------------------------------
def _open_noatime(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW | os.O_CLOEXEC)


def store_fingerprint(root: Path, *, atimes: bool = True) -> str:
    """sha256 over every entry's path, type, mode, owner, size, mtime (and atime), xattrs,
    link target and contents. Directories and files are opened O_NOATIME, so taking it
    changes no atime itself."""
    digest = hashlib.sha256()

    def visit(path: str, relative: str) -> None:
        st = os.lstat(path)
        fields = [relative, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns]
        if atimes and not stat.S_ISLNK(st.st_mode):
            fields.append(st.st_atime_ns)
        try:
            names = sorted(os.listxattr(path, follow_symlinks=False))
        except OSError:
            names = []
        fields += [(n, os.getxattr(path, n, follow_symlinks=False)) for n in names]
        digest.update(repr(fields).encode())
        if stat.S_ISLNK(st.st_mode):
            digest.update(os.fsencode(os.readlink(path)))
        elif stat.S_ISREG(st.st_mode):
            fd = _open_noatime(path, 0)
            try:
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
            finally:
                os.close(fd)
        elif stat.S_ISDIR(st.st_mode):
            fd = _open_noatime(path, os.O_DIRECTORY)
            try:
                children = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            for child in children:
                visit(os.path.join(path, child), f"{relative}/{child}")

    visit(str(root), ".")
    return digest.hexdigest()


# the two stores ---------------------------------------------------------------------------
def podman(root: Path, run: Path, driver: str, *args: str) -> subprocess.CompletedProcess[str]:
    """podman on the store ``root`` (runroot ``run``: podman wants it under 50 characters),
    with a storage.conf of its own so that the host's configuration plays no part."""
    conf = run / "storage.conf"
    if not conf.exists():
        conf.write_text(
            f'[storage]\ndriver = "{driver}"\ngraphroot = "{root}"\nrunroot = "{run}"\n'
        )
        # Rootful podman's default tmp_dir is the machine-wide /run/libpod: another test run's
        # cleanup would break this one's podman (as tests/containers/podman_rig.py says).
        (run / "containers.conf").write_text(f'[engine]\ntmp_dir = "{run}/libpod-tmp"\n')
    env = {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(conf),
        "CONTAINERS_CONF": str(run / "containers.conf"),
    }
    argv = ["podman", "--root", str(root), "--runroot", str(run), "--storage-driver", driver]
    result = subprocess.run(
        [*argv, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed: {result.stderr.strip()}")
    return result


@pytest.fixture(scope="module")
def layers() -> list[bytes]:
    return image_layers()


@pytest.fixture(scope="module")
def oci_archive(tmp_path_factory: pytest.TempPathFactory, layers: list[bytes]) -> Path:
    root = tmp_path_factory.mktemp("archive")
    write_oci_layout(root / "layout", layers)
    return tar_directory(root / "layout", root / "image.tar")


@pytest.fixture(scope="module", params=["overlay", "vfs"])
def podman_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, oci_archive: Path
) -> Iterator[tuple[Path, str]]:
    """A containers-storage store podman wrote: (store, image ID)."""
    run_setup_script()
    if missing_tools("podman"):
        pytest.skip("podman is not installed (scripts/containers-setup)")
    driver = str(request.param)
    root = tmp_path_factory.mktemp(f"podman-{driver}") / "storage"
    run = Path(tempfile.mkdtemp(prefix="usr-", dir="/tmp"))
    try:
        image_id = podman(root, run, driver, "pull", "-q", f"oci-archive:{oci_archive}")
        podman(root, run, driver, "tag", image_id.stdout.strip(), IMAGE)
        yield root, image_id.stdout.strip()
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            podman(root, run, driver, "system", "reset", "-f")
        subprocess.run(["umount", "-R", "-l", str(run)], capture_output=True, check=False)
        shutil.rmtree(run, ignore_errors=True)


def extract_layer(data: bytes, target: Path) -> None:
    """Unpack one OCI layer as dockerd's overlay2 driver stores it: ``.wh.NAME`` becomes a
    0/0 character device, ``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr."""
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            path = target / member.name.rstrip("/")
            name = path.name
            path.parent.mkdir(parents=True, exist_ok=True)  # (as dockerd makes them)
            if name == ".wh..wh..opq":
                os.setxattr(path.parent, "trusted.overlay.opaque", b"y")
            elif name.startswith(".wh."):
                os.mknod(path.with_name(name[4:]), stat.S_IFCHR | 0o000, os.makedev(0, 0))
            elif member.isdir():
                path.mkdir(exist_ok=True)
                path.chmod(member.mode & 0o7777)
            elif member.issym():
                path.symlink_to(member.linkname)
            else:
                extracted = tar.extractfile(member)
                assert extracted is not None
                path.write_bytes(extracted.read())
                path.chmod(member.mode & 0o7777)


def docker_config(layers: list[bytes], note: str = "") -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "comment": note,
        "rootfs": {"type": "layers", "diff_ids": [sha256(data) for data in layers]},
    }).encode()  # fmt: skip


def build_docker_store(root: Path, layers: list[bytes], *, second_image: bool = False) -> str:
    """A dockerd overlay2 store at ``root`` holding ``layers`` as image ``storetest:1``;
    with ``second_image``, a second image (other config, same layers) whose ID shares its
    first hex digit with the first one. Returns the first image's ID."""
    image_dir = root / "image" / "overlay2"
    content = image_dir / "imagedb" / "content" / "sha256"
    content.mkdir(parents=True)
    (root / "overlay2" / "l").mkdir(parents=True)
    chain = previous = ""
    shorts: list[str] = []
    for index, data in enumerate(layers):
        diff_id = sha256(data)
        chain = diff_id if not chain else sha256(f"{chain} {diff_id}".encode())
        cache_id = hashlib.sha256(b"cache-%d" % index).hexdigest()
        layer_dir = root / "overlay2" / cache_id
        extract_layer(data, layer_dir / "diff")
        short = hashlib.sha256(b"short-%d" % index).hexdigest()[:26].upper()
        (layer_dir / "link").write_text(short)
        (root / "overlay2" / "l" / short).symlink_to(f"../{cache_id}/diff")
        if shorts:
            (layer_dir / "lower").write_text(":".join(f"l/{s}" for s in reversed(shorts)))
        (layer_dir / "work").mkdir()
        shorts.append(short)
        db = image_dir / "layerdb" / "sha256" / chain.split(":")[1]
        db.mkdir(parents=True)
        (db / "cache-id").write_text(cache_id)
        (db / "diff").write_text(diff_id)
        (db / "size").write_text(str(len(data)))
        if index:
            (db / "parent").write_text(previous)
        previous = chain
    config = docker_config(layers)
    image_id = sha256(config).split(":")[1]
    (content / image_id).write_bytes(config)
    references = {"storetest:1": f"sha256:{image_id}"}
    if second_image:
        note = 0
        while True:
            other = docker_config(layers, f"twin {note}")
            other_id = sha256(other).split(":")[1]
            if other_id[0] == image_id[0]:
                break
            note += 1
        (content / other_id).write_bytes(other)
        references["storetest:2"] = f"sha256:{other_id}"
    (image_dir / "repositories.json").write_text(
        json.dumps({"Repositories": {"storetest": references}})
    )
    return image_id


@pytest.fixture
def docker_store(tmp_path: Path, layers: list[bytes]) -> tuple[Path, str]:
    root = tmp_path / "docker"
    return root, build_docker_store(root, layers, second_image=True)


# mounting ---------------------------------------------------------------------------------
def store_mounted(
    store: Path, image: str, mountpoint: Path, *, upper: Path | None = None
) -> contextlib.AbstractContextManager[Path]:
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.with_name(mountpoint.name + ".log")
    argv = unionfs_command([], mountpoint, upper=upper, log=log,
                           extra_args=["--store", str(store), image])  # fmt: skip
    return fuse_mounted(argv, mountpoint, marker="unionfs", log=log)


@pytest.mark.parametrize("how", ["full name", "short name", "ID prefix", "full ID"])
def test_mount_podman_store(
    podman_store: tuple[Path, str], layers: list[bytes], tmp_path: Path, how: str
) -> None:
    store, image_id = podman_store
    image = {"full name": IMAGE, "short name": "storetest:1", "ID prefix": image_id[:10],
             "full ID": f"sha256:{image_id}"}[how]  # fmt: skip
    before = store_fingerprint(store)
    with store_mounted(store, image, tmp_path / "mnt") as mounted:
        assert_image_tree(mounted, layers)
    assert store_fingerprint(store) == before


def test_writes_go_to_the_upper_and_never_to_the_store(
    podman_store: tuple[Path, str], layers: list[bytes], tmp_path: Path
) -> None:
    store, _ = podman_store
    before = store_fingerprint(store)
    upper = tmp_path / "upper"
    with store_mounted(store, IMAGE, tmp_path / "mnt", upper=upper) as mounted:
        (mounted / "etc" / "a").write_bytes(b"changed\n")
        (mounted / "srv" / "data").unlink()
        (mounted / "new").write_bytes(b"new")
    assert (upper / "etc" / "a").read_bytes() == b"changed\n"
    assert (upper / "new").read_bytes() == b"new"
    assert stat.S_ISCHR((upper / "srv" / "data").lstat().st_mode)
    assert store_fingerprint(store) == before


def test_run_in_a_podman_store_image(podman_store: tuple[Path, str], tmp_path: Path) -> None:
    if missing_tools("bwrap", "busybox"):
        pytest.skip("bwrap and busybox are needed to run a command in the image")
    store, image_id = podman_store
    before = store_fingerprint(store)
    result = subprocess.run(
        [sys.executable, "-m", "unionfs", "run", "--store", str(store), image_id[:12], "--",
         "/bin/cat", "/etc/a", "/old/3"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "two\n3"), result.stderr
    assert store_fingerprint(store) == before


@pytest.mark.parametrize("image", ["storetest:1", "docker.io/library/storetest:1", "ID prefix"])
def test_mount_docker_overlay2_store(
    docker_store: tuple[Path, str], layers: list[bytes], tmp_path: Path, image: str
) -> None:
    store, image_id = docker_store
    if image == "ID prefix":
        image = image_id[:8]
    before = store_fingerprint(store)
    with store_mounted(store, image, tmp_path / "mnt") as mounted:
        assert_image_tree(mounted, layers)
    assert store_fingerprint(store) == before


# bad input --------------------------------------------------------------------------------
def _docker_cache_dirs(store: Path) -> list[Path]:
    return sorted(p for p in (store / "overlay2").iterdir() if p.name != "l")


def _top_cache_dir(store: Path) -> Path:
    return next(p for p in _docker_cache_dirs(store) if (p / "lower").exists()
                and len((p / "lower").read_text().split(":")) == 2)  # fmt: skip


def _outside(store: Path) -> Path:
    outside = store.parent / "outside"
    (outside / "diff").mkdir(parents=True, exist_ok=True)
    (outside / "diff" / "secret").write_text("not in the store")
    return outside


def _escape_short_link(store: Path) -> None:
    top = _top_cache_dir(store)
    short = (top / "lower").read_text().split(":")[0].split("/")[1]
    link = store / "overlay2" / "l" / short
    link.unlink()
    link.symlink_to(f"../../{_outside(store).name}/diff")


def _absolute_short_link(store: Path) -> None:
    top = _top_cache_dir(store)
    short = (top / "lower").read_text().split(":")[0].split("/")[1]
    link = store / "overlay2" / "l" / short
    link.unlink()
    link.symlink_to(_outside(store) / "diff")


def _lower_entry_escapes(store: Path) -> None:
    (_top_cache_dir(store) / "lower").write_text("l/../../outside:l/X")


def _cache_id_escapes(store: Path) -> None:
    db = store / "image" / "overlay2" / "layerdb" / "sha256"
    for cache in db.iterdir():
        (cache / "cache-id").write_text(f"../{_outside(store).name}")
        break


def _layer_dir_is_symlink(store: Path) -> None:
    top = _top_cache_dir(store)
    shutil.rmtree(top / "diff")
    (top / "diff").symlink_to(_outside(store) / "diff")


def _missing_layer_dir(store: Path) -> None:
    shutil.rmtree(_top_cache_dir(store) / "diff")


def _damaged_repositories(store: Path) -> None:
    path = store / "image" / "overlay2" / "repositories.json"
    path.write_bytes(path.read_bytes()[:20])


def _damaged_config(store: Path) -> None:
    content = store / "image" / "overlay2" / "imagedb" / "content" / "sha256"
    for config in content.iterdir():
        config.write_text('{"rootfs": {"diff_ids": "nope"}}')


def _missing_layerdb(store: Path) -> None:
    shutil.rmtree(store / "image" / "overlay2" / "layerdb")


def _lower_disagrees(store: Path) -> None:
    lower = _top_cache_dir(store) / "lower"
    lower.write_text(":".join(reversed(lower.read_text().split(":"))))


DOCKER_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "short link escapes": (_escape_short_link, "storetest:1"),
    "absolute short link": (_absolute_short_link, "storetest:1"),
    "lower entry escapes": (_lower_entry_escapes, "storetest:1"),
    "cache-id escapes": (_cache_id_escapes, "storetest:1"),
    "layer dir is a symlink": (_layer_dir_is_symlink, "storetest:1"),
    "missing layer dir": (_missing_layer_dir, "storetest:1"),
    "damaged repositories.json": (_damaged_repositories, "storetest:1"),
    "damaged config": (_damaged_config, "storetest:1"),
    "missing layerdb": (_missing_layerdb, "storetest:1"),
    "lower file disagrees": (_lower_disagrees, "storetest:1"),
    "unknown image": (lambda store: None, "nosuch:latest"),
    "unknown tag": (lambda store: None, "storetest:3"),
    "unknown ID prefix": (lambda store: None, "sha256:ffffffffffff0"),
}


def assert_refused(store: Path, image: str, mountpoint: Path, *, command: str = "mount") -> str:
    """Run the CLI on a bad store: one line on stderr, exit 7, no mount, store unchanged
    (incl. mtimes and atimes). Returns the line."""
    before = store_fingerprint(store)
    mountpoint.mkdir(exist_ok=True)
    if command == "mount":
        argv = [sys.executable, "-m", "unionfs", "mount", "--store", str(store), image,
                str(mountpoint)]  # fmt: skip
    else:
        argv = [sys.executable, "-m", "unionfs", "run", "--store", str(store), image, "--",
                "/bin/true"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    lines = result.stderr.splitlines()
    assert result.returncode == EXIT_STORE, result.stderr
    assert len(lines) == 1 and lines[0].startswith("unionfs: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mountpoint)
    assert store_fingerprint(store) == before
    return lines[0]


@pytest.mark.parametrize("case", sorted(DOCKER_DAMAGE))
def test_bad_docker_store_is_refused(tmp_path: Path, layers: list[bytes], case: str) -> None:
    store = tmp_path / "docker"
    build_docker_store(store, layers, second_image=True)
    damage, image = DOCKER_DAMAGE[case]
    damage(store)
    line = assert_refused(store, image, tmp_path / "mnt")
    if "escapes" in case or "link" in case or "symlink" in case:
        assert "outside the store" in line or "leave the store" in line, line


def test_ambiguous_id_prefix_is_refused(docker_store: tuple[Path, str], tmp_path: Path) -> None:
    store, image_id = docker_store
    line = assert_refused(store, image_id[0], tmp_path / "mnt")
    assert "ambiguous" in line, line
    assert_refused(store, image_id[0], tmp_path / "mnt", command="run")


@pytest.mark.parametrize("path", ["missing", "file", "empty dir"])
def test_no_store_is_refused(tmp_path: Path, path: str) -> None:
    store = tmp_path / "store"
    if path == "file":
        store.write_text("x")
    elif path == "empty dir":
        store.mkdir()
    if path == "missing":
        argv = [sys.executable, "-m", "unionfs", "mount", "--store", str(store), "x",
                str(tmp_path)]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == EXIT_STORE and len(result.stderr.splitlines()) == 1
        assert not store.exists()
    else:
        assert_refused(store, "x", tmp_path / "mnt")


def _cs_images(store: Path) -> Path:
    return next(store.glob("*-images")) / "images.json"


def _cs_layers(store: Path) -> Path:
    return next(store.glob("*-layers")) / "layers.json"


def _cs_truncate_images(store: Path) -> None:
    _cs_images(store).write_bytes(_cs_images(store).read_bytes()[:30])


def _cs_images_not_a_list(store: Path) -> None:
    _cs_images(store).write_text('{"id": 1}')


def _cs_truncate_layers(store: Path) -> None:
    _cs_layers(store).write_bytes(_cs_layers(store).read_bytes()[:-5])


def _cs_parent_missing(store: Path) -> None:
    entries = json.loads(_cs_layers(store).read_text())
    _cs_layers(store).write_text(json.dumps([e for e in entries if "parent" in e]))


def _cs_layer_cycle(store: Path) -> None:
    entries = json.loads(_cs_layers(store).read_text())
    base = next(e for e in entries if "parent" not in e)
    base["parent"] = entries[-1]["id"]
    _cs_layers(store).write_text(json.dumps(entries))


def _cs_escaping_layer_id(store: Path) -> None:
    images = json.loads(_cs_images(store).read_text())
    images[0]["layer"] = "../../outside"
    _cs_images(store).write_text(json.dumps(images))
    entries = json.loads(_cs_layers(store).read_text())
    entries.append({"id": "../../outside"})
    _cs_layers(store).write_text(json.dumps(entries))


def _cs_missing_layer_dir(store: Path) -> None:
    images = json.loads(_cs_images(store).read_text())
    top = images[0]["layer"]
    target = store / "overlay" / top / "diff"
    if not target.exists():
        target = store / "vfs" / "dir" / top
    shutil.rmtree(target)


def _cs_layer_dir_symlink(store: Path) -> None:
    images = json.loads(_cs_images(store).read_text())
    top = images[0]["layer"]
    target = store / "overlay" / top
    if not target.exists():
        target = store / "vfs" / "dir" / top
    shutil.rmtree(target)
    target.symlink_to(_outside(store))


CS_DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated images.json": _cs_truncate_images,
    "images.json not a list": _cs_images_not_a_list,
    "truncated layers.json": _cs_truncate_layers,
    "parent layer missing": _cs_parent_missing,
    "layer chain cycle": _cs_layer_cycle,
    "layer ID escapes": _cs_escaping_layer_id,
    "missing layer dir": _cs_missing_layer_dir,
    "layer dir is a symlink": _cs_layer_dir_symlink,
}


@pytest.mark.parametrize("case", sorted(CS_DAMAGE))
def test_bad_containers_store_is_refused(
    podman_store: tuple[Path, str], tmp_path: Path, case: str
) -> None:
    original, _ = podman_store
    store = tmp_path / "storage"
    subprocess.run(["cp", "-a", str(original), str(store)], check=True, timeout=120)
    CS_DAMAGE[case](store)
    assert_refused(store, IMAGE, tmp_path / "mnt")


def test_unknown_and_ambiguous_in_podman_store(
    podman_store: tuple[Path, str], tmp_path: Path
) -> None:
    store, _ = podman_store
    assert_refused(store, "localhost/storetest:2", tmp_path / "mnt")
    assert_refused(store, "0" * 64, tmp_path / "mnt")


@pytest.mark.parametrize(
    "arguments",
    [
        ["mount", "--store", "{store}", "{mnt}"],  # no IMAGE
        ["mount", "--store", "{store}", "--image", "{store}", "storetest:1", "{mnt}"],
        ["run", "--store", "{store}", "storetest:1"],  # no command
        ["run", "--store", "{store}", "--", "/bin/true"],  # no IMAGE
    ],
)
def test_store_usage_errors(
    docker_store: tuple[Path, str], tmp_path: Path, arguments: list[str]
) -> None:
    store, _ = docker_store
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    before = store_fingerprint(store)
    argv = [a.format(store=store, mnt=mountpoint) for a in arguments]
    result = subprocess.run([sys.executable, "-m", "unionfs", *argv], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not is_mounted(mountpoint)
    assert store_fingerprint(store) == before

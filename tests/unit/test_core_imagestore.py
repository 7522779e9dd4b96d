"""The image-store readers (unionfs/imagestore.py) without a mount: chain IDs, name forms,
matching by name/ID/prefix, the containers-storage parent chain, l/ link targets, and
``find_image`` on small stores laid out here (Docker overlay2 and containers-storage), with
their damage. The stores real engines write are mounted in tests/containers/test_image_store.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from unionfs.imagestore import (
    Candidate,
    StoreError,
    chain_ids,
    containers_candidates,
    containers_layer_chain,
    docker_candidates,
    find_image,
    link_target,
    match_image,
    name_forms,
)

A, B, C = ("sha256:" + hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))


def test_chain_ids_follow_moby_create_chain_id() -> None:
    # layer.CreateChainID: the base's chain ID is its diff ID, then sha256("PARENT DIFF").
    second = "sha256:" + hashlib.sha256(f"{A} {B}".encode()).hexdigest()
    third = "sha256:" + hashlib.sha256(f"{second} {C}".encode()).hexdigest()
    assert chain_ids([A, B, C]) == [A, second, third]
    assert chain_ids([]) == []


@pytest.mark.parametrize(
    ("given", "wanted"),
    [
        ("alpine", ["alpine:latest", "docker.io/library/alpine:latest", "localhost/alpine:latest"]),
        ("docker.io/library/alpine:3", ["alpine:3"]),
        ("quay.io/x/y:1", ["quay.io/x/y:1"]),
        ("me/app", ["me/app:latest", "docker.io/me/app:latest"]),
        ("localhost/demo:1", ["localhost/demo:1"]),
        ("busybox@sha256:" + "0" * 64, ["busybox@sha256:" + "0" * 64]),
    ],
)
def test_name_forms(given: str, wanted: list[str]) -> None:
    forms = name_forms(given)
    assert forms[0] == given
    for form in wanted:
        assert form in forms


def candidates() -> dict[str, Candidate]:
    ids = ["ab" + "0" * 62, "ab" + "1" * 62, "cd" + "2" * 62]
    return {
        ids[0]: Candidate(ids[0], ("docker.io/library/alpine:latest",)),
        ids[1]: Candidate(ids[1], ("localhost/demo:1", "demo:1")),
        ids[2]: Candidate(ids[2], ()),
    }


def test_match_by_name_id_and_prefix() -> None:
    found = candidates()
    assert match_image(found, "alpine").image_id.startswith("ab0")
    assert match_image(found, "demo:1").image_id.startswith("ab1")
    assert match_image(found, "localhost/demo:1").image_id.startswith("ab1")
    assert match_image(found, "cd").image_id.startswith("cd2")
    assert match_image(found, "sha256:ab1").image_id.startswith("ab1")
    assert match_image(found, "ab" + "1" * 62).image_id.startswith("ab1")


@pytest.mark.parametrize(
    ("image", "words"),
    [("ab", "ambiguous"), ("ef", "no image"), ("alpine:edge", "no image"), ("", "no image")],
)
def test_match_refuses(image: str, words: str) -> None:
    with pytest.raises(StoreError) as refused:
        match_image(candidates(), image)
    assert words in refused.value.message and "\n" not in refused.value.message
    assert refused.value.code == 7


def test_docker_repositories_parse() -> None:
    image = "f" * 64
    found = docker_candidates(
        {
            "Repositories": {
                "busybox": {"busybox:latest": f"sha256:{image}", "busybox:1": f"sha256:{image}"}
            }
        }
    )
    assert found[image].names == ("busybox:latest", "busybox:1")


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"Repositories": []},
        {"Repositories": {"x": []}},
        {"Repositories": {"x": {"x:1": "nope"}}},
    ],
)
def test_damaged_repositories(document: object) -> None:
    with pytest.raises(StoreError):
        docker_candidates(document)


@pytest.mark.parametrize(
    "document",
    [
        {},
        [1],
        [{"id": "x", "layer": "l"}],
        [{"id": "a" * 64}],
        [{"id": "a" * 64, "layer": "l", "names": "x"}],
    ],
)
def test_damaged_images_json(document: object) -> None:
    with pytest.raises(StoreError):
        containers_candidates(document)


def test_layer_chain_follows_parents() -> None:
    layers = [{"id": "top", "parent": "mid"}, {"id": "base"}, {"id": "mid", "parent": "base"}]
    assert containers_layer_chain(layers, "top") == ["base", "mid", "top"]
    assert containers_layer_chain(layers, "base") == ["base"]


@pytest.mark.parametrize(
    "layers",
    [
        [{"id": "top", "parent": "gone"}],
        [{"id": "top", "parent": "top"}],
        [{"id": "top", "parent": "b"}, {"id": "b", "parent": "top"}],
        [{"parent": "x"}],
        [{"id": "top", "parent": 3}],
        [{"id": "top", "flags": {"incomplete": True}}],  # c/storage's mark of a half pull
    ],
)
def test_layer_chain_refuses_damage(layers: list[object]) -> None:
    with pytest.raises(StoreError):
        containers_layer_chain(layers, "top")


def test_link_target() -> None:
    assert link_target(b"../abc/diff") == "abc"
    for bad in (
        b"/etc/diff",
        b"../../x/diff",
        b"../abc/merged",
        b"../../diff",
        b".././diff",
        b"abc",
    ):
        with pytest.raises(StoreError) as refused:
            link_target(bad)
        assert "outside the store" in refused.value.message


# find_image on stores laid out here -------------------------------------------------------
def docker_store(root: Path) -> tuple[str, list[Path]]:
    diff_ids = [A, B]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    image = hashlib.sha256(config).hexdigest()
    content = root / "image/overlay2/imagedb/content/sha256"
    content.mkdir(parents=True)
    (content / image).write_bytes(config)
    (root / "image/overlay2/repositories.json").write_text(
        json.dumps({"Repositories": {"app": {"app:1": f"sha256:{image}"}}})
    )
    (root / "overlay2/l").mkdir(parents=True)
    dirs = []
    for index, chain in enumerate(chain_ids(diff_ids)):
        cache = f"cache{index}"
        db = root / "image/overlay2/layerdb/sha256" / chain.split(":")[1]
        db.mkdir(parents=True)
        (db / "cache-id").write_text(cache)
        (root / "overlay2" / cache / "diff").mkdir(parents=True)
        (root / "overlay2" / cache / "link").write_text(f"SHORT{index}")
        (root / "overlay2/l" / f"SHORT{index}").symlink_to(f"../{cache}/diff")
        dirs.append(root / "overlay2" / cache / "diff")
    (root / "overlay2/cache1/lower").write_text("l/SHORT0")
    return image, dirs


def test_find_docker_image(tmp_path: Path) -> None:
    image, dirs = docker_store(tmp_path)
    for name in ("app:1", "docker.io/library/app:1", image[:5], f"sha256:{image}"):
        found = find_image(str(tmp_path), name)
        assert found.kind == "docker-overlay2" and found.image_id == image
        assert found.layers == [str(path) for path in dirs]


def test_find_containers_image(tmp_path: Path) -> None:
    (tmp_path / "overlay-images").mkdir()
    (tmp_path / "overlay-layers").mkdir()
    image = "e" * 64
    (tmp_path / "overlay-images/images.json").write_text(
        json.dumps([{"id": image, "names": ["localhost/x:1"], "layer": "L2"}])
    )
    (tmp_path / "overlay-layers/layers.json").write_text(
        json.dumps([{"id": "L1"}, {"id": "L2", "parent": "L1"}])
    )
    for layer in ("L1", "L2"):
        (tmp_path / "overlay" / layer / "diff").mkdir(parents=True)
    found = find_image(str(tmp_path), "x:1")
    assert found.kind == "containers-storage"
    assert found.layers == [str(tmp_path / "overlay/L1/diff"), str(tmp_path / "overlay/L2/diff")]
    (tmp_path / "vfs-images").mkdir()  # a second driver's images beside: vfs mounts one layer
    (tmp_path / "vfs-layers").mkdir()
    (tmp_path / "vfs-images/images.json").write_text(
        json.dumps([{"id": "d" * 64, "names": ["localhost/v:1"], "layer": "V2"}])
    )
    (tmp_path / "vfs-layers/layers.json").write_text(
        json.dumps([{"id": "V1"}, {"id": "V2", "parent": "V1"}])
    )
    (tmp_path / "vfs/dir/V2").mkdir(parents=True)
    assert find_image(str(tmp_path), "v:1").layers == [str(tmp_path / "vfs/dir/V2")]


def test_find_image_reads_no_atime(tmp_path: Path) -> None:
    image, _ = docker_store(tmp_path)
    config = tmp_path / "image/overlay2/imagedb/content/sha256" / image
    os.utime(config, (1_000, 2_000))  # atime before mtime: relatime would update it on read
    find_image(str(tmp_path), "app:1")
    assert config.stat().st_atime == 1_000


@pytest.mark.parametrize("damage", ["symlinked layerdb", "escaping cache-id", "no store"])
def test_find_image_refuses(tmp_path: Path, damage: str) -> None:
    docker_store(tmp_path / "s")
    store = tmp_path / "s"
    if damage == "symlinked layerdb":
        layerdb = store / "image/overlay2/layerdb"
        layerdb.rename(tmp_path / "elsewhere")
        layerdb.symlink_to(tmp_path / "elsewhere")
    elif damage == "escaping cache-id":
        for cache_id in store.glob("image/overlay2/layerdb/sha256/*/cache-id"):
            cache_id.write_text("../../..")
    else:
        store = tmp_path / "nothing"
        store.mkdir()
    with pytest.raises(StoreError) as refused:
        find_image(str(store), "app:1")
    assert "\n" not in refused.value.message

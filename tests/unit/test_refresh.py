"""The refresh rules without a mount: which daemon caches go and which kernel invalidations a
changed lower layer asks for."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support import TmpLayers
from unionfs.layer import Layer
from unionfs.refresh import Refresher
from unionfs.tree import MergedTree


def make_tree(layer_dirs: list[Path]) -> MergedTree:
    """Layers base first (as on the command line); the tree wants them top first."""
    return MergedTree([Layer(str(path), index, writable=False)
                       for index, path in enumerate(reversed(layer_dirs))])  # fmt: skip


def names(tree: MergedTree) -> list[bytes]:
    return sorted(name for name, _kind in tree.list_dir(tree.root))


def test_refresh_of_the_root_sees_added_removed_and_replaced(tmp_layers: TmpLayers) -> None:
    base, top = tmp_layers({"f": "one", "gone": "g", "same": "s"}, {"t": "t"})
    tree = make_tree([base, top])
    try:
        refresher = Refresher(tree)
        root = tree.root
        found = {name: tree.lookup(root, name) for name in (b"f", b"gone", b"same")}
        old_f = found[b"f"]
        assert old_f is not None and names(tree) == [b"f", b"gone", b"same", b"t"]
        (base / "new").write_text("n")
        (base / "gone").unlink()
        (base / "f.tmp").write_text("two")
        (base / "f.tmp").rename(base / "f")
        assert names(tree) == [b"f", b"gone", b"same", b"t"]  # cached until refreshed
        out = refresher.refresh_node(root)
        assert names(tree) == [b"f", b"new", b"same", b"t"]
        entries = {name for ino, name in out if ino == root.ino and name is not None}
        assert {b"new", b"gone", b"f"} <= entries  # a new name, a gone one, a new object
        assert b"same" not in entries  # unchanged: the kernel keeps it
        assert (root.ino, None) in out  # the root's attributes and cached listing
        new_f = tree.lookup(root, b"f")
        assert new_f is not None and new_f[0] is not old_f[0]
        fd = tree.open_for_read(new_f[0])
        try:
            assert os.read(fd, 10) == b"two"
        finally:
            os.close(fd)
    finally:
        tree.close()


def test_a_file_rewritten_in_place_gets_a_node_of_its_own(tmp_layers: TmpLayers) -> None:
    (base,) = tmp_layers({"d/f": "aa"})
    tree = make_tree([base])
    try:
        refresher = Refresher(tree)
        directory = tree.lookup(tree.root, b"d")
        assert directory is not None
        before = tree.lookup(directory[0], b"f")
        assert before is not None and before[1].st_size == 2
        with open(base / "d" / "f", "r+") as rewritten:
            rewritten.write("bbbb")
        out = refresher.refresh_entries({(b"d",): {b"f"}})
        assert (directory[0].ino, b"f") in out and (before[0].ino, None) in out
        after = tree.lookup(directory[0], b"f")
        assert after is not None and after[1].st_size == 4
        assert after[0].ino != before[0].ino  # the kernel keeps a cached inode's size
        assert refresher.refresh_entries({(b"nowhere",): {b"x"}}) == []  # nothing known there
    finally:
        tree.close()


def test_a_directory_new_in_another_layer_joins_the_merge(tmp_layers: TmpLayers) -> None:
    base, top = tmp_layers({"d/a": "a"}, {"t": "t"})
    tree = make_tree([base, top])
    try:
        refresher = Refresher(tree)
        directory = tree.lookup(tree.root, b"d")
        assert directory is not None and len(directory[0].lower) == 1
        (top / "d").mkdir()
        (top / "d" / "b").write_text("b")
        refresher.refresh_entries({(): {b"d"}})
        again = tree.lookup(tree.root, b"d")
        assert again is not None
        assert sorted(name for name, _kind in tree.list_dir(again[0])) == [b"a", b"b"]
    finally:
        tree.close()

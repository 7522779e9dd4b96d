"""Data-only lower layers in the read rules (unionfs/stack.py), without a mount: a metacopy
file whose absolute redirect finds no data in the regular lowers reads it from the first
data-only layer holding a regular file there; nothing else ever reaches a data-only layer.
The kernel comparison is tests/differential/test_data_layers_differential.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.unit.test_core_metacopy import REDIRECT, metacopy
from unionfs.layer import Layer
from unionfs.stack import Stack


def stack_of(regular_base_first: list[Path], data: list[Path]) -> Stack:
    regular = [Layer(str(p), i, writable=False) for i, p in enumerate(reversed(regular_base_first))]
    count = len(regular)
    return Stack(regular, [Layer(str(p), count + i, writable=False) for i, p in enumerate(data)])


def layers_in(tmp_path: Path, *names: str) -> list[Path]:
    paths = [tmp_path / name for name in names]
    for path in paths:
        path.mkdir()
    return paths


def data_of(stack: Stack, name: bytes) -> tuple[str, tuple[bytes, ...]] | None:
    resolved = stack.resolve(stack.root_sources(), name)
    assert resolved is not None and resolved.kind == stat.S_IFREG
    chain = stack.chain(resolved, name)
    assert chain.metacopy
    if chain.data is None:
        return None
    return chain.data.layer.path, chain.data.path


def test_absolute_redirect_reads_from_the_first_data_layer_holding_it(tmp_path: Path) -> None:
    meta, data1, data2 = layers_in(tmp_path, "meta", "data1", "data2")
    (data1 / "o").mkdir()
    (data2 / "o").mkdir()
    (data2 / "o" / "x").write_bytes(b"x2")
    (data2 / "o" / "y").write_bytes(b"y2")
    (data1 / "o" / "y").write_bytes(b"y1")
    metacopy(meta / "fx", 2, b"/o/x")
    metacopy(meta / "fy", 2, b"/o/y")
    stack = stack_of([meta], [data1, data2])
    assert data_of(stack, b"fx") == (str(data2), (b"o", b"x"))
    assert data_of(stack, b"fy") == (str(data1), (b"o", b"y"))


def test_data_layers_are_never_listed_nor_found(tmp_path: Path) -> None:
    meta, data = layers_in(tmp_path, "meta", "data")
    (data / "only").write_bytes(b"d")
    (meta / "plain").write_bytes(b"p")
    stack = stack_of([meta], [data])
    assert [name for name, _ in stack.list_merged(stack.root_sources())] == [b"plain"]
    assert stack.resolve(stack.root_sources(), b"only") is None


def test_regular_lowers_win_over_data_layers(tmp_path: Path) -> None:
    base, meta, data = layers_in(tmp_path, "base", "meta", "data")
    (base / "o").mkdir()
    (base / "o" / "x").write_bytes(b"base")
    (data / "o").mkdir()
    (data / "o" / "x").write_bytes(b"data")
    metacopy(meta / "f", 4, b"/o/x")
    assert data_of(stack_of([base, meta], [data]), b"f") == (str(base), (b"o", b"x"))


def test_only_an_absolute_redirect_reaches_data_layers(tmp_path: Path) -> None:
    meta, data = layers_in(tmp_path, "meta", "data")
    (data / "f").write_bytes(b"data")
    (data / "g").write_bytes(b"data")
    metacopy(meta / "f", 4)  # no redirect
    metacopy(meta / "h", 4, b"g")  # a relative redirect
    stack = stack_of([meta], [data])
    assert data_of(stack, b"f") is None
    assert data_of(stack, b"h") is None


def test_missing_data_names_the_first_data_layer(tmp_path: Path) -> None:
    """The kernel looks data-only layers up at the first open and fails it with ENOENT: the
    data source names a path no data layer holds, so the open fails just so."""
    meta, data = layers_in(tmp_path, "meta", "data")
    (data / "o").mkdir()
    (data / "o" / "dir").mkdir()
    (data / "o" / "link").symlink_to("/etc/passwd")
    metacopy(meta / "gone", 4, b"/o/gone")
    metacopy(meta / "dir", 4, b"/o/dir")
    metacopy(meta / "link", 4, b"/o/link")
    stack = stack_of([meta], [data])
    for name in (b"gone", b"dir", b"link"):
        found = data_of(stack, name)
        assert found is not None and found[0] == str(data)
        st = stack.data_layers[0].try_lstat(found[1])
        assert st is None or not stat.S_ISREG(st.st_mode)  # the open fails: see tree.py
    assert os.getxattr(meta / "gone", REDIRECT) == b"/o/gone"

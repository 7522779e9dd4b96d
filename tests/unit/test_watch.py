"""The inotify wrapper of -o watch without a mount: watches per directory, events as changes,
new directories followed, and the one-line fallback at the user's watch limit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from unionfs import watch
from unionfs.layer import Layer
from unionfs.safeio import RelPath


def drain(watcher: watch.Watcher) -> watch.Changes:
    """The queue, read without blocking: events of syscalls already made are in it."""
    return watcher.read()


def test_every_directory_is_watched_and_events_name_the_change(tmp_path: Path) -> None:
    for path in ("a/b", "a/c", "d"):
        (tmp_path / path).mkdir(parents=True)
    (tmp_path / "a" / "b" / "file").write_text("x")
    layer = Layer(str(tmp_path), 0, writable=False)
    watcher = watch.Watcher([layer])
    try:
        assert watcher.watch_tree(layer) == 5  # the root, a, a/b, a/c, d
        assert sorted(path for _layer, path in watcher.watched.values()) == [
            (), (b"a",), (b"a", b"b"), (b"a", b"c"), (b"d",)]  # fmt: skip
        (tmp_path / "a" / "b" / "file").write_text("y")
        (tmp_path / "d" / "new").write_text("n")
        (tmp_path / "gone").write_text("")
        (tmp_path / "gone").unlink()
        changes = drain(watcher)
        expected: dict[RelPath, set[bytes]] = {(b"a", b"b"): {b"file"}, (b"d",): {b"new"},
                                               (): {b"gone"}}  # fmt: skip
        assert changes.names == expected and not changes.overflow
        (tmp_path / "d" / "sub").mkdir()
        assert drain(watcher).names == {(b"d",): {b"sub"}}
        (tmp_path / "d" / "sub" / "deep").write_text("z")  # the new directory is watched
        assert drain(watcher).names == {(b"d", b"sub"): {b"deep"}}
        assert drain(watcher).names == {}
    finally:
        watcher.close()
        layer.close()


def test_the_watch_limit_stops_the_walk_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for index in range(5):
        (tmp_path / f"d{index}").mkdir()
    layer = Layer(str(tmp_path), 0, writable=False)
    watcher = watch.Watcher([layer])
    real_add = watch.Watcher._add

    def limited_add(self: watch.Watcher, fd: int, where: Layer, path: RelPath) -> None:
        if len(self.watched) >= 3:
            raise watch.WatchLimit()
        real_add(self, fd, where, path)

    monkeypatch.setattr(watch.Watcher, "_add", limited_add)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        with caplog.at_level(logging.WARNING, logger="unionfs.watch"):
            assert watcher.watch_tree(layer) == 3
            assert len(os.listdir("/proc/self/fd")) == fds  # the walk's fds are all closed
            assert watcher.limited
            assert watcher.watch_tree(layer, (b"d0",)) == 0  # no second try, no second line
        warnings = [record.getMessage() for record in caplog.records]
        assert len(warnings) == 1 and "inotify watch limit" in warnings[0]
        assert "unionfs refresh" in warnings[0]
    finally:
        watcher.close()
        layer.close()

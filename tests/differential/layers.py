"""Layer stacks for differential tests: a small description language, its builder, strategies.

A `Stack` is a list of `Layer`s, base first (the order of `unionfs mount LAYER...`). A `Layer`
maps a path (tuple of names) to a `Node`. `build_stack` writes a stack to disk in the kernel
overlayfs format (whiteout = char device 0/0, opaque dir = `trusted.overlay.opaque=y`) or in the OCI
format (`.wh.NAME` files, `.wh..wh..opq`), and `convert_layer_to_oci` converts a layer directory
already on disk from the first form to the second.

`merged_view` computes, from a description, what kernel overlayfs shows (lookup top->bottom, a
whiteout or a non-directory ends the lookup, an opaque directory stops merging), and the
hypothesis strategy `stacks()` uses it to only generate stacks inside kernel overlayfs's domain:

* a whiteout is only placed over a name visible in the layers below, in a directory of its layer
  that is not opaque (kernel overlayfs lists a directory that exists in a single layer straight from
  disk, so a whiteout there would show up as a 0/0 device; unionfs hides it; neither is "right");
* names starting with `.wh.` and xattrs named `*.overlay.*` are never generated (they are markers).

Everything else is fair game: files/dirs/symlinks (absolute, `../..`, loops, dangling), hard links
within a layer, fifos, sockets, devices, opaque dirs, a file shadowing a dir and the reverse,
`user.*`/`trusted.*` xattrs, setuid/setgid/sticky modes, several owners, nanosecond mtimes.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hypothesis import strategies as st

from tests.support.mounts import mounts_under

RelPath = tuple[str, ...]
Kind = Literal[
    "file", "dir", "symlink", "hardlink", "fifo", "socket", "chardev", "blockdev", "whiteout"
]

#: Instant before which every generated mtime lies (2020-09-13): see tree.diff_snapshots.
GENERATED_MTIME_LIMIT_NS = 1_600_000_000_000_000_000
BASE_MTIME_NS = 1_000_000_000_123_456_789  # 2001-09-09, with nanoseconds

OPAQUE_XATTR = "trusted.overlay.opaque"
OCI_WHITEOUT_PREFIX = ".wh."
OCI_OPAQUE_NAME = ".wh..wh..opq"


@dataclass(frozen=True)
class Node:
    kind: Kind
    mode: int = 0o644  # permission bits (incl. setuid/setgid/sticky)
    uid: int = 0
    gid: int = 0
    content: bytes = b""  # file
    hole_before: int = 0  # file: content is written at this offset, leaving a hole before it
    target: str = ""  # symlink target, or for a hardlink: "/"-joined path of the linked file
    rdev: tuple[int, int] = (0, 0)  # chardev/blockdev
    xattrs: tuple[tuple[str, bytes], ...] = ()
    opaque: bool = False  # dir
    mtime_ns: int = BASE_MTIME_NS

    def short(self) -> str:
        extra = ""
        if self.kind == "file":
            extra = f" {len(self.content)}B" + (f"@{self.hole_before}" if self.hole_before else "")
        elif self.kind in ("symlink", "hardlink"):
            extra = f" -> {self.target}"
        elif self.kind == "dir" and self.opaque:
            extra = " opaque"
        if self.xattrs:
            extra += " xattrs=" + ",".join(name for name, _ in self.xattrs)
        return f"{self.kind} {self.mode:o} {self.uid}:{self.gid}{extra}"


Layer = dict[RelPath, Node]
Stack = list[Layer]


def describe_stack(stack: Stack) -> str:
    lines = []
    for index, layer in enumerate(stack):
        lines.append(f"layer {index}{' (base)' if index == 0 else ''}:")
        for path in sorted(layer):
            lines.append(f"  {'/'.join(path)}: {layer[path].short()}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the union rules


@dataclass
class Resolved:
    node: Node  # the topmost node (for a hardlink: the hardlink node itself)
    layer: int  # index of the layer holding it
    dir_layers: list[int] = field(default_factory=list)  # for a dir: layers merged, top first


def resolve(stack: Stack, path: RelPath) -> Resolved | None:
    """What kernel overlayfs finds at `path` (None: nothing, or whited out)."""
    layers = list(range(len(stack) - 1, -1, -1))  # the root dir is merged from all layers
    found: Resolved | None = None
    for depth in range(1, len(path) + 1):
        prefix = path[:depth]
        found = None
        merged: list[int] = []
        for index in layers:
            node = stack[index].get(prefix)
            if node is None:
                continue
            if node.kind == "whiteout":
                break
            if node.kind != "dir":
                if found is None:
                    found = Resolved(node, index)
                break
            if found is None:
                found = Resolved(node, index)
            merged.append(index)
            if node.opaque:
                break
        if found is None:
            return None
        if found.node.kind == "dir":
            found.dir_layers = merged
        elif depth < len(path):
            return None
        layers = merged
    return found


def merged_view(stack: Stack) -> dict[RelPath, Resolved]:
    """Every path visible through the union, with what it resolves to."""
    candidates = {path for layer in stack for path in layer}
    view = {}
    for path in candidates:
        resolved = resolve(stack, path)
        if resolved is not None:
            view[path] = resolved
    return view


def view_kind(stack: Stack, resolved: Resolved) -> str:
    if resolved.node.kind == "hardlink":
        return "file"
    return resolved.node.kind


# ----------------------------------------------------------------------------- building on disk


def _join(root: Path, path: RelPath) -> Path:
    return root.joinpath(*path)


def _set_metadata(target: Path, node: Node) -> None:
    for name, value in node.xattrs:
        os.setxattr(target, name, value, follow_symlinks=False)
    os.chown(target, node.uid, node.gid, follow_symlinks=False)
    if node.kind != "symlink":
        os.chmod(target, node.mode)  # after chown: chown clears setuid/setgid


def build_layer(root: Path, layer: Layer, whiteout_format: str = "overlay") -> None:
    """Write one layer below `root` (created if missing) in the given whiteout format."""
    if whiteout_format not in ("overlay", "oci"):
        raise ValueError(whiteout_format)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    ordered = sorted(layer, key=lambda path: (len(path), path))
    for path in ordered:
        node = layer[path]
        target = _join(root, path)
        if node.kind == "dir":
            target.mkdir()
            if node.opaque:
                if whiteout_format == "overlay":
                    os.setxattr(target, OPAQUE_XATTR, b"y")
                else:
                    (target / OCI_OPAQUE_NAME).touch()
        elif node.kind == "file":
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if node.hole_before:
                    os.ftruncate(fd, node.hole_before)
                    os.pwrite(fd, node.content, node.hole_before)
                else:
                    os.write(fd, node.content)
            finally:
                os.close(fd)
        elif node.kind == "symlink":
            os.symlink(node.target, target)
        elif node.kind == "fifo":
            os.mkfifo(target, 0o600)
        elif node.kind == "socket":
            os.mknod(target, stat.S_IFSOCK | 0o600)
        elif node.kind == "chardev":
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(*node.rdev))
        elif node.kind == "blockdev":
            os.mknod(target, stat.S_IFBLK | 0o600, os.makedev(*node.rdev))
        elif node.kind == "whiteout":
            if whiteout_format == "overlay":
                os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            else:
                (target.parent / (OCI_WHITEOUT_PREFIX + target.name)).touch()
        elif node.kind == "hardlink":
            continue  # below, once every file exists
        else:
            raise ValueError(node.kind)
    for path in ordered:
        node = layer[path]
        if node.kind == "hardlink":
            os.link(_join(root, tuple(node.target.split("/"))), _join(root, path))
    # metadata last, deepest first, so that creating children does not disturb a parent's mtime
    for path in sorted(layer, key=lambda path: (-len(path), path)):
        node = layer[path]
        target = _join(root, path)
        if node.kind == "hardlink":
            continue
        if node.kind == "whiteout":
            if whiteout_format == "oci":
                target = target.parent / (OCI_WHITEOUT_PREFIX + target.name)
            os.utime(target, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
            continue
        _set_metadata(target, node)
        if node.kind == "dir" and node.opaque and whiteout_format == "oci":
            marker = target / OCI_OPAQUE_NAME
            os.utime(marker, ns=(node.mtime_ns, node.mtime_ns))
        os.utime(target, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
    os.utime(root, ns=(BASE_MTIME_NS, BASE_MTIME_NS))


def build_stack(stack: Stack, base_dir: Path, whiteout_format: str = "overlay") -> list[Path]:
    """Write every layer under `base_dir/layerN`; return the layer dirs, base first."""
    dirs = []
    for index, layer in enumerate(stack):
        layer_dir = base_dir / f"layer{index}"
        build_layer(layer_dir, layer, whiteout_format)
        dirs.append(layer_dir)
    return dirs


def convert_layer_to_oci(source: Path, destination: Path) -> None:
    """Copy a layer dir written in overlay format to `destination` in OCI format.

    Char devices 0/0 become empty `.wh.NAME` files, dirs with `trusted.overlay.opaque=y` (or
    `user.overlay.opaque=y`) get a `.wh..wh..opq` file instead of the xattr. Everything else (hard
    links, owners, modes, xattrs, times) is preserved by `cp -a`.
    """
    if destination.exists():
        raise FileExistsError(destination)
    subprocess.run(
        ["cp", "-a", "--preserve=all", "--no-dereference", str(source), str(destination)],
        check=True,
    )
    parents_to_restore: dict[str, int] = {}
    for directory, dirnames, filenames in os.walk(destination):
        parents_to_restore.setdefault(directory, os.lstat(directory).st_mtime_ns)
        for name in filenames + dirnames:
            path = os.path.join(directory, name)
            st_ = os.lstat(path)
            if stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0:
                os.unlink(path)
                marker = os.path.join(directory, OCI_WHITEOUT_PREFIX + name)
                with open(marker, "wb"):
                    pass
                os.utime(marker, ns=(st_.st_mtime_ns, st_.st_mtime_ns))
            elif stat.S_ISDIR(st_.st_mode):
                parents_to_restore.setdefault(path, st_.st_mtime_ns)
                opaque = False
                for attribute in (OPAQUE_XATTR, "user.overlay.opaque"):
                    try:
                        if os.getxattr(path, attribute) == b"y":
                            opaque = True
                        os.removexattr(path, attribute)
                    except OSError:
                        pass
                if opaque:
                    marker = os.path.join(path, OCI_OPAQUE_NAME)
                    with open(marker, "wb"):
                        pass
                    os.utime(marker, ns=(st_.st_mtime_ns, st_.st_mtime_ns))
    for directory, mtime_ns in parents_to_restore.items():
        os.utime(directory, ns=(mtime_ns, mtime_ns))


def convert_stack_to_oci(layer_dirs: Sequence[Path], base_dir: Path) -> list[Path]:
    out = []
    base_dir.mkdir(parents=True, exist_ok=True)
    for index, layer_dir in enumerate(layer_dirs):
        destination = base_dir / f"oci{index}"
        convert_layer_to_oci(layer_dir, destination)
        out.append(destination)
    return out


def remove_tree(path: Path) -> None:
    """rm -rf, but never into a mount still left below `path` (the mount fixtures report those)."""
    if mounts_under(path):
        return
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


# ----------------------------------------------------------------------------- strategies

DEFAULT_NAMES: tuple[str, ...] = ("a", "b", "c", "d e", "\u00fc", ".h", os.fsdecode(b"\xff"))
FILE_MODES = (0o644, 0o600, 0o755, 0o444, 0o4755, 0o2750, 0o000, 0o1644)
DIR_MODES = (0o755, 0o700, 0o1777, 0o2775, 0o555, 0o750)
OWNERS = ((0, 0), (1000, 1000), (65534, 65534), (1000, 0), (0, 100))
XATTR_NAMES = ("user.test.a", "user.test.b", "trusted.test.c")
SYMLINK_TARGETS = (
    "a",
    "b/c",
    "../a",
    "../../..",
    "../../../etc/passwd",
    "/etc/passwd",
    "/a",
    "/",
    "self-loop",
    "dangling/nowhere",
    "x" * 200,
)
MTIMES = tuple(BASE_MTIME_NS + step * 86_400_000_000_001 for step in range(4))


def _content() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=48),
        st.sampled_from((b"", b"lower\n", b"x" * 4096, bytes(range(256)) * 300)),
    )


def _xattr_set(names: Sequence[str]) -> st.SearchStrategy[tuple[tuple[str, bytes], ...]]:
    return st.lists(
        st.tuples(
            st.sampled_from(names), st.sampled_from((b"", b"v", b"value\x00bin", b"x" * 300))
        ),
        max_size=2,
        unique_by=lambda item: item[0],
    ).map(lambda items: tuple(sorted(items)))


def paths(names: Sequence[str], max_depth: int) -> st.SearchStrategy[RelPath]:
    return st.lists(st.sampled_from(names), min_size=1, max_size=max_depth).map(tuple)


@st.composite
def _node(draw: st.DrawFn, kind: str, options: StackOptions) -> Node:
    uid, gid = draw(st.sampled_from(options.owners))
    mtime = draw(st.sampled_from(MTIMES))
    if kind == "dir":
        return Node(
            "dir",
            mode=draw(st.sampled_from(DIR_MODES)),
            uid=uid,
            gid=gid,
            xattrs=draw(_xattr_set(options.xattr_names)) if options.xattrs else (),
            opaque=draw(st.booleans()),
            mtime_ns=mtime,
        )
    if kind == "file":
        return Node(
            "file",
            mode=draw(st.sampled_from(FILE_MODES)),
            uid=uid,
            gid=gid,
            content=draw(_content()),
            hole_before=draw(st.sampled_from((0, 0, 0, 65536, 1 << 20))),
            xattrs=draw(_xattr_set(options.xattr_names)) if options.xattrs else (),
            mtime_ns=mtime,
        )
    if kind == "symlink":
        return Node(
            "symlink",
            mode=0o777,
            uid=uid,
            gid=gid,
            target=draw(st.sampled_from(SYMLINK_TARGETS)),
            mtime_ns=mtime,
        )
    if kind in ("fifo", "socket"):
        return Node(
            "fifo" if kind == "fifo" else "socket",
            mode=draw(st.sampled_from((0o644, 0o600, 0o666))),
            uid=uid,
            gid=gid,
            mtime_ns=mtime,
        )
    if kind == "chardev":
        rdev = draw(st.sampled_from(((1, 3), (1, 7), (5, 0), (4, 64))))
        return Node("chardev", mode=0o620, uid=uid, gid=gid, rdev=rdev, mtime_ns=mtime)
    if kind == "blockdev":
        return Node("blockdev", mode=0o660, uid=uid, gid=gid, rdev=(7, 5), mtime_ns=mtime)
    if kind == "whiteout":
        return Node("whiteout", mode=0, mtime_ns=mtime)
    raise ValueError(kind)


@dataclass(frozen=True)
class StackOptions:
    min_layers: int = 2
    max_layers: int = 5
    max_nodes_per_layer: int = 7
    names: tuple[str, ...] = DEFAULT_NAMES
    max_depth: int = 3
    kinds: tuple[str, ...] = (
        "file", "file", "file", "dir", "dir", "dir", "symlink", "hardlink", "fifo",
        "socket", "chardev", "blockdev", "whiteout", "whiteout",
    )  # fmt: skip
    owners: tuple[tuple[int, int], ...] = OWNERS
    xattrs: bool = True
    xattr_names: tuple[str, ...] = XATTR_NAMES


def _add(
    draw: st.DrawFn,
    layer: Layer,
    below: dict[RelPath, Resolved],
    path: RelPath,
    kind: str,
    options: StackOptions,
) -> None:
    if path in layer:
        return
    for depth in range(1, len(path)):
        ancestor = layer.get(path[:depth])
        if ancestor is not None and ancestor.kind != "dir":
            return  # a non-dir of this layer is in the way
    if kind == "whiteout":
        if path not in below:
            return
        if any(
            (ancestor := layer.get(path[:depth])) is not None and ancestor.opaque
            for depth in range(1, len(path))
        ):
            return
    if kind == "hardlink":
        files = sorted(p for p, node in layer.items() if node.kind == "file")
        if not files:
            return
        linked = draw(st.sampled_from(files))
        node = Node("hardlink", target="/".join(linked))
    else:
        node = draw(_node(kind, options))
    for depth in range(1, len(path)):
        if path[:depth] not in layer:
            uid, gid = draw(st.sampled_from(options.owners))
            layer[path[:depth]] = Node(
                "dir",
                mode=draw(st.sampled_from(DIR_MODES)),
                uid=uid,
                gid=gid,
                mtime_ns=draw(st.sampled_from(MTIMES)),
            )
    layer[path] = node


@st.composite
def stacks(draw: st.DrawFn, options: StackOptions = StackOptions()) -> Stack:
    """Random layer stacks (base first) inside kernel overlayfs's domain (see module doc)."""
    count = draw(st.integers(options.min_layers, options.max_layers))
    stack: Stack = []
    for _ in range(count):
        below = merged_view(stack)
        layer: Layer = {}
        for _ in range(draw(st.integers(0, options.max_nodes_per_layer))):
            shadow: bool = draw(st.booleans()) if below else False
            if shadow:
                path = draw(st.sampled_from(sorted(below)))  # shadow or delete something below
            else:
                path = draw(paths(options.names, options.max_depth))
            kind = draw(st.sampled_from(options.kinds))
            _add(draw, layer, below, path, kind, options)
        stack.append(layer)
    return stack


def stack_paths(stack: Stack) -> set[RelPath]:
    return {path for layer in stack for path in layer}


def all_prefixes(paths_: Iterable[RelPath]) -> set[RelPath]:
    return {path[:depth] for path in paths_ for depth in range(1, len(path) + 1)}

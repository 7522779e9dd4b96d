"""Named operation scripts for the table-driven differential test.

Each `Scenario` has lower layers (base first, in a compact spec form), a list of operations, and
`expect`: errnos some of its operations must give (on the kernel oracle *and* the system under
test), so that each scenario asserts what its name claims even if both sides went wrong the same
way. Everything else is compared between the kernel and the system under test.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from tests.differential import ops as o
from tests.differential.layers import BASE_MTIME_NS, Layer, Node, Stack
from tests.differential.ops import RENAME_EXCHANGE, RENAME_NOREPLACE, Op
from tests.differential.rotation import Rotation

DIR = Node("dir", mode=0o755)
OPAQUE = Node("dir", mode=0o755, opaque=True)
WHITEOUT = Node("whiteout")
FIFO = Node("fifo")
LONG = "n" * 256  # one byte past NAME_MAX
PAST_NS = BASE_MTIME_NS + 77_000_000_001  # an explicit utime value (old, so compared exactly)


def u(op: Op) -> Op:
    """`op` run by an ordinary user, uid = gid = 1000."""
    return o.as_user(1000, op)


def sym(target: str) -> Node:
    return Node("symlink", mode=0o777, target=target)


def hard(existing: str) -> Node:
    return Node("hardlink", target=existing)


def file(content: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, **kwargs: object) -> Node:
    return Node("file", content=content, mode=mode, uid=uid, gid=gid, **kwargs)  # type: ignore[arg-type]


def layer(spec: dict[str, bytes | Node]) -> Layer:
    """{"a/b": b"content" | Node}: parents become plain dirs unless listed."""
    out: Layer = {}
    for text, value in spec.items():
        path = tuple(text.strip("/").split("/"))
        for depth in range(1, len(path)):
            out.setdefault(path[:depth], DIR)
        out[path] = file(value) if isinstance(value, bytes) else value
    return out


@dataclass(frozen=True)
class Scenario:
    name: str
    lowers: Stack
    ops: list[Op]
    expect: dict[int, int] = field(default_factory=dict)  # op index -> errno (0 = success)


ENOENT, ENOTEMPTY, EEXIST, EXDEV = errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.EXDEV

TWO_LAYER_TREE = [
    layer(
        {
            "d/base": b"base file\n",
            "d/shadowed": b"old\n",
            "d/sub/deep": b"deep\n",
            "f": file(b"0123456789", mode=0o640, uid=1000, gid=1000, xattrs=(("user.k", b"v"),)),
            "hl/one": b"linked content\n",
            "hl/two": hard("hl/one"),
            "gone": b"to be whited out\n",
        }
    ),
    layer(
        {
            "d": Node("dir", mode=0o750, uid=1000, gid=100, xattrs=(("user.dir", b"x"),)),
            "d/shadowed": b"new\n",
            "d/top": b"top\n",
            "gone": WHITEOUT,
            "opq": OPAQUE,
            "opq/inside": b"in opaque\n",
            "link": sym("d/base"),
            "abs": sym("/etc/passwd"),
            "fifo": FIFO,
        }
    ),
]

# fmt: off
SCENARIOS: list[Scenario] = [
    Scenario(
        "copy-up on write keeps mode, owner, xattrs",
        TWO_LAYER_TREE,
        [o.write("f", b"XY", 2), o.read("f"), o.lstat("f")],
    ),
    Scenario(
        "copy-up on chmod, chown, utime keeps content and mtime",
        TWO_LAYER_TREE,
        [
            o.chmod("d/base", 0o600),
            o.chown("d/sub/deep", 1000, 1000),
            o.utime("d/top", PAST_NS, PAST_NS),
            o.read("d/base"),
        ],
    ),
    Scenario(
        "copy-up on setxattr and removexattr",
        TWO_LAYER_TREE,
        [
            o.setxattr("f", "user.new", b"1"),
            o.removexattr("f", "user.k"),
            o.removexattr("d/base", "user.none"),
            o.setxattr("d", "user.more", b"2"),
        ],
        expect={0: 0, 1: 0, 2: errno.ENODATA},
    ),
    Scenario(
        "copy-up on truncate, O_TRUNC and append",
        TWO_LAYER_TREE,
        [
            o.truncate("d/base", 3),
            o.open_trunc("d/shadowed"),
            o.append("d/sub/deep", b"+more"),
            o.truncate_path("f", 100_000),
            o.read("f"),
        ],
    ),
    Scenario(
        "copy-up of a deep file copies parent dirs with their metadata",
        [
            layer(
                {
                    "p": Node("dir", mode=0o711, uid=1000, gid=1000, xattrs=(("user.p", b"1"),)),
                    "p/q": Node("dir", mode=0o2775, uid=0, gid=1000),
                    "p/q/r": b"deep\n",
                }
            ),
            layer({"other": b"x"}),
        ],
        [o.append("p/q/r", b"!"), o.create("p/q/new", b"n"), o.lstat("p/q/new")],
    ),
    Scenario(
        "unlink of a lower file leaves a whiteout; create over it",
        TWO_LAYER_TREE,
        [
            o.unlink("d/base"),
            o.listdir("d"),
            o.read("d/base"),
            o.create("d/base", b"again"),
            o.read("d/base"),
            o.unlink("d/shadowed"),
            o.listdir("d"),
        ],
        expect={0: 0, 2: ENOENT, 3: 0},
    ),
    Scenario(
        "rmdir of a merged non-empty dir fails with ENOTEMPTY",
        TWO_LAYER_TREE,
        [o.rmdir("d"), o.unlink("d/top"), o.unlink("d/shadowed"), o.rmdir("d")],
        expect={0: ENOTEMPTY, 3: ENOTEMPTY},
    ),
    Scenario(
        "rmdir of a merged dir empty in the view, then mkdir gives an opaque dir",
        TWO_LAYER_TREE,
        [
            o.unlink("d/base"),
            o.unlink("d/shadowed"),
            o.unlink("d/top"),
            o.unlink("d/sub/deep"),
            o.rmdir("d/sub"),
            o.rmdir("d"),
            o.mkdir("d"),
            o.listdir("d"),
            o.create("d/base", b"n"),
            o.listdir("d"),
        ],
        expect={4: 0, 5: 0, 6: 0},
    ),
    Scenario(
        "rmdir+mkdir of a lower dir hides old content (opaque)",
        [layer({"x/a": b"1", "x/b": b"2"}), layer({"y": b"3"})],
        [
            o.unlink("x/a"),
            o.unlink("x/b"),
            o.rmdir("x"),
            o.mkdir("x", 0o700),
            o.listdir("x"),
            o.read("x/a"),
        ],
        expect={2: 0, 5: ENOENT},
    ),
    Scenario(
        "rename of a lower directory (redirect, no EXDEV)",
        TWO_LAYER_TREE,
        [
            o.rename("d", "moved"),
            o.listdir("moved"),
            o.read("moved/sub/deep"),
            o.listdir("."),
            o.mkdir("d"),
            o.listdir("d"),
            o.write("moved/base", b"W"),
            o.unlink("moved/top"),
        ],
        expect={0: 0, 4: 0},
    ),
    Scenario(
        "rename of a lower dir twice and back, and into another dir",
        TWO_LAYER_TREE,
        [
            o.rename("d", "e"),
            o.rename("e", "hl/e"),
            o.listdir("hl/e"),
            o.rename("hl/e", "d"),
            o.listdir("d"),
            o.rename("d/sub", "sub2"),
            o.read("sub2/deep"),
        ],
        expect={0: 0, 1: 0, 3: 0, 5: 0},
    ),
    Scenario(
        "rename of a dir over an empty dir and over a non-empty one",
        [layer({"a/x": b"1", "empty": DIR, "full/y": b"2"}), layer({"b": b""})],
        [o.rename("a", "full"), o.rename("a", "empty"), o.listdir("empty"), o.read("empty/x")],
        expect={0: ENOTEMPTY, 1: 0},
    ),
    Scenario(
        "rename of files across layers and over existing targets",
        TWO_LAYER_TREE,
        [
            o.rename("d/base", "d/top"),
            o.rename("f", "d/shadowed"),
            o.rename("d/top", "new"),
            o.read("new"),
            o.read("d/shadowed"),
            o.listdir("d"),
        ],
        expect={0: 0, 1: 0, 2: 0},
    ),
    Scenario(
        "rename over a whiteout",
        TWO_LAYER_TREE,
        [
            o.unlink("d/base"),
            o.rename("d/top", "d/base"),
            o.read("d/base"),
            o.rename("d/shadowed", "gone"),
            o.read("gone"),
        ],
        expect={1: 0, 3: 0},
    ),
    Scenario(
        "RENAME_NOREPLACE against lower, upper and whited-out targets",
        TWO_LAYER_TREE,
        [
            o.rename("d/top", "d/base", RENAME_NOREPLACE),
            o.create("up", b"u"),
            o.rename("d/top", "up", RENAME_NOREPLACE),
            o.unlink("d/base"),
            o.rename("d/top", "d/base", RENAME_NOREPLACE),
            o.rename("f", "gone", RENAME_NOREPLACE),
        ],
        expect={0: EEXIST, 2: EEXIST, 4: 0, 5: 0},
    ),
    Scenario(
        "RENAME_EXCHANGE of lower/upper files and of a file with a dir",
        TWO_LAYER_TREE,
        [
            o.create("up", b"upper"),
            o.rename("up", "d/base", RENAME_EXCHANGE),
            o.read("up"),
            o.read("d/base"),
            o.rename("f", "opq", RENAME_EXCHANGE),
            o.listdir("f"),
            o.rename("nothing", "f", RENAME_EXCHANGE),
        ],
        expect={1: 0, 6: ENOENT},
    ),
    Scenario(
        "hard links survive copy-up",
        TWO_LAYER_TREE,
        [
            o.write("hl/one", b"CHANGED"),
            o.read("hl/two"),
            o.lstat("hl/two"),
            o.chmod("hl/two", 0o600),
            o.lstat("hl/one"),
        ],
    ),
    Scenario(
        "link to a lower file, then write through the new name",
        TWO_LAYER_TREE,
        [
            o.link("d/base", "newlink"),
            o.lstat("d/base"),
            o.append("newlink", b"more"),
            o.read("d/base"),
            o.unlink("d/base"),
            o.lstat("newlink"),
        ],
        expect={0: 0},
    ),
    Scenario(
        "rename both names of a lower hard-link pair",
        [layer({"x": b"data", "y": hard("x")})],
        [o.rename("y", "z"), o.rename("x", "y"), o.read("y"), o.lstat("z")],
        expect={0: 0, 1: 0},
    ),
    Scenario(
        "chmod through one name of a lower hard-link pair, then unlink the other name",
        [layer({"a": file(b"lower", mode=0o755), "c/b": hard("a")})],
        [o.lstat("a"), o.chmod("c/b", 0o600), o.unlink("a")],
        expect={1: 0, 2: 0},
    ),
    Scenario(
        "unlink one name of a lower hard-link pair",
        TWO_LAYER_TREE,
        [o.unlink("hl/two"), o.lstat("hl/one"), o.write("hl/one", b"z")],
    ),
    Scenario(
        "three lower names: write one, rename another over a file, link the third",
        [layer({"a": b"abc", "d/b": hard("a"), "c": hard("a"), "other": b"o"})],
        [
            o.write("a", b"W"),
            o.rename("d/b", "other"),
            o.link("c", "d/new"),
            o.lstat("c"),
            o.read("other"),
            o.unlink("a"),
            o.lstat("d/new"),
        ],
        expect={0: 0, 1: 0, 2: 0, 5: 0},
    ),
    Scenario(
        "rename a file over one lower name of a hard-link pair",
        [layer({"a": b"pair", "b": hard("a"), "x": b"x"})],
        [o.rename("x", "b"), o.lstat("a"), o.read("b"), o.chmod("a", 0o640)],
        expect={0: 0},
    ),
    Scenario(
        "unlink every name of a lower hard-link triple",
        [layer({"a": b"t", "b": hard("a"), "s/c": hard("a")})],
        [o.unlink("b"), o.lstat("a"), o.unlink("s/c"), o.lstat("a"), o.unlink("a"),
         o.listdir("")],
        expect={0: 0, 2: 0, 4: 0},
    ),
    Scenario(
        "truncate and xattrs through an index-only name",
        [layer({"a": b"0123456789", "b": hard("a")})],
        [o.truncate("a", 3), o.truncate("b", 5), o.setxattr("b", "user.k", b"v"), o.read("a"),
         o.lstat("a")],
        expect={0: 0, 1: 0, 2: 0},
    ),
    Scenario(
        "link over an existing name and to a dir fails",
        TWO_LAYER_TREE,
        [o.link("d/base", "f"), o.link("d", "dlink"), o.link("missing", "x")],
        expect={0: EEXIST, 1: errno.EPERM, 2: ENOENT},
    ),
    Scenario(
        "symlink, fifo and mkdir over whiteouts and in opaque dirs",
        TWO_LAYER_TREE,
        [
            o.symlink("gone", "../etc/passwd"),
            o.unlink("d/base"),
            o.mkfifo("d/base", 0o600),
            o.mkdir("opq/new"),
            o.symlink("opq/new/l", "/abs"),
            o.listdir("opq"),
        ],
        expect={0: 0, 2: 0},
    ),
    Scenario(
        "rmdir of a lower dir in an opaque dir and of a missing/non-dir",
        TWO_LAYER_TREE,
        [o.unlink("opq/inside"), o.rmdir("opq"), o.rmdir("f"), o.rmdir("nope"), o.unlink("d")],
        expect={1: 0, 2: errno.ENOTDIR, 3: ENOENT, 4: errno.EISDIR},
    ),
    Scenario(
        "rename a dir into itself is EINVAL; over a file is ENOTDIR",
        TWO_LAYER_TREE,
        [o.rename("d", "d/sub/inner"), o.rename("d", "f"), o.rename("f", "d")],
        expect={0: errno.EINVAL, 1: errno.ENOTDIR, 2: errno.EISDIR},
    ),
    Scenario(
        "chown clears setuid, chmod of a lower dir",
        [layer({"s": file(b"#!", mode=0o4755), "dd": DIR}), layer({})],
        [o.chown("s", 1000, 1000), o.lstat("s"), o.chmod("dd", 0o1777), o.lstat("dd")],
    ),
    Scenario(
        "ordinary user: permission checks on lower files and dirs",
        [layer({"root/f": file(b"root's", mode=0o644),
                "mine": Node("dir", mode=0o755, uid=1000, gid=1000),
                "mine/f": file(b"mine", mode=0o644, uid=1000, gid=1000),
                "ro": file(b"read only", mode=0o444, uid=1000, gid=1000),
                "tmp": Node("dir", mode=0o1777),
                "tmp/other": file(b"x", uid=65534, gid=65534),
                "secret": Node("dir", mode=0o700)}),
         layer({"secret": Node("dir", mode=0o700), "secret/f": b"s"})],
        [u(o.write("root/f", b"X")), u(o.create("root/new")), u(o.chmod("root/f", 0o777)),
         u(o.append("mine/f", b"+")), u(o.chmod("mine/f", 0o600)), u(o.create("mine/new", b"n")),
         u(o.write("ro", b"X")), u(o.unlink("tmp/other")), u(o.create("tmp/mine")),
         u(o.unlink("tmp/mine")), u(o.read("secret/f")), u(o.listdir("secret")),
         u(o.rename("mine/f", "tmp/f")), u(o.chown("mine/new", 0, 0)),
         u(o.setxattr("mine/new", "user.x", b"1")), u(o.setxattr("root/f", "user.x", b"1"))],
        expect={0: errno.EACCES, 1: errno.EACCES, 2: errno.EPERM, 3: 0, 4: 0, 5: 0,
                6: errno.EACCES, 7: errno.EPERM, 8: 0, 9: 0, 10: errno.EACCES},
    ),
    Scenario(
        "ordinary user: writing a set-uid file clears set-uid and set-gid",
        [layer({"s": file(b"#!/bin/sh\n", mode=0o6775, uid=1000, gid=1000),
                "t": file(b"#!/bin/sh\n", mode=0o6777, uid=0, gid=0)}), layer({})],
        [u(o.append("s", b"x")), o.lstat("s"), u(o.write("t", b"y")), o.lstat("t"),
         u(o.truncate("t", 1)), o.lstat("t")],
        expect={0: 0, 2: 0},
    ),
    Scenario(
        "trusted.overlay.* xattrs set through the mount (kernel >= 6.7 escapes them)",
        TWO_LAYER_TREE,
        [
            o.setxattr("f", "trusted.overlay.opaque", b"y"),
            o.setxattr("d", "trusted.overlay.opaque", b"y"),
            o.listdir("d"),
            o.setxattr("f", "trusted.plain", b"ok"),
        ],
        expect={3: 0},
    ),
    Scenario(
        "writes into a file renamed from a lower dir tree, then delete the tree",
        TWO_LAYER_TREE,
        [
            o.rename("d", "x"),
            o.append("x/sub/deep", b"+"),
            o.unlink("x/sub/deep"),
            o.rmdir("x/sub"),
            o.unlink("x/base"),
            o.unlink("x/top"),
            o.unlink("x/shadowed"),
            o.rmdir("x"),
            o.listdir("."),
        ],
        expect={7: 0},
    ),
    Scenario(
        "names longer than 255 bytes: ENAMETOOLONG in every operation",
        TWO_LAYER_TREE,
        [
            o.lstat(LONG),
            o.create(LONG),
            o.mkdir(LONG),
            o.mkfifo(LONG),
            o.symlink(LONG, "f"),
            o.link("f", LONG),
            o.rename("f", LONG),
            o.rename(LONG, "g"),
            o.unlink(LONG),
            o.rmdir(LONG),
            o.chmod(LONG, 0o600),
            o.truncate_path(LONG, 0),
            o.setxattr(LONG, "user.x", b"1"),
            o.lstat("d/" + LONG),
            o.create("d/" + "m" * 255, b"255 bytes is fine"),
            o.rename("d/" + "m" * 255, "m" * 255),
        ],
        expect={**dict.fromkeys(range(14), errno.ENAMETOOLONG), 14: 0, 15: 0},
    ),
]
# fmt: on


# --------------------------------------------------------------------------- rotations
# Uppers rotated into the lowers, three generations (see rotation.py): renames (files and
# directories, within and across directories), chmods, xattr changes, hard links and
# deletes in each, so every kind of upper entry becomes a lower entry of the next one.
ROTATION_BASE = [
    layer(
        {
            "d/base": b"base file\n" * 100,
            "d/sub/deep": b"deep\n",
            "f": file(
                b"0123456789" * 50, mode=0o640, uid=1000, gid=1000, xattrs=(("user.k", b"v"),)
            ),
            "hl/one": b"linked content\n" * 10,
            "hl/two": hard("hl/one"),
            "gone": b"to be deleted\n",
            "tree/a/b": b"ab" * 300,
            "tree/c": b"c\n",
            "keep": b"k" * 4000,
            "chmods": b"chmod me\n" * 30,
        }
    ),
    layer(
        {
            "d/top": b"top\n",
            "opq": OPAQUE,
            "opq/inside": b"in opaque\n",
            "link": sym("d/base"),
        }
    ),
]

# fmt: off
ROTATIONS: list[Rotation] = [
    Rotation(
        "renames, chmods, xattrs, hard links and deletes over three generations",
        ROTATION_BASE,
        [
            [
                o.rename("d/base", "d/renamed"),
                o.rename("f", "d/f2"),
                o.chmod("keep", 0o600),
                o.setxattr("d/top", "user.a", b"1"),
                o.rename("tree", "tree2"),
                o.link("hl/one", "hl/three"),
                o.unlink("gone"),
                o.unlink("d/sub/deep"),
                o.rmdir("d/sub"),
                o.read("d/renamed"),
            ],
            [
                o.read("d/renamed"), o.read("d/f2"), o.read("keep"), o.read("tree2/a/b"),
                o.rename("d/renamed", "renamed_again"),
                o.chmod("d/f2", 0o600),
                o.rename("tree2/a", "moved_a"),
                o.append("keep", b"!"),
                o.removexattr("d/top", "user.a"),
                o.setxattr("d/top", "user.b", b"2"),
                o.link("d/f2", "linked_f2"),
                o.unlink("hl/two"),
                o.rename("hl", "hl2"),
                o.mkdir("d/sub"),
                o.chmod("chmods", 0o600),
            ],
            [
                o.read("renamed_again"), o.read("d/f2"), o.read("linked_f2"),
                o.read("moved_a/b"), o.read("keep"), o.read("hl2/one"), o.read("hl2/three"),
                o.rename("renamed_again", "d/back"),
                o.truncate("d/f2", 100),
                o.chmod("moved_a", 0o700),
                o.unlink("linked_f2"),
                o.rename("tree2", "d/tree3"),
                o.write("d/back", b"XYZ", 3),
                o.chmod("chmods", 0o640),
                o.listdir("."), o.listdir("d"), o.listdir("d/tree3"),
            ],
        ],
        expect={(0, 0): 0, (0, 5): 0, (1, 4): 0, (1, 6): 0, (1, 10): 0, (2, 7): 0},
    ),
    Rotation(
        "one file renamed, chmodded and touched in every generation",
        ROTATION_BASE,
        [
            [o.rename("keep", "k1"), o.utime("k1", PAST_NS, PAST_NS)],
            [o.chmod("k1", 0o604), o.rename("k1", "d/k2")],
            [o.setxattr("d/k2", "user.n", b"3"), o.rename("d/k2", "k3"), o.read("k3")],
        ],
    ),
]
# fmt: on

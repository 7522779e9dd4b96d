"""Rules of the code base that hold by test, not by discipline.

1. ``safeio`` is the only module making raw file syscalls on layer contents: every other
   module reaches layers through it (names relative to a directory fd, never following a
   symlink). A raw call is one that names a file by path (``os.open``, ``os.stat``,
   ``os.unlink``, ``os.setxattr``, ``open()``, ...); calls on an fd safeio opened
   (``os.fstat``, ``os.ftruncate``, ``os.fchmod``) are not. Modules that never touch layer
   contents say what they touch instead (``ELSEWHERE``); that list is checked to be needed.
2. A ``Node``'s state changes only through its named methods in ``unionfs.inodes``.
(The layering rule is tests/unit/test_core_layering.py.)
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.unit.test_core_layering import PACKAGE, module_files

RAW_OS_CALLS = frozenset(
    {
        "open", "stat", "lstat", "listdir", "scandir", "walk", "fwalk", "unlink", "remove",
        "rename", "replace", "rmdir", "mkdir", "makedirs", "removedirs", "link", "symlink",
        "readlink", "mknod", "mkfifo", "chmod", "lchmod", "chown", "lchown", "utime",
        "truncate", "access", "setxattr", "getxattr", "listxattr", "removexattr", "statvfs",
    }
)  # fmt: skip
RAW_PATH_CALLS = frozenset({"exists", "lexists", "isdir", "isfile", "islink", "getsize"})

# Module -> (the raw calls it may make, what they touch: never layer contents).
ELSEWHERE: dict[str, tuple[frozenset[str], str]] = {
    "client": (
        frozenset(
            {
                "open",
                "os.open",
                "os.stat",
                "os.lstat",
                "os.listdir",
                "os.scandir",
                "os.readlink",
                "os.mkdir",
            }
        ),
        "the mount server's runtime directory and /proc",
    ),
    "server": (
        frozenset({"os.open", "os.stat", "os.unlink", "os.truncate", "os.path.exists"}),
        "its socket, lock and log files",
    ),
    "fuseconn": (frozenset({"open"}), "/sys/fs/fuse/connections"),
    "proctitle": (frozenset({"open"}), "/proc/self"),
    "mountinfo": (frozenset({"open"}), "/proc/self/mountinfo"),
    "idmap": (frozenset({"open"}), "/proc/sys/kernel/overflow{uid,gid}"),
    "workdir": (
        frozenset({"open", "os.path.lexists"}),
        "/proc (boot id, process start times) and the volatile mount's marker directory",
    ),
    "mount": (
        frozenset(
            {
                "open",
                "os.open",
                "os.stat",
                "os.access",
                "os.listdir",
                "os.makedirs",
                "os.path.exists",
            }
        ),
        "the layer/upper/workdir/mountpoint paths given on the command line (never what is "
        "inside them), /dev/fuse, the log file, /proc and /sys",
    ),
    "cli": (frozenset({"os.path.isdir"}), "the paths given on the command line"),
    "oci.export": (
        frozenset({"open", "os.rename"}),
        "the output tarball named on the command line (written aside, renamed into place)",
    ),
    "oci.store": (
        frozenset({"open"}),
        "the image file named on the command line (its digest; a bare layer tarball)",
    ),
    "run": (
        frozenset({"os.open", "os.lstat"}),
        "the container's command, resolved inside the merged tree (openat2 RESOLVE_IN_ROOT)",
    ),
    "commands": (
        frozenset({"os.getxattr", "os.walk", "os.lstat", "os.path.isdir"}),
        "paths through a live mount (introspection xattrs, unionfs status)",
    ),
    "compiled": (
        frozenset({"os.listdir", "open", "os.path.isdir", "os.path.exists"}),
        "the package's own source files and the venv's compiled build (never a layer)",
    ),
}

# Merged from the live and store branches after this rule was written; their raw calls are
# still to move into safeio (or to be listed in ELSEWHERE with what they touch): watch opens
# layer directories for inotify, imagestore reads a Docker/containers-storage store's metadata
# and links. The test fails once one of these makes no raw call any more (then delete it).
NOT_YET = {"watch", "imagestore"}


def raw_calls(path: Path) -> dict[str, list[int]]:
    """Raw file syscalls in ``path``: name (``os.unlink``, ``open``) -> line numbers."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "os.path"):
            for alias in node.names:
                if alias.name in RAW_OS_CALLS | RAW_PATH_CALLS:
                    found.setdefault(f"from {node.module} import {alias.name}", []).append(
                        node.lineno
                    )
            continue
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Name) and function.id == "open":
            name = "open"
        elif isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            if function.value.id == "os" and function.attr in RAW_OS_CALLS:
                name = f"os.{function.attr}"
        elif (
            isinstance(function, ast.Attribute)
            and isinstance(function.value, ast.Attribute)
            and isinstance(function.value.value, ast.Name)
            and (function.value.value.id, function.value.attr) == ("os", "path")
            and function.attr in RAW_PATH_CALLS
        ):
            name = f"os.path.{function.attr}"
        if name is not None:
            found.setdefault(name, []).append(node.lineno)
    return found


def test_only_safeio_makes_raw_file_syscalls() -> None:
    problems = []
    for module, path in module_files().items():
        if module == "safeio" or module in NOT_YET:
            continue
        allowed = ELSEWHERE.get(module, (frozenset[str](), ""))[0]
        for call, lines in raw_calls(path).items():
            if call not in allowed:
                problems.append(f"{module}: {call} at line(s) {lines} (use unionfs.safeio)")
    assert not problems, "\n".join(problems)


def test_exceptions_are_still_needed() -> None:
    table = module_files()
    for module, (allowed, _what) in ELSEWHERE.items():
        used = set(raw_calls(table[module]))
        assert allowed <= used, (
            f"{module} no longer makes {sorted(allowed - used)}: shrink ELSEWHERE"
        )
    for module in NOT_YET:
        assert raw_calls(table[module]), f"{module} makes no raw call now: remove it from NOT_YET"


def test_the_rule_catches_a_raw_call(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom os import unlink\n"
        "def f(fd):\n    os.unlink(b'x', dir_fd=fd)\n    os.fstat(fd)\n"
        "    os.path.lexists('y')\n    return open('z')\n"
    )
    assert raw_calls(sample) == {
        "from os import unlink": [2],
        "os.unlink": [4],
        "os.path.lexists": [6],
        "open": [7],
    }


# ---------------------------------------------------------------------------------- Node state
# A Node (unionfs.inodes) changes only through its named methods, all in inodes.py: no other
# module assigns a Node field, changes one in place (+=, [...] =) or mutates a field's
# container (.add, .pop, ...). Found by field name on any object but ``self``; a field name
# another class shares is listed with that class.

MUTATORS = frozenset(
    {"add", "discard", "remove", "clear", "pop", "popitem", "update", "append", "extend",
     "insert", "setdefault"}
)  # fmt: skip
OTHER_CLASSES_FIELDS = {
    ("handles", "generation"): "FileHandle.generation (the node generation a handle read)",
    ("attrs", "generation"): "pyfuse3.EntryAttributes.generation",
    ("layer", "redirect"): "Listing.redirect (a directory listing's)",
    ("options", "metacopy"): "MountConfig.metacopy",
    ("stack", "metacopy"): "the state of a metacopy chain search",
}


def node_fields() -> set[str]:
    tree = ast.parse((PACKAGE / "inodes.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Node":
            return {
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise AssertionError("unionfs.inodes has no class Node")


def field_writes(path: Path, fields: set[str]) -> list[tuple[str, int]]:
    """(field, line) of every write of a field in ``fields`` on an object other than self."""

    def field_of(target: ast.expr) -> str | None:
        while isinstance(target, ast.Subscript):
            target = target.value
        if (
            isinstance(target, ast.Attribute)
            and target.attr in fields
            and not (isinstance(target.value, ast.Name) and target.value.id == "self")
        ):
            return target.attr
        return None

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = [node.target] if not isinstance(node, ast.Delete) else node.targets
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in MUTATORS
        ):
            targets = [node.func.value]
        if not targets:
            continue
        assert isinstance(node, ast.stmt | ast.expr)
        for target in targets:
            for part in ast.walk(target) if isinstance(target, ast.Tuple) else [target]:
                name = field_of(part) if isinstance(part, ast.expr) else None
                if name is not None:
                    found.append((name, node.lineno))
    return found


def test_node_state_changes_only_in_inodes() -> None:
    fields = node_fields()
    assert {"lookups", "links", "in_upper", "lower", "metacopy", "open_fds"} <= fields
    problems = []
    excused = set()
    for module, path in module_files().items():
        if module == "inodes":
            continue
        for name, line in field_writes(path, fields):
            if (module, name) in OTHER_CLASSES_FIELDS:
                excused.add((module, name))
            else:
                problems.append(f"{module}:{line}: writes Node.{name} (add a method to Node)")
    assert not problems, "\n".join(problems)
    assert excused == set(OTHER_CLASSES_FIELDS), "OTHER_CLASSES_FIELDS lists unused entries"


def test_the_node_rule_catches_writes(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(node, other):\n    node.lookups += 1\n    node.links[(other, b'x')] = True\n"
        "    node.open_fds.add(3)\n    self_like = node.in_upper\n    node.looked_up()\n"
    )
    assert field_writes(sample, {"lookups", "links", "open_fds", "in_upper"}) == [
        ("lookups", 2),
        ("links", 3),
        ("open_fds", 4),
    ]


def test_the_client_knows_every_command_the_cli_has() -> None:
    """``unionfs.client`` keeps its own list of the commands it never hands to the mount server
    (it must not import the heavy ``cli``): a command added to the CLI but not there would be
    sent to the server as if it were a mount."""
    from unionfs import cli, client

    assert set(client.SUBCOMMANDS) == set(cli.SUBCOMMANDS) - {"mount"}

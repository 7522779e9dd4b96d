"""The module layering of design.md: imports point down, and only the FUSE adapter, the mount
lifecycle and the attribute helper know pyfuse3 or trio (the union logic stays plain Python)."""

from __future__ import annotations

import ast
from pathlib import Path

import unionfs

PACKAGE = Path(unionfs.__file__).parent
FUSE_AWARE = {"operations", "mount", "attrs", "fuseconn", "fusefeatures"}
# Lower modules never import higher ones (a module may import any module listed after it).
ORDER = [
    "cli",
    "commands",
    "mount",
    "operations",
    "fuseconn",
    "fusefeatures",
    "introspection",
    "watch",
    "refresh",
    "mutations",
    "copyup",
    "tree",
    "index",
    "origin",
    "inodes",
    "stack",
    "layer",
    "workdir",
    "quota",
    "safeio",
    "whiteout",
]


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "unionfs":
                found.update(f"unionfs.{alias.name}" for alias in node.names)
            else:
                found.add(
                    node.module if node.module.startswith("unionfs.") else node.module.split(".")[0]
                )
    return found


def test_only_the_adapter_knows_fuse_and_trio() -> None:
    for path in PACKAGE.glob("*.py"):
        used = imports(path.stem) & {"pyfuse3", "trio"}
        assert not used or path.stem in FUSE_AWARE, f"{path.stem} imports {used}"


def test_imports_point_down() -> None:
    for position, module in enumerate(ORDER):
        higher = {f"unionfs.{name}" for name in ORDER[:position]}
        upward = imports(module) & higher
        assert not upward, f"{module} imports higher modules {upward}"

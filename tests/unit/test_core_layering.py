"""The module layering of design.md: imports point down, and only the FUSE adapter, the mount
lifecycle and the attribute helper know pyfuse3 or trio (the union logic stays plain Python).

Every module of the package has its place in ``ORDER``: a new module fails
``test_every_module_declares_its_layer`` until it is listed (where its imports allow)."""

from __future__ import annotations

import ast
from pathlib import Path

import unionfs

PACKAGE = Path(unionfs.__file__).parent
FUSE_AWARE = {"operations", "mount", "attrs", "fuseconn", "fusefeatures"}
# Highest first: a module may import only modules listed after it. Lazy imports (inside a
# function) count too: they are still dependencies.
ORDER = [
    # entry points and front ends
    "__main__", "server", "client", "cli", "commands",
    # tools beside the mount: containers, the OCI annex, the offline checker
    "run", "oci", "check", "imagestore",
    # the mount lifecycle and the FUSE adapter
    "mount", "detached", "options", "operations", "attrs", "fuseconn", "fusefeatures",
    "introspection", "handles", "watch", "refresh", "assembly",
    # the union: writes, copy-up, the merged tree and its parts
    "mutations", "copyup", "tree", "index", "origin", "inodes", "stack", "layer", "workdir",
    "idmap", "config", "quota",
    # leaves: process title, the mount table, exit codes, raw syscalls, the on-disk format
    "proctitle", "mountinfo", "exitcodes", "permissions", "safeio", "whiteout", "compiled",
]  # fmt: skip
# The OCI annex's own modules, highest first (the package re-exports store and export).
OCI_ORDER = ["oci", "oci.store", "oci.export", "oci.extraction", "oci.sources",
             "oci.compression", "oci.common"]  # fmt: skip


def module_files() -> dict[str, Path]:
    """Dotted module name below ``unionfs`` (``oci.store``; a package is its name) -> file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "__init__"] = path
    return found


def imports(path: Path) -> set[str]:
    """What ``path`` imports: top-level names, and ``unionfs.X[.Y]`` for the package's own."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                found.add(name if name.startswith("unionfs.") else name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "unionfs":
                found.update(f"unionfs.{alias.name}" for alias in node.names)
            elif node.module.startswith("unionfs."):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module.split(".")[0])
    return found


def own_modules(path: Path) -> set[str]:
    """The package's modules ``path`` imports (``oci.store`` -> also counts as ``oci``)."""
    known = set(module_files())
    names = {name.removeprefix("unionfs.") for name in imports(path) if name.startswith("unionfs.")}
    return {name for name in names if name in known}


def test_every_module_declares_its_layer() -> None:
    modules = set(module_files()) - {"__init__"}
    top_level = {name for name in modules if "." not in name}
    assert top_level == set(ORDER), (
        f"not in ORDER: {sorted(top_level - set(ORDER))}; "
        f"in ORDER but gone: {sorted(set(ORDER) - top_level)}"
    )
    annex = {name for name in modules if name == "oci" or name.startswith("oci.")}
    assert annex == set(OCI_ORDER)
    assert len(ORDER) == len(set(ORDER))


def test_only_the_adapter_knows_fuse_and_trio() -> None:
    for module, path in module_files().items():
        used = imports(path) & {"pyfuse3", "trio"}
        assert not used or module in FUSE_AWARE, f"{module} imports {used}"


def test_imports_point_down() -> None:
    files = module_files()
    problems = []
    for module, path in files.items():
        top = module.split(".")[0]
        if top not in ORDER:
            continue  # __init__ (the version only); test_every_module_declares_its_layer
        for imported in own_modules(path):
            target = imported.split(".")[0]
            if target == top:
                if top == "oci" and OCI_ORDER.index(imported) <= OCI_ORDER.index(module):
                    problems.append(f"{module} imports {imported} (same level or higher)")
                continue
            if ORDER.index(target) <= ORDER.index(top):
                problems.append(f"{module} imports higher module {imported}")
    assert not problems, "\n".join(problems)


def test_the_layering_check_sees_an_upward_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    from unionfs.oci import store\n    from unionfs import mount\n"
    )
    assert own_modules(sample) == {"oci", "oci.store", "mount"}

"""Which build of unionfs runs: the mypyc-compiled hot modules, or pure Python.

``scripts/setup`` compiles the hot modules (:data:`MODULES`) with mypyc into
``<venv>/unionfs-mypyc/<key>/``, where the key is a hash of every source file of the package and
of the interpreter's version. At import, :func:`activate` computes the key of the sources that are
here now and puts the matching build first on the package's path; when there is none (a source was
edited since, another interpreter, stock venv, no C compiler) the sources run as they are. So
compiled code never runs against sources other than the ones it was compiled from.
``UNIONFS_COMPILE=0`` in the environment forces pure Python.

This module is never compiled itself, and imports nothing of the package.
"""

from __future__ import annotations

import os
import sys
from _blake2 import blake2b  # (hashlib's import costs every unionfs command milliseconds)

# The hot modules, compiled unchanged (they are mypy --strict clean). The request loop's modules
# (operations, mount) stay pure: trio inspects its tasks' coroutines.
MODULES = (
    "attrs",
    "config",
    "copyup",
    "handles",
    "idmap",
    "index",
    "inodes",
    "layer",
    "mutations",
    "origin",
    "safeio",
    "stack",
    "tree",
    "whiteout",
    "workdir",
)

BUILDS_DIR = "unionfs-mypyc"
COMPLETE = "complete"  # written last by the build: a half-written build is never used
ENV = "UNIONFS_COMPILE"

# "compiled" or "pure", set by activate() (unionfs/__init__.py calls it once).
build = "pure"
# Why the pure build runs (empty when compiled).
reason = "not activated"
# The compiled build's directory ("" when pure).
directory = ""


def source_key(package_dir: str) -> str:
    """Hash of every .py file of the package (names and contents) and of the interpreter."""
    digest = blake2b(digest_size=16)
    digest.update(sys.version.encode())
    digest.update(sys.implementation.cache_tag.encode() if sys.implementation.cache_tag else b"")
    for name in sorted(os.listdir(package_dir)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(package_dir, name), "rb") as source:
            content = source.read()
        digest.update(name.encode() + b"\0" + str(len(content)).encode() + b"\0" + content)
    return digest.hexdigest()


def builds_root(prefix: str | None = None) -> str:
    return os.path.join(prefix if prefix is not None else sys.prefix, BUILDS_DIR)


def activate(package_path: list[str]) -> str:
    """Put the build matching these sources first on ``package_path``; say which build runs."""
    global build, reason, directory
    build, reason, directory = "pure", "", ""
    if os.environ.get(ENV, "1") == "0":
        reason = f"{ENV}=0"
        return build
    package_dir = package_path[-1]
    root = builds_root()
    if not os.path.isdir(root):
        reason = f"no compiled build in {root}"
        return build
    try:
        key = source_key(package_dir)
    except OSError as error:
        reason = f"cannot hash the sources: {error}"
        return build
    found = os.path.join(root, key)
    if not os.path.exists(os.path.join(found, COMPLETE)):
        reason = f"no compiled build of these sources ({key}) in {root}"
        return build
    # The compiled modules' shared runtime library is a top-level module of the build directory.
    if found not in sys.path:
        sys.path.append(found)
    package_path.insert(0, os.path.join(found, "unionfs"))
    build, directory = "compiled", found
    return build


def running() -> dict[str, str]:
    """Which build each hot module runs (after import): 'compiled' or 'pure'."""
    import importlib

    result = {}
    for name in MODULES:
        module = importlib.import_module(f"unionfs.{name}")
        path = getattr(module, "__file__", "") or ""
        result[name] = "pure" if path.endswith(".py") else "compiled"
    return result

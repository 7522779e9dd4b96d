"""Shared test helpers: mounts (``tests.support.mounts``) and small layer builders (here).

A layer is described by a mapping from a relative path (``str``, ``/``-separated) to what is there:

- ``str`` or ``bytes``: a regular file with that content
- :data:`DIR`: a directory (parents are made as needed anyway)
- :class:`Symlink`: a symlink with that target (never followed when building)
- :data:`WHITEOUT`: an overlay whiteout, a 0/0 character device (needs root or Linux >= 5.8)
- :data:`OPAQUE`: a directory marked opaque with ``trusted.overlay.opaque=y`` (root) or
  ``user.overlay.opaque=y`` (otherwise)

OCI-format whiteouts are plain files: ``".wh.NAME": ""`` and ``"dir/.wh..wh..opq": ""``.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final


@dataclass(frozen=True)
class Symlink:
    """A symlink entry: ``Symlink("../target")``."""

    target: str


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


DIR: Final = _Marker("DIR")
WHITEOUT: Final = _Marker("WHITEOUT")
OPAQUE: Final = _Marker("OPAQUE")

Entry = str | bytes | Symlink | _Marker
LayerSpec = Mapping[str, Entry]
TmpLayers = Callable[..., list[Path]]
"""The type of the ``tmp_layers`` fixture: ``tmp_layers(spec_base, spec_next, ...)``."""


def opaque_xattr_name() -> str:
    """The overlay opaque xattr this process can set: trusted.* as root, user.* otherwise."""
    return "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"


def write_layer(root: Path, spec: LayerSpec) -> Path:
    """Create ``root`` (if needed) and the entries of ``spec`` in it, in sorted path order."""
    root.mkdir(parents=True, exist_ok=True)
    for relative in sorted(spec):
        if relative.startswith("/") or ".." in relative.split("/"):
            raise ValueError(f"layer paths are relative and stay inside: {relative!r}")
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = spec[relative]
        if isinstance(entry, str):
            path.write_text(entry)
        elif isinstance(entry, bytes):
            path.write_bytes(entry)
        elif isinstance(entry, Symlink):
            os.symlink(entry.target, path)
        elif entry is DIR:
            path.mkdir(exist_ok=True)
        elif entry is WHITEOUT:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        elif entry is OPAQUE:
            path.mkdir(exist_ok=True)
            os.setxattr(path, opaque_xattr_name(), b"y")
        else:
            raise TypeError(f"unknown layer entry for {relative!r}: {entry!r}")
    return root


def run_as(
    user: pwd.struct_passwd, argv: Sequence[str | os.PathLike[str]], *, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (root only; through setpriv, no PAM), from ``/``, no stdin.

    Output is captured through files, so a daemon the command forks cannot make this hang.
    """
    from tests.support.mounts import run_command

    setpriv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    env = dict(os.environ, HOME=user.pw_dir or "/", USER=user.pw_name, LOGNAME=user.pw_name)
    return run_command(
        [*setpriv, "--", *(os.fspath(arg) for arg in argv)], timeout=timeout, cwd="/", env=env
    )

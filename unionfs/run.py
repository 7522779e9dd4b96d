"""``unionfs run``: mount a layer stack, run one command inside it as a rootless container, unmount.

Public interface (wired into the CLI by ``unionfs.cli``):

``run_in_union(layers: list[Path], command: list[str], *, upper: Path | None, env=None,
               workdir=None, cwd="/", mount_log=None) -> int``
    ``layers`` base first. Mounts them with ``python -m unionfs mount`` (a subprocess, so the
    daemon is the ordinary one; it is live when the command returns), with ``upper`` as the
    writable layer, or a temporary upper deleted afterwards when ``upper`` is None (so the
    container can always write); ``mount_log`` is the daemon's ``--log`` file; ``workdir`` is
    passed as ``--workdir`` (default: the lead's default beside ``upper``). Then runs ``command``
    with the merged tree as ``/``:

    - with bubblewrap when ``bwrap`` is on PATH: ``bwrap --bind MERGED / --proc /proc --dev /dev
      --unshare-all --die-with-parent --uid 0 --gid 0 --hostname unionfs --chdir CWD COMMAND``
      (new user, mount, pid, ipc, uts, net and cgroup namespaces; root inside, the caller outside);
    - else with ``unshare -Urm --pid --fork`` + ``chroot`` (``/proc`` and ``/dev`` mounted inside
      when the tree has those directories).

    The environment inside is ``env`` if given (e.g. the image config's ``Env``), else a minimal
    one (``PATH``, ``HOME=/root``, ``TERM``). The mount is always unmounted in ``finally``
    (``fusermount3 -u``, then ``-uz``), the temporary upper removed. Returns COMMAND's exit code
    (128+N when killed by signal N, 127 when it could not be started inside).
    Raises :class:`RunError` (with ``exit_code``: the mount command's own code, 3..6, or 1) when
    the stack cannot be mounted or no container tool is available; its message is one line.
    Before starting the container the command is looked up in the merged tree as a shell would
    (``PATH`` of the environment inside; symlinks resolved inside the tree): not found is
    RunError 127, found but not executable (or a directory) is RunError 126.
    ``warn`` (one line each) is told when an ordinary user runs on layers whose files belong to
    other users: inside, those show as ``nobody`` and cannot be changed.

``image_command(config: dict, command: list[str]) -> list[str]`` and
``image_env(config: dict) -> dict[str, str]``: what an OCI image config (``oci.image_config``)
says to run and with which environment, for ``unionfs run --image DEST [-- COMMAND]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unionfs import mountinfo
from unionfs.exitcodes import EXIT_FAILURE, EXIT_USAGE, RUN_NOT_EXECUTABLE, RUN_NOT_FOUND

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOUNT_TIMEOUT = 60.0
_libc = ctypes.CDLL(None, use_errno=True)


class RunError(Exception):
    """The stack could not be mounted or no container tool works. One-line message."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


def image_command(config: Mapping[str, Any], command: Sequence[str]) -> list[str]:
    """``Entrypoint`` + (``command`` or ``Cmd``), as docker/podman combine them."""
    entrypoint = list(config.get("Entrypoint") or [])
    args = list(command) if command else list(config.get("Cmd") or [])
    return [*entrypoint, *args]


def image_env(config: Mapping[str, Any]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    for item in config.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep:
            env[key] = value
    return env


def _default_env() -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    return env


def _unionfs_argv() -> list[str]:
    return [sys.executable, "-m", "unionfs"]


def _mount(
    layers: Sequence[Path], mountpoint: Path, upper: Path, workdir: Path | None, log_file: Path
) -> None:
    argv = [*_unionfs_argv(), "mount", "--log", str(log_file), "--upper", str(upper)]
    if workdir is not None:
        argv += ["--workdir", str(workdir)]
    argv += [*(str(layer) for layer in layers), str(mountpoint)]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RunError(f"unionfs mount did not come up within {MOUNT_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise RunError(f"mount failed: {message}", proc.returncode or EXIT_FAILURE)


def _is_mounted(mountpoint: Path) -> bool:
    return os.path.realpath(mountpoint) in mountinfo.mounted_paths()


def _unmount(mountpoint: Path) -> None:
    for attempt in range(20):
        if not _is_mounted(mountpoint):
            return
        argv = ["fusermount3", "-u", str(mountpoint)] if attempt < 10 else [
            "fusermount3", "-uz", str(mountpoint)
        ]  # fmt: skip
        subprocess.run(argv, capture_output=True, check=False)
        if _is_mounted(mountpoint):
            time.sleep(0.1)
    if _is_mounted(mountpoint):
        log.warning("could not unmount %s", mountpoint)


def foreign_owner(layers: Sequence[Path]) -> int | None:
    """For an ordinary user: the owner of the layers' top directories when it is someone else
    (their files would show as nobody in a user namespace that maps only the caller)."""
    me = os.geteuid()
    if me == 0:
        return None
    for layer in layers:
        for name in ("", "bin", "etc", "usr"):
            try:
                owner = os.lstat(layer / name).st_uid
            except OSError:
                continue
            if owner != me:
                return owner
    return None


SYS_OPENAT2 = 437
RESOLVE_IN_ROOT = 0x10
O_PATH = getattr(os, "O_PATH", 0o10000000)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _stat_in_root(root_fd: int, path: str) -> os.stat_result | None:
    """lstat-after-symlinks of ``path`` with ``root_fd`` as ``/`` (openat2 RESOLVE_IN_ROOT): the
    file a container would exec. None when it does not exist."""
    how = _OpenHow(O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT)
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(root_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        code = ctypes.get_errno()
        if code in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise OSError(code, os.strerror(code), path)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def check_command(merged: Path, command: Sequence[str], path: str, cwd: str = "/") -> None:
    """Raise RunError 127 (not found) or 126 (not executable) as a shell would exit, looking
    the command up inside the merged tree; pass where the kernel cannot resolve in a root."""
    name = command[0]
    if "/" in name:
        candidates = [name if name.startswith("/") else os.path.join(cwd, name)]
    else:
        candidates = [os.path.join(directory or ".", name) for directory in path.split(":")]
    root_fd = os.open(merged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    found_unusable = False
    try:
        for candidate in candidates:
            try:
                st = _stat_in_root(root_fd, candidate)
            except OSError as error:
                if error.errno in (errno.ENOSYS, errno.EINVAL):
                    return  # no openat2 here: let the container report it
                found_unusable = found_unusable or error.errno == errno.EACCES
                continue
            if st is None:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return
            found_unusable = True
    finally:
        os.close(root_fd)
    if found_unusable:
        raise RunError(f"{name}: cannot execute (not an executable file)", RUN_NOT_EXECUTABLE)
    raise RunError(f"{name}: command not found in the container", RUN_NOT_FOUND)


def container_argv(merged: Path, command: Sequence[str], *, cwd: str = "/") -> list[str]:
    """The argv running ``command`` with ``merged`` as its root (bwrap, else unshare+chroot)."""
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        return [
            bwrap, "--bind", str(merged), "/", "--proc", "/proc", "--dev", "/dev",
            "--unshare-all", "--die-with-parent", "--uid", "0", "--gid", "0",
            "--hostname", "unionfs", "--chdir", cwd, "--", *command,
        ]  # fmt: skip
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RunError("neither bwrap (bubblewrap) nor unshare is installed")
    script = (
        'root="$1"; cwd="$2"; shift 2; '
        '[ -d "$root/proc" ] && mount -t proc proc "$root/proc" 2>/dev/null; '
        '[ -d "$root/dev" ] && mount --rbind /dev "$root/dev" 2>/dev/null; '
        'exec chroot "$root" /bin/sh -c \'cd "$0" && exec "$@"\' "$cwd" "$@"'
    )
    return [
        unshare, "-Urm", "--pid", "--fork", "--kill-child", "--", "/bin/sh", "-c", script,
        "sh", str(merged), cwd, *command,
    ]  # fmt: skip


def run_in_union(
    layers: list[Path],
    command: list[str],
    *,
    upper: Path | None,
    workdir: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str = "/",
    mount_log: Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> int:
    """Mount ``layers`` (base first), run ``command`` inside as a container, unmount, return rc."""
    if not command:
        raise RunError("no command to run", EXIT_USAGE)
    if workdir is not None and upper is None:
        raise RunError("--workdir needs --upper (the temporary upper has its own)", EXIT_USAGE)
    if warn is not None:
        foreign = foreign_owner(layers)
        if foreign is not None:
            warn(
                f"the layers' files belong to uid {foreign}, not to you (uid {os.geteuid()}): "
                "inside they show as nobody and cannot be changed; import the image as "
                "yourself, or run as root"
            )
    scratch = Path(tempfile.mkdtemp(prefix="unionfs-run-"))
    merged = scratch / "merged"
    merged.mkdir()
    if upper is None:
        upper = scratch / "upper"
        upper.mkdir()
        workdir = scratch / "work"
    log_file = mount_log if mount_log is not None else scratch / "unionfs.log"
    mounted = False
    try:
        argv = container_argv(merged, command, cwd=cwd)
        _mount(layers, merged, upper, workdir, log_file)
        mounted = True
        environment = dict(env) if env is not None else _default_env()
        check_command(merged, command, environment.get("PATH", DEFAULT_PATH), cwd)
        proc = subprocess.Popen(argv, env=environment)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            returncode = proc.wait()
        return 128 - returncode if returncode < 0 else returncode
    finally:
        if mounted:
            _unmount(merged)
        if not _is_mounted(merged):
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            log.warning("left %s behind: still mounted", scratch)

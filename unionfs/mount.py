"""Mount lifecycle: validate the layers, mount, serve, and unmount cleanly.

``validate`` turns every predictable failure into a ``MountError`` with an exit code before
anything is mounted. ``mount`` then either serves in the foreground (SIGINT/SIGTERM unmount
cleanly) or forks a daemon and returns only once the mount is live, like ``mount``: the
child mounts, reports success or the error through a pipe, and serves.

Once the kernel ends the connection (unmount) the daemon closes every layer fd first, then
exits; the layers are reached through detached mount clones where allowed (``detached``), so
the user's mounts holding them are never busy because of the daemon. The daemon works from
``/``, never from the caller's directory (which would keep its filesystem busy).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from unionfs import fusefeatures, options
from unionfs.assembly import Union, open_union
from unionfs.config import MountConfig
from unionfs.detached import DetachedTrees
from unionfs.exitcodes import (
    EXIT_FAILURE,
    EXIT_FUSE,
    EXIT_LAYER,
    EXIT_MOUNTPOINT,
    EXIT_PERMISSION,
    EXIT_USAGE,
)
from unionfs.mountinfo import mount_table, mounted_paths
from unionfs.operations import Operations
from unionfs.watch import Watcher
from unionfs.workdir import volatile_marker, volatile_owner

log = logging.getLogger(__name__)

SUBTYPE = "unionfs-py"  # the type in /proc/mounts is fuse.unionfs-py (unionfs-fuse's: fuse.unionfs)
FSTYPE = "fuse." + SUBTYPE


class MountError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _inside(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def _check_directory(path: str, role: str, *, write: bool = False) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(EXIT_LAYER, f"{role} {path} does not exist") from None
    except PermissionError:
        raise MountError(EXIT_PERMISSION, f"{role} {path}: permission denied") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(EXIT_LAYER, f"{role} {path} is not a directory")
    wanted = os.R_OK | os.X_OK | (os.W_OK if write else 0)
    if not os.access(path, wanted):
        raise MountError(EXIT_PERMISSION, f"{role} {path}: permission denied")
    return os.path.realpath(path)


def default_workdir(upper: str) -> str:
    upper = os.path.abspath(upper).rstrip("/")
    return os.path.join(os.path.dirname(upper), "." + os.path.basename(upper) + ".unionfs-work")


def validate(config: MountConfig) -> None:
    """Check everything that can be checked before mounting; raises MountError."""
    if not config.lowers:
        raise MountError(EXIT_USAGE, "no layers given")
    _absolute_paths(config)
    if config.upper is None and (config.quota_bytes is not None or config.quota_inodes is not None):
        raise MountError(EXIT_USAGE, "quota= needs a writable upper layer (--upper)")
    seen: dict[str, str] = {}
    resolved_lowers: list[str] = []
    for layer in config.lowers:
        real = _check_directory(layer, "layer")
        if real in seen:
            raise MountError(EXIT_LAYER, f"directory {layer} is given twice")
        seen[real] = layer
        resolved_lowers.append(real)
    for layer in config.data_layers:
        real = _check_directory(layer, "data layer")
        if real in seen:
            raise MountError(EXIT_LAYER, f"directory {layer} is given twice")
        seen[real] = layer
        resolved_lowers.append(real)
    if config.upper is not None:
        if not os.path.exists(config.upper):
            try:
                os.makedirs(config.upper, 0o755)
            except PermissionError:
                raise MountError(
                    EXIT_PERMISSION, f"cannot create upper {config.upper}: permission denied"
                ) from None
        upper = _check_directory(config.upper, "upper", write=True)
        if upper in seen:
            raise MountError(EXIT_LAYER, f"directory {config.upper} is given twice")
        for lower in resolved_lowers:
            if _inside(upper, lower):
                raise MountError(EXIT_LAYER, f"upper {config.upper} is inside layer {lower}")
            if _inside(lower, upper):
                raise MountError(EXIT_LAYER, f"layer {lower} is inside upper {config.upper}")
        if config.workdir is None:
            config.workdir = default_workdir(config.upper)
        if not os.path.exists(config.workdir):
            try:
                os.makedirs(config.workdir, 0o700)
            except PermissionError:
                raise MountError(
                    EXIT_PERMISSION,
                    f"cannot create workdir {config.workdir}: permission denied (pass --workdir)",
                ) from None
        work = _check_directory(config.workdir, "workdir", write=True)
        if _inside(work, upper) or _inside(upper, work):
            raise MountError(EXIT_LAYER, "workdir and upper must not contain each other")
        if any(_inside(work, lower) for lower in resolved_lowers):
            raise MountError(EXIT_LAYER, f"workdir {config.workdir} is inside a layer")
        if os.stat(work).st_dev != os.stat(upper).st_dev:
            raise MountError(EXIT_LAYER, "workdir must be on the same filesystem as the upper")
        _check_volatile_mark(config)
    _check_mountpoint(config)
    _check_fuse()
    _check_privileged_options(config)
    if config.log_file is not None:
        try:
            with open(config.log_file, "a", encoding="utf-8"):
                pass
        except OSError as error:
            raise MountError(
                EXIT_FAILURE, f"cannot write log {config.log_file}: {error.strerror}"
            ) from None


def _absolute_paths(config: MountConfig) -> None:
    """The daemon works from ``/``: every path it keeps must not depend on the caller's cwd."""
    config.lowers = [os.path.abspath(layer) for layer in config.lowers]
    config.data_layers = [os.path.abspath(layer) for layer in config.data_layers]
    config.mountpoint = os.path.abspath(config.mountpoint)
    if config.upper is not None:
        config.upper = os.path.abspath(config.upper)
    if config.workdir is not None:
        config.workdir = os.path.abspath(config.workdir)
    if config.log_file is not None:
        config.log_file = os.path.abspath(config.log_file)


VOLATILE_OWNER_WAIT = 60.0  # seconds a finishing daemon may take to sync and drop its mark


def _check_volatile_mark(config: MountConfig) -> None:
    """Refuse an upper that a volatile mount did not leave cleanly (as kernel overlayfs does),
    unless the user says its contents are fine (-o reuse_volatile). A mark whose daemon still
    runs (unmounted, finishing its sync) is waited for first."""
    assert config.workdir is not None
    mark = volatile_marker(config.workdir)
    if mark is None or config.reuse_volatile:
        return
    deadline = time.monotonic() + VOLATILE_OWNER_WAIT
    while True:
        owner = volatile_owner(mark)
        if owner is not None and owner[1] in mounted_paths():
            raise MountError(
                EXIT_LAYER,
                f"upper {config.upper} is in use by the unionfs mount at {owner[1]} "
                f"(pid {owner[0]})",
            )
        if owner is None or time.monotonic() >= deadline:
            break
        time.sleep(0.02)  # its daemon is finishing after the unmount: syncing, then unmarking
        if volatile_marker(config.workdir) is None:
            return
    if owner is not None:
        raise MountError(
            EXIT_LAYER,
            f"upper {config.upper}: its last unionfs (pid {owner[0]}) has not finished after "
            f"{VOLATILE_OWNER_WAIT:.0f} s; try again later",
        )
    raise MountError(
        EXIT_LAYER,
        f"upper {config.upper} was mounted with -o volatile and not unmounted cleanly "
        f"({mark} exists): its contents may be incomplete; start from an empty upper and "
        "workdir, or pass -o reuse_volatile to use it anyway",
    )


def is_root() -> bool:
    """Root, also root in a user namespace (rootless podman): fuse-overlayfs's test."""
    return os.geteuid() == 0


def user_allow_other() -> bool:
    """/etc/fuse.conf lets ordinary users mount with allow_other."""
    try:
        with open("/etc/fuse.conf", encoding="utf-8", errors="replace") as conf:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in conf)
    except OSError:
        return False


def _check_privileged_options(config: MountConfig) -> None:
    """What fusermount3 would refuse or drop for an ordinary user, refused here first."""
    if is_root():
        return
    given = set(options.fuse_mount_options(config, root=False))
    for wanted in ("suid", "dev"):
        if wanted in given:
            raise MountError(
                EXIT_PERMISSION,
                f"-o {wanted} needs root: ordinary users' FUSE mounts are always nosuid,nodev",
            )
    if "allow_other" in given and not user_allow_other():
        raise MountError(
            EXIT_PERMISSION,
            "-o allow_other needs root, or 'user_allow_other' in /etc/fuse.conf",
        )


def _check_mountpoint(config: MountConfig) -> None:
    path = config.mountpoint
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(EXIT_MOUNTPOINT, f"mountpoint {path} does not exist") from None
    except PermissionError:
        raise MountError(EXIT_PERMISSION, f"mountpoint {path}: permission denied") from None
    except OSError as error:
        raise MountError(EXIT_MOUNTPOINT, f"mountpoint {path}: {error.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(EXIT_MOUNTPOINT, f"mountpoint {path} is not a directory")
    real = os.path.realpath(path)
    if real in mounted_paths():
        raise MountError(EXIT_MOUNTPOINT, f"mountpoint {path} is already mounted")
    if not config.nonempty:
        try:
            if os.listdir(path):
                raise MountError(EXIT_MOUNTPOINT, f"mountpoint {path} is not empty")
        except PermissionError:
            raise MountError(EXIT_PERMISSION, f"mountpoint {path}: permission denied") from None
    if os.geteuid() != 0 and not os.access(path, os.W_OK):
        raise MountError(EXIT_PERMISSION, f"mountpoint {path}: no write access")
    lowers = [os.path.realpath(layer) for layer in [*config.lowers, *config.data_layers]]
    for layer in [*lowers, *(os.path.realpath(p) for p in (config.upper, config.workdir) if p)]:
        if _inside(real, layer) or _inside(layer, real):
            raise MountError(EXIT_MOUNTPOINT, f"mountpoint {path} overlaps {layer}")


def _check_fuse() -> None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(
            EXIT_FUSE, "/dev/fuse does not exist (is the fuse module loaded?)"
        ) from None
    except PermissionError:
        raise MountError(
            EXIT_FUSE,
            "/dev/fuse: permission denied (it should be mode 0666; ask your administrator)",
        ) from None
    except OSError as error:
        raise MountError(EXIT_FUSE, f"/dev/fuse is unusable: {error.strerror}") from None
    os.close(fd)
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError(EXIT_FUSE, "fusermount3 not found (install the fuse3 package)")


def prepare(config: MountConfig) -> Union:
    """Open every layer (top first: upper, then lowers top to bottom), through detached
    clones of their mounts where allowed (see ``detached``)."""
    os.umask(0)
    clones = DetachedTrees()
    try:
        return _open_layers(config, clones)
    finally:
        clones.close()  # the layers' own fds keep the clones they use alive


def _open_layers(config: MountConfig, clones: DetachedTrees) -> Union:
    return open_union(config, upper_and_work=clones.upper_and_work, lower_path=clones.layer)


def fuse_options(config: MountConfig) -> list[str]:
    """libfuse's options: as root (also in a user namespace) allow_other and suid unless the
    options say otherwise, as fuse-overlayfs; see ``options.fuse_mount_options``."""
    chosen = options.fuse_mount_options(config, root=is_root())
    chosen.append(f"subtype={SUBTYPE}")
    if config.debug:
        chosen.append("debug")
    return chosen


def setup_logging(config: MountConfig, *, to_stderr: bool) -> None:
    level = logging.DEBUG if config.debug else logging.INFO
    handler: logging.Handler
    if config.log_file:
        with open(config.log_file, "a", encoding="utf-8") as log_file:
            log_file.write(f"pid={os.getpid()}\n")  # first line: who serves this mount
        handler = logging.FileHandler(config.log_file)
    elif to_stderr:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    log.info("pid=%d mounting %s", os.getpid(), config.mountpoint)
    for note in config.notes:
        log.debug("%s", note)


@dataclass
class Shutdown:
    """How the request loop ended: by a signal, or by the kernel ending the connection."""

    signalled: bool = False


async def _serve(operations: Operations, real_mountpoint: str, shutdown: Shutdown) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, shutdown)
        nursery.start_soon(_tune_after_init, operations, real_mountpoint)
        if operations.config.watch:
            try:
                watcher = Watcher(operations.refresher.lowers)
            except OSError as error:
                log.warning("watch: no inotify (%s): use `unionfs refresh`", error.strerror)
            else:
                nursery.start_soon(operations.follow_lower_changes, watcher)
        if fusefeatures.has("main_lean"):
            await pyfuse3.main_lean(checkpoint_every=CHECKPOINT_EVERY)
        else:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


async def _tune_after_init(operations: Operations, real_mountpoint: str) -> None:
    """The kernel sets the bdi's read-ahead from the INIT reply: raise it only after that."""
    await operations.initialized.wait()
    await trio.sleep(0.05)  # the INIT reply is written right after init() returns
    operations.report_capabilities()
    raise_read_ahead(real_mountpoint)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _stop_on_signals(shutdown: Shutdown) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        # Blocked since before the mount went live (serve): one that came meanwhile is
        # delivered now, to this receiver, instead of killing a daemon with a live mount.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            shutdown.signalled = True
            pyfuse3.terminate()
            return


READ_AHEAD_KB = 1024
# The patched pyfuse3's loop yields to trio every this many requests answered in a row, so
# signals, timers and handlers waiting for threads (copy-up, fsync) go on under load.
CHECKPOINT_EVERY = 64


def mount_device(real: str) -> str | None:
    """``major:minor`` of the (topmost) mount at the resolved path ``real``."""
    devices = [entry.device for entry in mount_table() if entry.mountpoint == real]
    return devices[-1] if devices else None


def raise_read_ahead(real_mountpoint: str) -> None:
    """1 MiB read-ahead on the mount's bdi: sequential reads in 1 MiB requests instead of
    128 KiB ones (only root may; otherwise the kernel default stays)."""
    device = mount_device(real_mountpoint)
    if device is None:
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as knob:
            knob.write(str(READ_AHEAD_KB))
    except OSError as error:
        log.debug("read-ahead left at the default: %s", error)


def serve(config: MountConfig, prepared: Union, on_ready: object = None) -> int:
    """Mount and serve until unmounted or signalled. Returns an exit status."""
    try:
        operations = Operations(prepared, config)
    except OSError as error:
        raise MountError(EXIT_LAYER, f"cannot prepare the upper's quota: {error}") from None
    # The daemon allocates many short-lived objects per request and makes little cyclic
    # garbage (nodes point to parents only): collect young objects far less often (measured
    # by the benchmarks: -18% daemon CPU per cold lookup), and never scan the startup heap.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    real_mountpoint = os.path.realpath(config.mountpoint)  # resolved before it is our mount
    # From the moment the mount is live until the request loop listens for them, a stop signal
    # would take the default action (death) and leave a dead mount behind: hold them back.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pyfuse3.init(operations, config.mountpoint, set(fuse_options(config)))
    except RuntimeError as error:
        raise MountError(EXIT_FUSE, f"cannot mount {config.mountpoint}: {error}") from None
    if callable(on_ready):
        on_ready()
    log.info("mounted %s with %s", config.mountpoint, fusefeatures.describe())
    shutdown = Shutdown()
    clean = False
    try:
        trio.run(_serve, operations, real_mountpoint, shutdown)
        # Ended by the kernel (unmount) or by a signal; a connection aborted under a live
        # mount point (fusectl abort) is no clean end: the kernel may have dropped data.
        still_mounted = real_mountpoint in mounted_paths()
        clean = shutdown.signalled or not still_mounted
        log.info("request loop ended")
    finally:
        # Layer fds first: the kernel has let go of the mount, nothing may keep the user's
        # filesystems busy any longer (umount LOWERFS right after fusermount3 -u).
        release_layers(operations, prepared, volatile_clean=clean and config.volatile)
        pyfuse3.close(unmount=real_mountpoint in mounted_paths())
        log.info("unmounted %s", config.mountpoint)
    return 0


def release_layers(
    operations: Operations, prepared: Union, *, volatile_clean: bool = False
) -> None:
    """Close every fd the mount holds on its layers (open files, directories, layer roots).
    After a clean end of a volatile mount, sync the upper's filesystem and remove the volatile
    mark (see ``workdir``)."""
    operations.handles.close_all()
    if operations.quota is not None:
        try:
            operations.quota.close()  # the usage at unmount, for `unionfs check`
        except OSError as error:
            log.warning("quota record not updated: %s", error)
    upper = prepared.tree.upper
    if volatile_clean and prepared.work is not None and upper is not None:
        try:
            syncfs(upper.root_fd)
            if prepared.work.clear_volatile():
                log.info("volatile mount ended cleanly: upper synced, mark removed")
        except OSError as error:
            log.warning("volatile mark kept: %s", error)
    prepared.close()


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(ctypes.c_int(fd)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs: {os.strerror(code)}")


def mount(config: MountConfig) -> int:
    """Validate, then serve in the foreground or in a daemon that outlives this call."""
    validate(config)
    if config.fake:
        return 0
    if config.foreground:
        os.chdir("/")
        setup_logging(config, to_stderr=True)
        try:
            prepared = prepare(config)
        except OSError as error:
            raise MountError(EXIT_LAYER, f"cannot open layers: {error.strerror}") from None
        return serve(config, prepared)
    if detached_ready is not None:
        return _serve_detached(config, detached_ready)
    return _daemonize(config)


detached_ready: Callable[[], None] | None = None
"""Set in a mount child of the mount server (``unionfs.server``), which already runs apart from
its client: called once the mount is live, in place of forking a daemon and reporting to it."""


def _serve_detached(config: MountConfig, report_ready: Callable[[], None]) -> int:
    """The daemon's part of a background mount: a session of its own, the log, open the layers,
    mount, detach from the caller's stdio and ``report_ready()``, serve until unmounted. Raises
    MountError while the mount is not live."""
    os.setsid()
    os.chdir("/")  # the caller's directory must not stay busy because of the daemon
    setup_logging(config, to_stderr=False)

    def ready() -> None:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        report_ready()

    try:
        prepared = prepare(config)
        return serve(config, prepared, ready)
    except OSError as error:
        raise MountError(EXIT_LAYER, f"cannot open layers: {error.strerror}") from None


def _daemonize(config: MountConfig) -> int:
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read()
        if message == b"ok":
            return 0
        code, _, text = message.partition(b":")
        if not code:
            _, status = os.waitpid(pid, 0)
            raise MountError(EXIT_FAILURE, "the mount daemon died before mounting")
        raise MountError(int(code), text.decode("utf-8", "replace"))
    # child
    os.close(read_end)
    status = 0

    def ready() -> None:
        with contextlib.suppress(OSError):  # a caller killed meanwhile: the mount stays
            os.write(write_end, b"ok")
        os.close(write_end)

    try:
        _serve_detached(config, ready)
    except MountError as error:
        with contextlib.suppress(OSError):
            os.write(write_end, b"%d:%s" % (error.code, error.message.encode()))
        status = error.code
    except BaseException:
        log.exception("mount daemon failed")
        status = EXIT_FAILURE
    finally:
        os._exit(status)


def unmount(mountpoint: str) -> int:
    """Unmount a unionfs mount (works unprivileged through fusermount3)."""
    import subprocess

    real = os.path.realpath(mountpoint)
    if real not in mounted_paths():
        raise MountError(EXIT_MOUNTPOINT, f"{mountpoint} is not mounted")
    command = ["fusermount3", "-u", real]
    if shutil.which("fusermount3") is None:
        if os.geteuid() != 0:
            raise MountError(EXIT_FUSE, "fusermount3 not found (install the fuse3 package)")
        command = ["umount", real]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        text = result.stderr.strip().splitlines()
        detail = text[-1] if text else f"exit status {result.returncode}"
        code = (
            EXIT_PERMISSION if "ermission" in detail or "not permitted" in detail else EXIT_FAILURE
        )
        raise MountError(code, f"cannot unmount {mountpoint}: {detail}")
    return 0

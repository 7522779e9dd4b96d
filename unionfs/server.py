"""The per-user mount server: one interpreter, imported once, that forks one child per mount.

Started on demand by the first background ``unionfs mount`` of a user (``unionfs.client``
describes the client side and what a *context* is), it listens on a unix socket in a directory
only its user can enter (``$XDG_RUNTIME_DIR/unionfs``, ``/run/unionfs`` for root,
``/tmp/unionfs-UID``), accepts only peers of its own uid (``SO_PEERCRED``) and forks a child per
connection. The child takes over its client's working directory, umask, environment, stdio,
soft resource limits and CPU affinity, then runs the ordinary command line
(``unionfs.cli.main``) in place of the client, except that ``unionfs.mount`` reports "mounted"
to the client instead of forking a daemon. So a mount costs a fork of an interpreter that has
imported everything (``gc.freeze()`` first, so the collector does not unshare pages), each mount
still has its own process (pyfuse3 keeps its session in module globals; a crash takes down one
mount only), and errors reach the user as one line on their own stderr with the usual exit code.

Life cycle and invariants:

- One server per context (one socket, one lock file ``SOCKET.lock`` held for the server's
  life): a launcher that cannot take the lock leaves the running server alone.
- The server is the parent of its mount children and reaps them (SIGCHLD). Killing it does not
  touch them: they have their own sessions, no parent-death signal, and are re-parented to the
  nearest subreaper (or init), which reaps them. A child exits when its mount goes, as a daemon
  forked by ``unionfs mount`` does.
- It exits after ``UNIONFS_SERVER_IDLE`` seconds (default 60) with no mount child alive and no
  request, or on SIGTERM/SIGINT/SIGHUP: it first removes its socket, so a new client starts a
  new server (or, for a request caught in between, runs the mount itself).
- Its log (start, every child with its client's pid and exit status, refusals) is
  ``SOCKET.log``, restarted with each server.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import locale
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable

from unionfs import client, proctitle

log = logging.getLogger(__name__)

IDLE_SECONDS = 60.0
"""How long a server with no mount left waits for another request (``UNIONFS_SERVER_IDLE``)."""

REQUEST_TIMEOUT = 30.0
"""A connected client sends its whole request at once; a child gives up on a silent one."""

MAX_REQUEST = 8 << 20

LOG_LIMIT = 1 << 20
"""The server's log starts over when it grows past this (a long-lived server mounts often)."""

RESOURCE_NAMES = {
    "Max cpu time": "RLIMIT_CPU",
    "Max file size": "RLIMIT_FSIZE",
    "Max data size": "RLIMIT_DATA",
    "Max stack size": "RLIMIT_STACK",
    "Max core file size": "RLIMIT_CORE",
    "Max resident set": "RLIMIT_RSS",
    "Max processes": "RLIMIT_NPROC",
    "Max open files": "RLIMIT_NOFILE",
    "Max locked memory": "RLIMIT_MEMLOCK",
    "Max address space": "RLIMIT_AS",
    "Max file locks": "RLIMIT_LOCKS",
    "Max pending signals": "RLIMIT_SIGPENDING",
    "Max msgqueue size": "RLIMIT_MSGQUEUE",
    "Max nice priority": "RLIMIT_NICE",
    "Max realtime priority": "RLIMIT_RTPRIO",
    "Max realtime timeout": "RLIMIT_RTTIME",
}


class NotServed(Exception):
    """The child cannot take its client's place: the client runs the command itself."""


def idle_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("UNIONFS_SERVER_IDLE", IDLE_SECONDS)))
    except ValueError:
        return IDLE_SECONDS


# ---------------------------------------------------------------------------- launcher


def launch(argv: list[str] | None = None) -> int:
    """Run by ``unionfs.client.start_server`` as ``python -c ... SOCKET PADDING``: bind the socket
    (unless a server already runs), fork the server, exit 0 once it listens."""
    arguments = sys.argv[1:] if argv is None else argv
    socket_path = arguments[0]
    client._launched = True  # sys.path[0] is unionfs's directory, as the client's first entry
    os.chdir("/")
    code = client.code_identity()
    context = client.process_context()
    if os.path.basename(socket_path) != "s-" + client.server_key(code, context):
        return 3  # not this process's context (or code): the client will run the mount itself
    lock_path = socket_path + ".lock"
    deadline = time.monotonic() + 2.0
    while True:
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            # A server holds it: one that serves (its socket is there), or one that is
            # exiting (it removes its socket first, then its lock file, then exits).
            if os.path.exists(socket_path) or time.monotonic() > deadline:
                return 0
            time.sleep(0.01)
            continue
        try:
            if os.stat(lock_path).st_ino == os.fstat(lock).st_ino:
                break  # locked, and still the lock file (not one an exiting server removed)
        except FileNotFoundError:
            pass
        os.close(lock)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # a killed server's
    umask = os.umask(0o177)
    try:
        listener.bind(socket_path)
    finally:
        os.umask(umask)
    listener.listen(128)
    if os.fork() > 0:
        return 0
    status = 1
    try:
        os.setsid()
        status = Server(listener, lock, socket_path, code).run()
    except BaseException:
        log.exception("mount server failed")
    finally:
        os._exit(status)


# ---------------------------------------------------------------------------- server


class Server:
    def __init__(
        self, listener: socket.socket, lock: int, socket_path: str, code: list[str]
    ) -> None:
        self.listener = listener
        self.lock = lock
        self.socket_path = socket_path
        self.code = code
        self.children: dict[int, int] = {}  # mount child pid -> client pid
        self.stopping = False
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.idle = idle_seconds()

    def run(self) -> int:
        _log_to(self.socket_path + ".log")
        proctitle.set_command_line([b"unionfs-server", os.fsencode(self.socket_path)])
        proctitle.set_name("unionfs-server")
        log.info(
            "pid=%d serving %s (idle exit after %.1f s)", os.getpid(), self.socket_path, self.idle
        )
        preload()
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, _ignore)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._stop)
        self.listener.setblocking(False)
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(self.wake_read, select.POLLIN)
        idle_since = time.monotonic()
        while not self.stopping:
            self._reap()
            if self.children:
                timeout = None
            else:
                remaining = idle_since + self.idle - time.monotonic()
                if remaining <= 0 and not self._accept():
                    log.info("idle for %.1f s: exiting", self.idle)
                    break
                timeout = max(0, int(remaining * 1000) + 1)
            poller.poll(timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(self.wake_read, 256):
                    pass
            if self._accept() or self.children:
                idle_since = time.monotonic()
        self._shutdown()
        return 0

    def _stop(self, signum: int, _frame: object) -> None:
        log.info("signal %d: exiting (mounts stay)", signum)
        self.stopping = True

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            client_pid = self.children.pop(pid, None)
            log.info(
                "child %d (client %s) exited with status %d",
                pid,
                client_pid,
                os.waitstatus_to_exitcode(status),
            )
            with contextlib.suppress(OSError):
                if os.stat(self.socket_path + ".log").st_size > LOG_LIMIT:
                    os.truncate(self.socket_path + ".log", 0)  # everyone appends: safe

    def _accept(self) -> bool:
        """Serve every pending connection; True if there was one."""
        served = False
        while True:
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return served
            except OSError as error:
                log.warning("accept: %s", error)
                return served
            served = True
            with connection:
                self._fork_child(connection)

    def _fork_child(self, connection: socket.socket) -> None:
        credentials = connection.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        client_pid, uid, _gid = struct.unpack("3i", credentials)
        if uid != os.geteuid():
            log.warning(
                "refused pid %d of uid %d (this server serves uid %d)",
                client_pid,
                uid,
                os.geteuid(),
            )
            return
        connection.setblocking(True)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # what the server made since the last fork joins the shared, never-scanned heap
        try:
            pid = os.fork()
        except OSError as error:
            log.warning("cannot fork for client %d: %s", client_pid, error)
            return
        if pid == 0:
            self._become_child(connection, client_pid)
        # Nothing else here (no logging): every page the server writes after a fork becomes
        # that child's own copy.
        self.children[pid] = client_pid

    def _become_child(self, connection: socket.socket, client_pid: int) -> None:
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for fd in (self.wake_read, self.wake_write, self.lock):
                os.close(fd)
            self.listener.close()
            log.info("child %d serves client %d", os.getpid(), client_pid)
            status = serve_client(connection, self.code, client_pid)
        except BaseException:
            log.exception("mount child for client %d failed", client_pid)
        finally:
            os._exit(status)

    def _shutdown(self) -> None:
        for path in (self.socket_path, self.socket_path + ".lock"):  # the lock is still held
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # Whoever connected before the socket went is told nothing (end of file): it runs its
        # mount itself.
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                break
            connection.close()
        self.listener.close()
        log.info("server exits; %d mount children stay", len(self.children))


def _ignore(_signum: int, _frame: object) -> None:
    """SIGCHLD only wakes the loop up (through the wakeup fd); the loop reaps."""


def _log_to(path: str) -> None:
    handler: logging.Handler
    try:
        os.truncate(path, 0)
    except OSError:
        pass
    try:  # appending: the mount children write to it too
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def preload() -> None:
    """Import and warm up everything a mount child uses, then freeze the heap, so that the
    children share it instead of each building its own."""
    import resource  # noqa: F401  (take_over)

    from unionfs import cli, mount  # noqa: F401  (the whole mount path: pyfuse3, trio, ...)

    cli.build_parser()
    cli.build_overlay_parser()
    gc.freeze()


# ---------------------------------------------------------------------------- mount child


def serve_client(connection: socket.socket, code: list[str], client_pid: int) -> int:
    """In a fresh child: take the client's place and run its command line; the exit status."""
    connection.settimeout(REQUEST_TIMEOUT)
    data, fds = _receive(connection)
    try:
        try:
            sections = client.decode(data)
            arguments = sections["argv"]
            if sections.get("code") != code:
                raise NotServed("the server runs other code")
            if sections.get("context") != client.process_context():
                raise NotServed("the server runs in another context")
            stdio = [int(fd) for fd in sections["stdio"]]
            if len(fds) != 1 + len(stdio):
                raise NotServed("the request's file descriptors are missing")
            take_over(sections, fds[0])
            if not _serves(arguments):
                raise NotServed("not a background mount")
        except NotServed as reason:
            log.info("client %d not served: %s", client_pid, reason)
            _tell(connection, b"D")
            return 0
        except (ValueError, KeyError, IndexError, OSError) as error:
            log.warning("client %d: bad request (%s)", client_pid, error)
            _tell(connection, b"D")
            return 0
        _tell(connection, b"A")  # a client gone meanwhile: its mount goes ahead
        for target in (0, 1, 2):
            if target in stdio:
                os.dup2(fds[1 + stdio.index(target)], target)
            else:
                os.close(target)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    proctitle.set_command_line([os.fsencode(arg) for arg in sections.get("cmdline", [])])
    if sections.get("comm"):
        proctitle.set_name(sections["comm"][0])
    return _run_command(connection, arguments)


def _tell(connection: socket.socket, message: bytes) -> None:
    with contextlib.suppress(OSError):
        connection.sendall(message)


def _receive(connection: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, flags, _ = socket.recv_fds(connection, 1 << 16, 8)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise NotServed("too many file descriptors")
    chunks = [data]
    size = len(data)
    while data:
        data = connection.recv(1 << 16)
        chunks.append(data)
        size += len(data)
        if size > MAX_REQUEST:
            break
    return b"".join(chunks), list(fds)


def take_over(sections: dict[str, list[str]], cwd: int) -> None:
    """Adopt the client's working directory, umask, environment, soft limits, CPU affinity."""
    import resource

    os.fchdir(cwd)
    os.umask(int(sections["umask"][0], 8))
    environment = dict(item.split("=", 1) for item in sections["env"] if "=" in item)
    os.environ.clear()
    os.environ.update(environment)
    time.tzset()  # as at start-up: local time (the log's) in the client's TZ
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_CTYPE, "")  # as the interpreter does at start-up
    for name, (soft, _hard) in client.parse_limits(sections["limits"][0]).items():
        attribute = RESOURCE_NAMES.get(name)
        if attribute is None or not hasattr(resource, attribute):
            continue
        which = getattr(resource, attribute)
        wanted = resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
        current, hard = resource.getrlimit(which)
        if wanted != current:
            try:
                resource.setrlimit(which, (wanted, hard))
            except (ValueError, OSError) as error:
                raise NotServed(f"cannot set {attribute}: {error}") from None
    cpus = {int(cpu) for cpu in sections["affinity"]}
    if cpus and cpus != os.sched_getaffinity(0):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as error:
            raise NotServed(f"cannot set the CPU affinity: {error}") from None


def _serves(arguments: list[str]) -> bool:
    """Whether this command line is a background mount (parsed with stdio still /dev/null, so
    nothing shows; a usage error is served: the real run prints it)."""
    from unionfs import cli
    from unionfs.config import MountConfig

    try:
        action, value = cli.parse(arguments)
    except (SystemExit, Exception):
        return True
    return action == "mount" and isinstance(value, MountConfig) and not value.foreground


def _run_command(connection: socket.socket, arguments: list[str]) -> int:
    from unionfs import cli, mount

    reported = False

    def report(code: int) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            connection.sendall(b"=%d" % code)
        connection.close()

    ready: Callable[[], None] = lambda: report(0)  # noqa: E731
    mount.detached_ready = ready
    try:
        code = cli.main(arguments)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    report(code)
    return code

"""The ``unionfs`` entry point and the client side of the per-user mount server.

A background ``unionfs mount`` (and podman's ``unionfs -o lowerdir=... MOUNTPOINT``) is handed
to a mount server (``unionfs.server``) that has imported everything once and forks one child per
mount: the child runs this command line in the caller's context (its working directory, umask,
environment, stdin/stdout/stderr, soft resource limits and CPU affinity) and serves the mount.
The command returns the exit status the child reports, once the mount is live or has failed; the
child printed any error on the caller's own stderr, as the command itself would have.

What a child cannot take over from its client after a fork (user and group ids, supplementary
groups, capabilities, no_new_privs, seccomp mode and filter count (filters cannot be read),
namespaces, cgroup, root directory, security label, hard resource limits, nice value, OOM score,
the interpreter, its flags and import path, the code) is the server's *context*: a client only
talks to the server started in its own context. The context names the socket (a hash), and the
child compares it in full with its own before doing anything, answering "run it yourself" on
any difference.

Every other case runs the command line in this process, as without a server: other commands,
``-f``, ``UNIONFS_SERVER=0``, no private runtime directory, a server that cannot be started or
reached (then silently). This module runs before every mount, so it
imports nothing beyond what the interpreter has already loaded (plus ``_socket``, and
``unionfs.compiled``, which the package loads itself).

Protocol on the unix socket: the client sends NUL-separated fields (see ``encode``) with its
working directory and stdio as SCM_RIGHTS, then shuts down its write side. The child answers
``D`` (not served: run it yourself; nothing was done), or ``A`` (accepted) and later ``=CODE``
(the exit status); end of file right after ``A`` means the child died before mounting.
"""

from __future__ import annotations

import os
import sys

from unionfs import compiled  # (loaded with the package already)

try:
    import _socket
except ImportError:  # pragma: no cover - every Linux CPython has it
    _socket = None  # type: ignore[assignment]

PROTOCOL = "unionfs-mount-server-1"
SUBCOMMANDS = (
    "umount",
    "unmount",
    "status",
    "which",
    "refresh",
    "import",
    "diff",
    "run",
    "check",
)
OFF = ("0", "off", "no", "false")

EXIT_FAILURE = 1
"""``unionfs.exitcodes.ExitCode.FAILURE`` (not imported: ``enum`` is not loaded at start-up;
tests/unit/test_exitcodes.py keeps them equal)."""

STATUS_KEYS = (
    b"Uid",
    b"Gid",
    b"Groups",
    b"CapInh",
    b"CapPrm",
    b"CapEff",
    b"CapBnd",
    b"CapAmb",
    b"NoNewPrivs",
    b"Seccomp",
    b"Seccomp_filters",
)


def main(argv: list[str] | None = None) -> int:
    """``unionfs ...``: through the mount server when it can serve, else in this process."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if wants_server(arguments):
        code = mount_through_server(arguments)
        if code is not None:
            return code
    from unionfs.cli import main as cli_main

    return cli_main(arguments)


def wants_server(arguments: list[str]) -> bool:
    """A cheap first look: a background mount the server may serve (the child decides)."""
    if os.environ.get("UNIONFS_SERVER", "1").strip().lower() in OFF or _socket is None:
        return False
    first = next((arg for arg in arguments if not arg.startswith("-")), None)
    if first in SUBCOMMANDS or "--" in arguments:
        return False
    if first != "mount" and not any(arg.startswith("-o") for arg in arguments):
        return False
    skip_value = False
    for arg in arguments:
        if skip_value:
            skip_value = False
        elif arg in ("-o", "--workdir", "--upper", "--log", "--image", "--whiteout-format"):
            skip_value = True
        elif arg.startswith("--"):
            if arg.startswith(("--f", "--h", "--v")):  # --foreground, --help, --version
                return False
        elif arg.startswith("-") and not arg.startswith("-o") and ("f" in arg or "h" in arg):
            return False
    return True


# ---------------------------------------------------------------------------- context


def _read(path: str) -> bytes:
    try:
        with open(path, "rb", buffering=0) as file:
            return file.read()
    except OSError:
        return b""


def process_context() -> list[str]:
    """What a mount child must share with its client and cannot take over after a fork."""
    items: list[str] = []
    for line in _read("/proc/self/status").split(b"\n"):
        key, _, value = line.partition(b":")
        if key in STATUS_KEYS:
            items.append(f"{key.decode()}={' '.join(value.decode().split())}")
    try:
        names = sorted(os.listdir("/proc/self/ns"))
    except OSError:
        names = []
    for name in names:
        try:
            items.append(f"ns.{name}={os.readlink('/proc/self/ns/' + name)}")
        except OSError:
            continue
    items.append("cgroup=" + " ".join(_read("/proc/self/cgroup").decode(errors="replace").split()))
    items.append("label=" + _read("/proc/self/attr/current").decode(errors="replace").strip())
    root = os.stat("/")
    items.append(f"root={root.st_dev}:{root.st_ino}")
    items.append(f"nice={os.getpriority(os.PRIO_PROCESS, 0)}")
    items.append("oom=" + _read("/proc/self/oom_score_adj").decode().strip())
    for name, limit in parse_limits(_read("/proc/self/limits").decode()).items():
        items.append(f"hard.{name}={limit[1]}")
    return items


def parse_limits(text: str) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits as {name: (soft, hard)} (values as printed: a number or unlimited)."""
    limits: dict[str, tuple[str, str]] = {}
    for line in text.splitlines()[1:]:
        name, soft_and_hard = line[:26].strip(), line[26:].split()
        if name and len(soft_and_hard) >= 2:
            limits[name] = (soft_and_hard[0], soft_and_hard[1])
    return limits


def import_path() -> list[str]:
    """``sys.path`` without the entry the interpreter put first for its script, ``-m`` or
    ``-c`` (the server is started with ``-P`` and puts unionfs's own directory there)."""
    return sys.path if sys.flags.safe_path and not _launched else sys.path[1:]


_launched = False
"""True in the server's launcher (``unionfs.server.launch``)."""


def code_identity() -> list[str]:
    """The interpreter and the code a server runs: a change to either makes a new server."""
    package = os.path.dirname(os.path.abspath(__file__))
    flags = [
        f"{name}={getattr(sys.flags, name)}"
        for name in dir(sys.flags)
        if not name.startswith("_")
        and name not in ("safe_path", "count", "index", "n_fields", "n_sequence_fields")
        and name not in ("n_unnamed_fields",)
    ]
    items = [
        f"protocol={PROTOCOL}",
        f"python={sys.executable} {sys.version}",
        "flags=" + ",".join(flags),
        "xoptions=" + ",".join(f"{key}={value}" for key, value in sorted(sys._xoptions.items())),
        "pythonenv="
        + ",".join(
            f"{key}={value}"
            for key, value in sorted(os.environ.items())
            if key.startswith("PYTHON")
        ),
        "path=" + ":".join(import_path()),
        f"package={package}",
        # Which build of the hot modules runs (unionfs/compiled.py): a server started pure (say
        # with UNIONFS_COMPILE=0, or before scripts/setup compiled) never serves a compiled
        # caller, nor the reverse.
        f"build={compiled.build}:{compiled.directory}",
        f"encoding={sys.getfilesystemencoding()}:{sys.getfilesystemencodeerrors()}",
    ]
    try:
        with os.scandir(package) as entries:
            for entry in sorted(entries, key=lambda entry: entry.name):
                if entry.name.endswith(".py"):
                    stat = entry.stat()
                    items.append(f"{entry.name}={stat.st_mtime_ns}:{stat.st_size}")
    except OSError:
        items.append("package unreadable")
    for path in import_path():
        if path.endswith("-packages"):  # pip install/uninstall changes these directories
            try:
                items.append(f"{path}={os.stat(path).st_mtime_ns}")
            except OSError:
                continue
    return items


def server_key(code: list[str], context: list[str]) -> str:
    from _blake2 import blake2b

    return blake2b("\n".join([*code, *context]).encode(), digest_size=10).hexdigest()


def _private_directory(path: str) -> bool:
    """``path`` exists (made if missing, 0700), is a real directory we own, closed to others."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        (st.st_mode & 0o170000) == 0o040000
        and st.st_uid == os.geteuid()
        and (st.st_mode & 0o077) == 0
    )


def _owned(path: str) -> bool:
    """Ours (not, say, a user's runtime directory in the environment sudo kept for root)."""
    try:
        return os.stat(path).st_uid == os.geteuid()
    except OSError:
        return False


def runtime_directory() -> str | None:
    """Where the server's socket lives: ``$UNIONFS_SERVER_DIR``, else
    ``$XDG_RUNTIME_DIR/unionfs``, ``/run/unionfs`` (root), ``/tmp/unionfs-UID``: the first one
    that is (or can be made) a directory of ours closed to everyone else."""
    override = os.environ.get("UNIONFS_SERVER_DIR")
    candidates = [override] if override else []
    if not override:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and runtime.startswith("/") and _owned(runtime):
            candidates.append(runtime.rstrip("/") + "/unionfs")
        if os.geteuid() == 0:
            candidates.append("/run/unionfs")
        candidates.append(f"/tmp/unionfs-{os.geteuid()}")
    for path in candidates:
        if _private_directory(path):
            return path
    return None


# ---------------------------------------------------------------------------- request


def encode(sections: dict[str, list[str]]) -> bytes:
    """``PROTOCOL\\0NAME\\0COUNT\\0ITEM...`` for each section (no item holds a NUL: they are
    C strings, file names or decimal numbers)."""
    fields = [PROTOCOL]
    for name, items in sections.items():
        fields += [name, str(len(items)), *items]
    return b"\0".join(os.fsencode(field) for field in fields)


def decode(data: bytes) -> dict[str, list[str]]:
    fields = [os.fsdecode(field) for field in data.split(b"\0")]
    if not fields or fields[0] != PROTOCOL:
        raise ValueError("not a unionfs mount request")
    sections: dict[str, list[str]] = {}
    index = 1
    while index < len(fields):
        name, count = fields[index], int(fields[index + 1])
        sections[name] = fields[index + 2 : index + 2 + count]
        if len(sections[name]) != count:
            raise ValueError("truncated request")
        index += 2 + count
    return sections


def request(arguments: list[str], code: list[str], context: list[str]) -> dict[str, list[str]]:
    status = _read("/proc/self/status")
    umask = next(
        (
            line.split(b":")[1].strip().decode()
            for line in status.split(b"\n")
            if line.startswith(b"Umask:")
        ),
        "",
    )
    if not umask:  # kernels before 4.7 do not show it
        value = os.umask(0o022)
        os.umask(value)
        umask = oct(value)
    return {
        "argv": arguments,
        "cmdline": [os.fsdecode(arg) for arg in _read("/proc/self/cmdline").split(b"\0")[:-1]],
        "comm": [_read("/proc/self/comm").decode(errors="replace").strip()],
        "env": [f"{key}={value}" for key, value in os.environ.items()],
        "umask": [umask],
        "limits": [_read("/proc/self/limits").decode()],
        "affinity": [str(cpu) for cpu in sorted(os.sched_getaffinity(0))],
        "code": code,
        "context": context,
    }


def _open_stdio() -> list[int]:
    """Which of 0, 1, 2 are open here (the child closes the others)."""
    present = []
    for fd in (0, 1, 2):
        try:
            os.get_inheritable(fd)
        except OSError:
            continue
        present.append(fd)
    return present


def mount_through_server(arguments: list[str]) -> int | None:
    """Serve ``arguments`` through the server; the exit status, or None if it did not run."""
    try:
        context = process_context()
        code = code_identity()
        directory = runtime_directory()
        if directory is None:
            return None
        socket_path = f"{directory}/s-{server_key(code, context)}"
        connection = _connect(socket_path)
        if connection is None:
            if not start_server(socket_path):
                return None
            connection = _connect(socket_path)
            if connection is None:
                return None
        try:
            return _exchange(connection, request(arguments, code, context))
        finally:
            connection.close()
    except OSError:
        return None


def _connect(path: str) -> _socket.socket | None:
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    return connection


def _exchange(connection: _socket.socket, sections: dict[str, list[str]]) -> int | None:
    send(connection, sections)
    return answer(connection)


def send(connection: _socket.socket, sections: dict[str, list[str]]) -> None:
    """Send the request with this process's working directory and open stdio."""
    stdio = _open_stdio()
    sections["stdio"] = [str(fd) for fd in stdio]
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in [cwd, *stdio])
        data = encode(sections)
        sent = connection.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(data):  # interrupted part-way: the rest without descriptors
            connection.sendall(data[sent:])
    finally:
        os.close(cwd)
    connection.shutdown(_socket.SHUT_WR)


def answer(connection: _socket.socket) -> int | None:
    """The exit status the child reports, or None if it did not serve the request."""
    data = b""
    while True:
        chunk = connection.recv(256)
        if not chunk:
            break
        data += chunk
    if not data or data == b"D":
        return None  # not served, nothing done: run it here
    _, equals, code = data.partition(b"=")
    if equals and code.strip().isdigit():
        return int(code)
    print("unionfs: the mount daemon died before mounting", file=sys.stderr)
    return EXIT_FAILURE


# ---------------------------------------------------------------------------- starting it

TITLE_SPACE = 16384
"""Bytes of command line the server is started with, so that each mount child can show its
client's command line in ``ps`` (and /proc/PID/cmdline) in their place."""

LAUNCH = (
    "import os, sys; os.closerange(3, 1 << 20); sys.path.insert(0, sys.argv.pop(1)); "
    "from unionfs.server import launch; raise SystemExit(launch())"
)


def start_server(socket_path: str) -> bool:
    """Start the server for ``socket_path`` (unless one already runs); True once it listens.

    The launcher binds the socket, forks the server and exits, so the server is nobody's child
    here; it runs with this process's context (the one its socket is named after).
    """
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-P", "-c", LAUNCH, package_parent, socket_path, "-" * TITLE_SPACE]
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.devnull
    pid = os.posix_spawn(
        sys.executable,
        argv,
        os.environ,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, null, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ],
    )
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0

"""The systems under test: how each is mounted, how its daemon is found, how it is unmounted.

Every system answers ``mount(stack, upper, work, mountpoint, writable)`` with a ``Mounted``
whose ``root`` is where a workload runs and whose ``pid`` is the FUSE daemon's (None for the
kernel and native systems). ``Mounted.unmount`` never raises and always leaves nothing
mounted at the mountpoint (``umount``/``fusermount3 -u``, then lazy, then the daemon is killed
and its FUSE connection aborted).

A system whose tool is missing is unavailable (reported n/a); a mount that fails raises
``MountError`` and that sample is recorded as failed, never a crash.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.dataset import Stack
from unionfs import mountinfo

REPO = Path(__file__).resolve().parent.parent


class MountError(Exception):
    """A system could not mount (the message says why)."""


def unionfs_python() -> str:
    """The interpreter for ``python -m unionfs``: the repo's venv once scripts/setup made it."""
    for candidate in (REPO / ".venv" / "bin" / "python", Path("/work/venv-probe/bin/python")):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def mount_entry(mountpoint: Path) -> tuple[str, str] | None:
    """(fstype, "major:minor") of what is mounted exactly at MOUNTPOINT, from mountinfo."""
    # abspath, not realpath: never stat anything at or below a mountpoint (it may hang).
    target = os.path.abspath(mountpoint)
    found = None
    for entry in mountinfo.mount_table():
        if entry.mountpoint == target:
            found = (entry.fstype, entry.device)  # the last one mounted there shows
    return found


def is_mounted(mountpoint: Path) -> bool:
    return mount_entry(mountpoint) is not None


def abort_fuse(mountpoint: Path) -> None:
    """Abort the FUSE connection behind MOUNTPOINT so nothing blocked on it can hang us."""
    entry = mount_entry(mountpoint)
    if entry is None or not entry[0].startswith("fuse"):
        return
    minor = entry[1].split(":")[1]
    abort = Path("/sys/fs/fuse/connections") / minor / "abort"
    with contextlib.suppress(OSError):
        abort.write_text("1")


def find_daemon(mountpoint: Path) -> int | None:
    """PID of the process whose command line names MOUNTPOINT (the FUSE daemon)."""
    wanted = os.fsencode(os.path.abspath(mountpoint))
    own = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                arguments = handle.read().split(b"\0")
        except OSError:
            continue
        if wanted in arguments:
            return int(entry)
    return None


def _run(
    command: list[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a mount command. Its output goes to files, not pipes: a daemon that forks and keeps
    the pipes open would make waiting for end-of-file hang until the daemon exits."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = subprocess.run(
                command,
                stdout=out,
                stderr=err,
                timeout=timeout,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise MountError(f"{command[0]} timed out after {timeout:.0f} s") from error
        except OSError as error:
            raise MountError(f"{command[0]}: {error}") from error
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            command,
            process.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def _wait_mounted(mountpoint: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(mountpoint):
            return
        time.sleep(0.01)
    raise MountError(f"{mountpoint} not mounted after {timeout:.0f} s")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Mounted:
    """One live mount (or, for native, a plain directory)."""

    system: str
    root: Path
    mountpoint: Path | None
    kind: str
    pid: int | None = None
    log: Path | None = None
    notes: list[str] = field(default_factory=list)
    # The daemon when this harness started it in the foreground (debug mounts): reaped here.
    process: subprocess.Popen[bytes] | None = None

    def unmount(self) -> None:
        """Unmount; never raises. Afterwards nothing is mounted at the mountpoint."""
        if self.mountpoint is None:
            return
        mountpoint = self.mountpoint
        if self.kind == "kernel":
            attempts = [["umount", str(mountpoint)], ["umount", "-l", str(mountpoint)]]
        else:
            attempts = [
                ["fusermount3", "-u", str(mountpoint)],
                ["fusermount3", "-uz", str(mountpoint)],
                ["umount", "-l", str(mountpoint)],
            ]
        for command in attempts:
            if not is_mounted(mountpoint):
                break
            try:
                subprocess.run(command, capture_output=True, timeout=30, check=False)
            except (subprocess.TimeoutExpired, OSError):
                abort_fuse(mountpoint)
        if is_mounted(mountpoint):
            abort_fuse(mountpoint)
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        if self.pid is not None:
            # Let the daemon finish its exit so it does not eat CPU in the next sample.
            deadline = time.monotonic() + 10
            while _pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if _pid_alive(self.pid):
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)


class System:
    """Base class: a named system, available or not, that mounts stacks."""

    name = ""
    kind = "fuse"
    description = ""

    def availability(self) -> str | None:
        """None when usable, else the reason it is not (reported as n/a)."""
        return None

    def version(self) -> str:
        return ""

    def mount(
        self,
        stack: Stack,
        upper: Path,
        work: Path,
        mountpoint: Path,
        writable: bool,
        timeout: float,
    ) -> Mounted:
        raise NotImplementedError


class Native(System):
    """The merged tree as one plain directory (copied to the upper's filesystem when written)."""

    name = "native"
    kind = "native"
    description = "a plain directory holding the merged tree"

    def mount(
        self,
        stack: Stack,
        upper: Path,
        work: Path,
        mountpoint: Path,
        writable: bool,
        timeout: float,
    ) -> Mounted:
        if not writable:
            return Mounted(self.name, stack.merged, None, self.kind)
        # The cached merged tree hard-links the layers: writes go to a private copy.
        result = _run(["cp", "-a", f"{stack.merged}/.", f"{upper}/"], timeout)
        if result.returncode != 0:
            raise MountError(f"cp -a: {result.stderr.strip()}")
        return Mounted(self.name, upper, None, self.kind)


class KernelOverlay(System):
    """Kernel overlayfs as Docker's overlay2 driver mounts it (index=off, kernel defaults)."""

    name = "overlay"
    kind = "kernel"
    description = "kernel overlayfs, overlay2 options: lowerdir,upperdir,workdir,index=off"
    extra_options: tuple[str, ...] = ("index=off",)

    def availability(self) -> str | None:
        if os.geteuid() != 0:
            return "needs root"
        with open("/proc/filesystems") as filesystems:
            if "overlay" not in filesystems.read():
                subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
        with open("/proc/filesystems") as filesystems:
            if "overlay" not in filesystems.read():
                return "kernel has no overlay filesystem"
        return None

    def version(self) -> str:
        parameters = Path("/sys/module/overlay/parameters")
        settings = []
        for name in ("redirect_dir", "metacopy", "index", "xino_auto"):
            with contextlib.suppress(OSError):
                settings.append(f"{name}={(parameters / name).read_text().strip()}")
        return f"kernel {os.uname().release} ({', '.join(settings)})"

    def mount(
        self,
        stack: Stack,
        upper: Path,
        work: Path,
        mountpoint: Path,
        writable: bool,
        timeout: float,
    ) -> Mounted:
        # Lower layers relative to their parent directory (as overlay2 does with its l/ links):
        # 100 absolute layer paths would not fit in one page of mount options.
        lower = ":".join(os.path.relpath(layer, stack.parent) for layer in reversed(stack.layers))
        options = ",".join(
            (*self.extra_options, f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}")
        )
        result = _run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)],
            timeout,
            cwd=stack.parent,
        )
        if result.returncode != 0:
            raise MountError(f"mount -t overlay: {result.stderr.strip()}")
        return Mounted(self.name, mountpoint, mountpoint, self.kind)


class RootlessOverlay(KernelOverlay):
    """Kernel overlayfs as rootless podman mounts it: userxattr, so no redirect_dir, no metacopy."""

    name = "overlay-rootless"
    description = "kernel overlayfs, rootless options: userxattr (no redirect_dir, no metacopy)"
    extra_options = ("userxattr",)


def _tool_version(command: list[str], marker: str) -> str:
    """The first line of COMMAND's output that contains MARKER ("" when none)."""
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in (output.stdout + output.stderr).splitlines():
        if marker in line:
            return line.strip()
    return ""


class FuseDaemon(System):
    """A FUSE daemon started by one command line: mounted in the background for timing, or in
    the foreground with libfuse's debug output into a log for counting requests."""

    program = ""
    version_marker = ""
    needs_dev_fuse = True

    def command(
        self, stack: Stack, upper: Path, work: Path, mountpoint: Path, debug: bool
    ) -> list[str]:
        """The mount command; with ``debug`` it stays in the foreground and logs requests."""
        raise NotImplementedError

    def availability(self) -> str | None:
        if shutil.which(self.program) is None:
            return f"{self.program} not installed"
        if self.needs_dev_fuse and not os.access("/dev/fuse", os.R_OK | os.W_OK):
            return "/dev/fuse not usable"
        return None

    def version(self) -> str:
        return _tool_version([self.program, "--version"], self.version_marker)

    def mount(
        self,
        stack: Stack,
        upper: Path,
        work: Path,
        mountpoint: Path,
        writable: bool,
        timeout: float,
    ) -> Mounted:
        result = _run(self.command(stack, upper, work, mountpoint, False), timeout, cwd=REPO)
        if result.returncode != 0:
            detail = (result.stderr.strip() or result.stdout.strip())[-300:]
            if is_mounted(mountpoint):
                Mounted(self.name, mountpoint, mountpoint, self.kind).unmount()
            raise MountError(f"{self.name} mount exit {result.returncode}: {detail}")
        try:
            _wait_mounted(mountpoint, timeout)
        except MountError:
            raise MountError(f"{self.name} mount exited 0 but nothing is mounted") from None
        return self._mounted(mountpoint, find_daemon(mountpoint))

    def _mounted(self, mountpoint: Path, pid: int | None) -> Mounted:
        return Mounted(self.name, mountpoint, mountpoint, self.kind, pid=pid)

    def debug_mount(
        self, stack: Stack, upper: Path, work: Path, mountpoint: Path, log: Path, timeout: float
    ) -> Mounted:
        """Mount in the foreground, libfuse's debug output (one line per request) into LOG."""
        with open(log, "wb") as output:
            daemon = subprocess.Popen(
                self.command(stack, upper, work, mountpoint, True),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if time.monotonic() > deadline or daemon.poll() is not None:
                daemon.kill()
                daemon.wait()
                raise MountError(f"{self.name} (debug) did not mount; see {log}")
            time.sleep(0.01)
        mounted = Mounted(self.name, mountpoint, mountpoint, self.kind, pid=daemon.pid, log=log)
        mounted.process = daemon
        return mounted


class FuseOverlayfs(FuseDaemon):
    name = "fuse-overlayfs"
    description = "fuse-overlayfs (Debian package)"
    program = "fuse-overlayfs"
    version_marker = "fuse-overlayfs"

    def command(
        self, stack: Stack, upper: Path, work: Path, mountpoint: Path, debug: bool
    ) -> list[str]:
        lower = ":".join(str(layer) for layer in reversed(stack.layers))
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        return ["fuse-overlayfs", *(["-d"] if debug else []), "-o", options, str(mountpoint)]


class UnionfsFuse(FuseDaemon):
    name = "unionfs-fuse"
    description = "unionfs-fuse -o cow (Debian package)"
    program = "unionfs-fuse"
    version_marker = "unionfs-fuse version"
    needs_dev_fuse = False

    def command(
        self, stack: Stack, upper: Path, work: Path, mountpoint: Path, debug: bool
    ) -> list[str]:
        branches = ":".join([f"{upper}=RW", *(f"{layer}=RO" for layer in reversed(stack.layers))])
        return ["unionfs-fuse", *(["-d"] if debug else []), "-o", "cow", branches, str(mountpoint)]


class Unionfs(FuseDaemon):
    """This project: ``python -m unionfs mount --upper U --workdir W LAYER... MOUNTPOINT``."""

    name = "unionfs"
    description = "unionfs (this repository), python -m unionfs mount"
    extra_arguments: tuple[str, ...] = ()

    def availability(self) -> str | None:
        if not (REPO / "unionfs" / "__main__.py").exists():
            return "unionfs package missing"
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            return "/dev/fuse not usable"
        return None

    def version(self) -> str:
        script = (
            "import sys, pyfuse3, trio, unionfs; from unionfs import compiled; "
            "print('unionfs', getattr(unionfs, '__version__', '?'), '| python', "
            "sys.version.split()[0], '| pyfuse3', pyfuse3.__version__, '| trio', "
            "trio.__version__, '| build', compiled.build)"
        )
        return _tool_version([unionfs_python(), "-c", script], "unionfs")

    def command(
        self, stack: Stack, upper: Path, work: Path, mountpoint: Path, debug: bool
    ) -> list[str]:
        return [
            unionfs_python(),
            "-m",
            "unionfs",
            "mount",
            *(["-f", "--debug"] if debug else ["--log", str(mountpoint.parent / "unionfs.log")]),
            "--upper",
            str(upper),
            "--workdir",
            str(work),
            *self.extra_arguments,
            *(str(layer) for layer in stack.layers),
            str(mountpoint),
        ]

    def _mounted(self, mountpoint: Path, pid: int | None) -> Mounted:
        log = mountpoint.parent / "unionfs.log"
        return Mounted(self.name, mountpoint, mountpoint, self.kind, pid=pid, log=log)


ALL_SYSTEMS: dict[str, System] = {
    system.name: system
    for system in (
        Native(),
        KernelOverlay(),
        RootlessOverlay(),
        FuseOverlayfs(),
        UnionfsFuse(),
        Unionfs(),
    )
}
DEFAULT_SYSTEMS = (
    "native",
    "overlay",
    "overlay-rootless",
    "fuse-overlayfs",
    "unionfs-fuse",
    "unionfs",
)

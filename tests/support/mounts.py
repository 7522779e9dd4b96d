"""Mount helpers every test uses: mount, always unmount, never leave a daemon behind.

- :func:`unionfs_mounted` mounts ``python -m unionfs mount ... LAYER... MOUNTPOINT`` (layers base
  first) and yields the mountpoint; on exit it unmounts and fails the test if the daemon's log holds
  a ``Traceback``.
- :func:`fuse_overlayfs_mounted` does the same with ``fuse-overlayfs`` (a reference and a stand-in).
- :func:`overlay_mounted` mounts kernel overlayfs (needs root), the differential tests' oracle.

Teardown of a FUSE mount, in order until the mountpoint is gone: ``fusermount3 -u`` (retried: a
busy mount frees up once the last file closes), ``fusermount3 -uz`` (lazy), then ``umount -l`` as
root; the daemon is then waited for and killed (SIGTERM, then SIGKILL) if it still runs. The daemon
is found by the ``pid=N`` first line of its log, else by scanning ``/proc/*/cmdline`` for the
mountpoint. Whether a path is mounted is read from ``/proc/self/mountinfo`` (``os.path.ismount``
says False for a FUSE mount whose daemon died: its ``stat`` fails with ``ENOTCONN``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from unionfs.mountinfo import MountEntry, mount_table

MOUNT_TIMEOUT = 30.0
"""Seconds a mount command may take before the test fails."""

DAEMON_EXIT_TIMEOUT = 30.0
"""Seconds to wait for a daemon to exit after its mount is gone, before SIGTERM (generous: on a
loaded 2-core CI machine an exit has been seen to take over 10 s)."""

watchdog_seconds = 270.0
"""How long a test may keep a FUSE mount before the watchdog declares the daemon hung: it then
aborts the FUSE connection and kills the daemon, so that a test blocked in a syscall on the mount
(which no signal but SIGKILL interrupts, so pytest-timeout cannot) fails instead of hanging.
tests/conftest.py sets it a little below each test's pytest-timeout."""


def real_path(path: Path | str) -> str:
    """``os.path.realpath`` that never touches the last component.

    A mountpoint's last component is the mounted root: ``stat`` on it goes to the FUSE daemon and
    blocks for good if that daemon hangs. Every helper here resolves mountpoints this way.
    """
    absolute = os.path.abspath(path)
    parent, name = os.path.split(absolute)
    return os.path.join(os.path.realpath(parent), name) if name else absolute


def mount_entry(path: Path | str) -> MountEntry | None:
    """The topmost mount whose mountpoint is exactly ``path`` (resolved), or None."""
    wanted = real_path(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == wanted:
            found = entry
    return found


def is_mounted(path: Path | str) -> bool:
    """True if something is mounted on ``path`` (even a FUSE mount whose daemon died)."""
    return mount_entry(path) is not None


def mounts_under(root: Path | str) -> list[MountEntry]:
    """Every mount at or below ``root``."""
    prefix = real_path(root).rstrip("/") + "/"
    return [
        entry
        for entry in mount_table()
        if entry.mountpoint == prefix.rstrip("/") or entry.mountpoint.startswith(prefix)
    ]


# ---------------------------------------------------------------------------- daemons


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0") if arg]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    return stat.rpartition(")")[2].split()[0] != "Z"


def pid_from_log(log: Path | None) -> int | None:
    """The daemon's pid if the first line of its log is ``pid=N``."""
    if log is None:
        return None
    try:
        with open(log, encoding="utf-8", errors="replace") as file:
            first = file.readline().strip()
    except OSError:
        return None
    if first.startswith("pid=") and first[4:].isdigit():
        return int(first[4:])
    return None


def daemon_pids(mountpoint: Path | str, marker: str) -> list[int]:
    """Processes whose argv names ``mountpoint`` and the program ``marker``.

    ``marker`` ("unionfs", "fuse-overlayfs") must be a whole argument (``python -m unionfs``) or
    the last component of one (``/usr/bin/fuse-overlayfs``), not merely a part of a path.
    """
    names = {str(mountpoint), real_path(mountpoint)}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = _cmdline(int(entry))
        if not argv or not names.intersection(argv):
            continue
        if any(arg == marker or os.path.basename(arg) == marker for arg in argv):
            found.append(int(entry))
    return found


def find_daemons(mountpoint: Path | str, marker: str, log: Path | None = None) -> list[int]:
    """The daemons serving ``mountpoint``: the log's ``pid=N`` (if that process still names the
    mountpoint in its argv: a reused log may hold an old pid) and whatever :func:`daemon_pids`
    finds."""
    pids = daemon_pids(mountpoint, marker)
    logged = pid_from_log(log)
    if logged is not None and logged not in pids and _alive(logged):
        argv = _cmdline(logged) or []
        if {str(mountpoint), real_path(mountpoint)}.intersection(argv):
            pids.append(logged)
    return pids


def _stop_daemons(pids: Sequence[int], *, wait: float | None = None) -> list[int]:
    """Wait for the daemons to exit (``wait`` s, default DAEMON_EXIT_TIMEOUT), then SIGTERM,
    then SIGKILL. Returns the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + (DAEMON_EXIT_TIMEOUT if wait is None else wait)
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            for pid in pids:
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                        killed.append(pid)
            deadline = time.monotonic() + 5.0
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(_alive(pid) for pid in pids):
            break
    return killed


def run_command(
    argv: Sequence[str],
    *,
    timeout: float = MOUNT_TIMEOUT,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` with stdout/stderr captured through files, not pipes.

    A mount command forks its daemon, which may keep the command's stdout/stderr open: with pipes,
    ``subprocess.run(..., timeout=...)`` would wait for that daemon forever after the timeout.
    Raises ``subprocess.TimeoutExpired`` (with the output so far) like ``subprocess.run``.
    """

    def read(file: IO[bytes]) -> str:
        file.seek(0)
        return file.read().decode(errors="replace")

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            result = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=timeout,
                check=False,
                cwd=cwd,
                env=env,
            )
        except subprocess.TimeoutExpired as error:
            raise subprocess.TimeoutExpired(
                error.cmd, error.timeout, output=read(out), stderr=read(err)
            ) from None
        return subprocess.CompletedProcess(list(argv), result.returncode, read(out), read(err))


def _run_quiet(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return run_command(argv)
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(list(argv), -9, error.output, f"timed out: {error}")


FUSECTL = Path("/sys/fs/fuse/connections")


def ensure_fusectl() -> bool:
    """Mount the fusectl filesystem at /sys/fs/fuse/connections if it is not (root only; a fresh
    machine has it unmounted, and nothing else mounts it). True when it is mounted now."""
    if mount_entry(FUSECTL) is not None:
        return True
    if os.geteuid() != 0 or not FUSECTL.is_dir():
        return False
    result = _run_quiet(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)])
    return result.returncode == 0 or mount_entry(FUSECTL) is not None


def abort_connection(mountpoint: Path | str) -> bool:
    """Abort a FUSE mount's connection (root only): every request pending or to come fails with
    ENOTCONN, which frees whatever is blocked on a hung daemon. True if it was aborted. Mounts
    fusectl first when it is missing (see ``ensure_fusectl``)."""
    entry = mount_entry(mountpoint)
    if entry is None or not entry.fstype.startswith("fuse") or ":" not in entry.device:
        return False
    ensure_fusectl()
    abort = FUSECTL / entry.device.split(":")[1] / "abort"
    try:
        abort.write_text("1")
    except OSError:
        return False
    return True


def holders_elsewhere(device: str) -> list[str]:
    """Processes in other mount namespaces that still have the filesystem ``device`` mounted.

    Creating a mount namespace (``unshare``, containers, ``unionfs run``) copies every mount of the
    parent; such a copy keeps a FUSE filesystem alive after it is unmounted here, and its daemon
    rightly goes on serving it. Returns ``"PID COMMAND"`` for one process per such namespace.
    """
    own = os.readlink("/proc/self/ns/mnt")
    seen = {own}
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            namespace = os.readlink(f"/proc/{entry}/ns/mnt")
            if namespace in seen:
                continue
            seen.add(namespace)
            with open(f"/proc/{entry}/mountinfo", encoding="utf-8", errors="replace") as table:
                if any(line.split()[2] == device for line in table if line.strip()):
                    argv = _cmdline(int(entry)) or ["?"]
                    holders.append(f"{entry} {' '.join(argv)[:100]}")
        except (OSError, IndexError):
            continue
    return holders


def unmount_fuse(
    mountpoint: Path | str, *, pids: Sequence[int] = (), device: str | None = None
) -> list[str]:
    """Unmount a FUSE mount by every means, then make sure its daemons are gone.

    Returns notes of what it had to force (empty when ``fusermount3 -u`` sufficed and every daemon
    exited by itself); raises AssertionError only if the mount cannot be removed at all. A daemon
    whose filesystem another mount namespace still holds (see :func:`holders_elsewhere`; ``device``
    is the mount's ``MAJOR:MINOR``) is stopped with SIGTERM at once, and that is no failure.
    """
    notes: list[str] = []
    if device is None:
        entry = mount_entry(mountpoint)
        device = entry.device if entry is not None else None
    for attempt in range(5):
        if not is_mounted(mountpoint):
            break
        result = _run_quiet(["fusermount3", "-u", str(mountpoint)])
        if result.returncode == 0:
            break
        if result.returncode == -9:
            # fusermount3 itself hung on the mount: the daemon does not answer.
            notes.append("fusermount3 -u timed out: the daemon hangs; aborted its connection")
            abort_connection(mountpoint)
            _stop_daemons(pids, wait=0.0)
        if attempt == 4:
            notes.append(f"fusermount3 -u failed: {result.stderr.strip()}")
        time.sleep(0.1 * (attempt + 1))
    if is_mounted(mountpoint):
        result = _run_quiet(["fusermount3", "-uz", str(mountpoint)])
        notes.append(f"needed fusermount3 -uz (rc {result.returncode})")
    if is_mounted(mountpoint) and os.geteuid() == 0:
        result = _run_quiet(["umount", "-l", str(mountpoint)])
        notes.append(f"needed umount -l (rc {result.returncode})")
    if device is not None and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
        holders = holders_elsewhere(device) if any(_alive(pid) for pid in pids) else []
        if holders:
            notes.append(
                "the filesystem lives on in another mount namespace (held by "
                + "; ".join(holders[:3])
                + "): its daemon was stopped with SIGTERM"
            )
            _stop_daemons(pids, wait=0.0)
    killed = _stop_daemons(pids)
    if killed:
        notes.append(
            f"daemon did not exit within {DAEMON_EXIT_TIMEOUT:.0f} s of the unmount; "
            f"killed pids {killed}"
        )
    if is_mounted(mountpoint):
        raise AssertionError(f"could not unmount {mountpoint}: {'; '.join(notes)}")
    return notes


# ---------------------------------------------------------------------------- FUSE mounts


def _log_text(log: Path) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def fuse_mounted(
    argv: Sequence[str],
    mountpoint: Path,
    *,
    marker: str,
    log: Path | None = None,
    check_log: bool = True,
) -> Iterator[Path]:
    """Run a FUSE mount command that returns once the mount is live; always clean up.

    ``marker`` is a string in the daemon's argv (used to find it if its log has no ``pid=N``).
    With ``check_log``, a ``Traceback`` in ``log`` fails the test at teardown.
    """
    mountpoint = Path(mountpoint)
    try:
        result = _run_quiet(argv)
    except subprocess.TimeoutExpired as error:
        pids = find_daemons(mountpoint, marker, log)
        notes = unmount_fuse(mountpoint, pids=pids)
        raise AssertionError(
            f"mount command did not return within {MOUNT_TIMEOUT:.0f} s: {list(argv)}\n"
            f"stderr: {error.stderr!r}\ncleanup: {notes}"
            + (f"\nlog tail:\n{_tail(_log_text(log))}" if log else "")
        ) from None
    if result.returncode != 0 or not is_mounted(mountpoint):
        pids = find_daemons(mountpoint, marker, log)
        notes = unmount_fuse(mountpoint, pids=pids)
        problem = (
            f"exit code {result.returncode}"
            if result.returncode != 0
            else "exit 0 but the mountpoint is not a mount"
        )
        raise AssertionError(
            f"mount failed ({problem}): {list(argv)}\nstderr: {result.stderr.strip()}\n"
            f"cleanup: {notes}" + (f"\nlog tail:\n{_tail(_log_text(log))}" if log else "")
        )
    # Find the daemon now, while its argv is certain to be there.
    pids = find_daemons(mountpoint, marker, log)
    entry = mount_entry(mountpoint)
    device = entry.device if entry is not None else None
    hung = threading.Event()

    def declare_hung() -> None:
        hung.set()
        abort_connection(mountpoint)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    watchdog = threading.Timer(watchdog_seconds, declare_hung)
    watchdog.daemon = True
    watchdog.start()
    hung_note = (
        f"the mount was still in use after {watchdog_seconds:.0f} s (a hung daemon?): the "
        "watchdog aborted its FUSE connection and killed the daemon"
    )
    failed = True
    try:
        yield mountpoint
        failed = False
    except BaseException as error:
        text = _log_text(log) if log else ""
        if "Traceback" in text:
            error.add_note(f"the daemon logged a traceback ({log}):\n{_tail(text)}")
        if hung.is_set():
            error.add_note(hung_note)
        raise
    finally:
        watchdog.cancel()
        notes = unmount_fuse(mountpoint, pids=pids, device=device)
        if not failed and hung.is_set():
            raise AssertionError(hung_note)
        if not failed and check_log and log is not None:
            text = _log_text(log)
            if "Traceback" in text:
                raise AssertionError(f"the daemon logged a traceback ({log}):\n{_tail(text, 80)}")
        if not failed and any("killed" in note for note in notes):
            raise AssertionError(
                f"unmount of {mountpoint} needed force: {'; '.join(notes)}"
                + (f"\nlog tail:\n{_tail(_log_text(log))}" if log else "")
            )


def unionfs_command(
    layers: Sequence[Path],
    mountpoint: Path,
    *,
    upper: Path | None = None,
    workdir: Path | None = None,
    options: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    log: Path | None = None,
) -> list[str]:
    """The argv of ``python -m unionfs mount`` for these arguments (layers base first)."""
    argv = [sys.executable, "-m", "unionfs", "mount"]
    if log is not None:
        argv += ["--log", str(log)]
    if upper is not None:
        argv += ["--upper", str(upper)]
    if workdir is not None:
        argv += ["--workdir", str(workdir)]
    if options:
        argv += ["-o", ",".join(options)]
    argv += [*extra_args, *(str(layer) for layer in layers), str(mountpoint)]
    return argv


def default_log(mountpoint: Path) -> Path:
    """Where a mount's log goes when the test gives none: a sibling file of the mountpoint."""
    return mountpoint.with_name(mountpoint.name + ".unionfs.log")


@contextlib.contextmanager
def unionfs_mounted(
    layers: Sequence[Path],
    mountpoint: Path,
    *,
    upper: Path | None = None,
    workdir: Path | None = None,
    options: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    log: Path | None = None,
) -> Iterator[Path]:
    """Mount unionfs over ``layers`` (base first) on ``mountpoint``; unmount on exit.

    Fails (AssertionError) if the mount command does not exit 0 within 30 s with the mount live,
    if the daemon has to be killed after unmounting, or if its log contains a ``Traceback``.
    """
    mountpoint = Path(mountpoint)
    log = default_log(mountpoint) if log is None else Path(log)
    argv = unionfs_command(
        layers,
        mountpoint,
        upper=upper,
        workdir=workdir,
        options=options,
        extra_args=extra_args,
        log=log,
    )
    with fuse_mounted(argv, mountpoint, marker="unionfs", log=log) as mounted:
        yield mounted


@contextlib.contextmanager
def fuse_overlayfs_mounted(
    lowers_base_first: Sequence[Path],
    mountpoint: Path,
    *,
    upper: Path | None = None,
    workdir: Path | None = None,
    options: Sequence[str] = (),
) -> Iterator[Path]:
    """Mount fuse-overlayfs (the reference FUSE implementation); unmount on exit."""
    program = shutil.which("fuse-overlayfs")
    if program is None:
        raise AssertionError("fuse-overlayfs is not installed (run scripts/setup --test)")
    option_list = ["lowerdir=" + ":".join(str(p) for p in reversed(lowers_base_first))]
    if upper is not None:
        if workdir is None:
            raise ValueError("fuse-overlayfs needs a workdir with an upper")
        option_list += [f"upperdir={upper}", f"workdir={workdir}"]
    option_list += options
    argv = [program, "-o", ",".join(option_list), str(mountpoint)]
    with fuse_mounted(argv, Path(mountpoint), marker="fuse-overlayfs") as mounted:
        yield mounted


# ---------------------------------------------------------------------------- kernel overlayfs


def _check_overlay_path(path: Path) -> str:
    text = os.path.realpath(path)
    if any(char in text for char in ":,\\\n"):
        raise ValueError(f"overlayfs option paths cannot contain ':', ',' or '\\': {text!r}")
    return text


@contextlib.contextmanager
def overlay_mounted(
    lowers_base_first: Sequence[Path],
    mountpoint: Path,
    *,
    upper: Path | None = None,
    workdir: Path | None = None,
    options: Sequence[str] = ("redirect_dir=on", "index=on"),
    data_layers: Sequence[Path] = (),
) -> Iterator[Path]:
    """Mount kernel overlayfs (root only); read-only when ``upper`` is None. Unmount on exit.
    ``data_layers``: data-only lower layers (``lowerdir=TOP:...:BASE::DATA1::DATA2``, 6.5+).

    Layers are given base first, as everywhere in the tests; the kernel's ``lowerdir`` lists them
    top first. Without an upper, the kernel wants two lowers: a single lower gets an empty one
    below it. ``index=on`` is dropped without an upper (the kernel ignores it there, noisily).
    """
    if not lowers_base_first:
        raise ValueError("overlay_mounted needs at least one lower layer")
    mountpoint = Path(mountpoint)
    with contextlib.ExitStack() as stack:
        lowers = [Path(p) for p in lowers_base_first]
        option_list = [option for option in options if upper is not None or option != "index=on"]
        if upper is None and len(lowers) == 1:
            empty = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".empty-lower-", dir=mountpoint.parent)
            )
            lowers.insert(0, Path(empty))
        lowerdir = ":".join(_check_overlay_path(p) for p in reversed(lowers))
        lowerdir += "".join("::" + _check_overlay_path(p) for p in data_layers)
        mount_options = ["lowerdir=" + lowerdir]
        if upper is not None:
            if workdir is None:
                raise ValueError("kernel overlayfs needs a workdir with an upper")
            mount_options += [
                f"upperdir={_check_overlay_path(upper)}",
                f"workdir={_check_overlay_path(workdir)}",
            ]
        mount_options += option_list
        argv = ["mount", "-t", "overlay", "overlay", "-o", ",".join(mount_options), str(mountpoint)]
        result = _run_quiet(argv)
        if result.returncode != 0:
            raise AssertionError(
                f"kernel overlayfs mount failed (rc {result.returncode}): {argv}\n"
                f"{result.stderr.strip()}"
            )
        try:
            yield mountpoint
        finally:
            if _run_quiet(["umount", str(mountpoint)]).returncode != 0:
                _run_quiet(["umount", "-l", str(mountpoint)])
            if is_mounted(mountpoint):
                raise AssertionError(f"could not unmount kernel overlayfs on {mountpoint}")


def overlay_available(scratch: Path) -> str | None:
    """None if kernel overlayfs can be mounted here (probed in ``scratch``), else the reason."""
    if os.geteuid() != 0:
        return "kernel overlayfs needs root"
    if shutil.which("mount") is None:
        return "mount(8) not found"
    scratch.mkdir(parents=True, exist_ok=True)
    lower = scratch / "lower"
    upper = scratch / "upper"
    work = scratch / "work"
    merged = scratch / "merged"
    for path in (lower, upper, work, merged):
        path.mkdir(exist_ok=True)
    (lower / "probe").write_text("probe\n")
    try:
        with overlay_mounted([lower], merged, upper=upper, workdir=work):
            if (merged / "probe").read_text() != "probe\n":
                return "kernel overlayfs mounted but did not show the lower layer"
    except AssertionError as error:
        return f"kernel overlayfs does not mount here: {str(error).splitlines()[-1]}"
    return None

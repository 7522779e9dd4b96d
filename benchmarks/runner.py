"""The protocol: a fresh mount and a fresh upper per sample, systems interleaved and rotated.

Round r runs every workload; for each workload every system back to back, in the system order
rotated by r. A sample = make upper/workdir/mountpoint on the upper's filesystem (a tmpfs this
run mounts, or an ext4 directory), mount, untimed ``prepare``, drop caches if cold, timed ``run``,
unmount in ``finally``, remove the sample directory (never while anything below it is mounted).
A (workload, system) pair that failed once is not retried in later rounds. A system whose probe
mount fails is n/a for the whole run.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import dataset as dataset_module
from benchmarks.dataset import CACHE_ROOT, Dataset, Scale
from benchmarks.stats import rotate
from benchmarks.systems import (
    REPO,
    FuseDaemon,
    Mounted,
    MountError,
    System,
    abort_fuse,
    is_mounted,
    unionfs_python,
)
from benchmarks.workloads import Context, Workload, WorkloadError, WorkloadTimeout, verify
from unionfs import mountinfo

SCRATCH_ROOT = Path("/tmp/unionfs-bench")
MOUNT_TIMEOUT = 60.0
# Daemon logs of failed samples are kept here (gitignored) for the post-mortem.
FAILED_LOGS = Path(__file__).resolve().parent / "results" / "tmp"
# The daemons whose requests are counted (same libfuse, same debug line per request).
COUNTED_SYSTEMS = ("fuse-overlayfs", "unionfs")
OPCODE = re.compile(rb"opcode: (\w+)")


def count_opcodes(log: Path, offset: int) -> dict[str, int]:
    """Requests by opcode that libfuse's debug output logged after byte OFFSET of LOG."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        counts = collections.Counter(
            match.group(1).decode() for match in OPCODE.finditer(handle.read())
        )
    return dict(counts.most_common())


@dataclass
class RunConfig:
    scale: Scale
    rounds: int
    workloads: list[Workload]
    systems: list[System]
    timeout: float
    seed: int = dataset_module.SEED
    verbose: bool = True
    # After the timed rounds, one more sample per workload on fuse-overlayfs and unionfs mounted
    # with libfuse's debug output, to count the requests of the timed step by opcode.
    count_requests: bool = True


@dataclass
class Results:
    samples: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # CPU seconds the FUSE daemon (all its threads) used during each timed step.
    daemon_cpu: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    # Requests of the timed step by opcode (one debug-mounted sample): workload -> system -> ...
    requests: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)


def daemon_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process PID so far (None when unknown)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields 14-17 of stat: utime, stime, cutime, cstime (ticks); after ")" they are 11-14.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _mounts_below(directory: Path) -> list[str]:
    prefix = str(directory).rstrip("/") + "/"
    return [
        mountpoint
        for mountpoint in mountinfo.mount_points()
        if mountpoint == str(directory) or mountpoint.startswith(prefix)
    ]


def _force_unmount(mountpoint: str) -> None:
    path = Path(mountpoint)
    abort_fuse(path)
    for command in (["fusermount3", "-uz", mountpoint], ["umount", "-l", mountpoint]):
        if not is_mounted(path):
            return
        subprocess.run(command, capture_output=True, check=False, timeout=30)


def remove_scratch(directory: Path) -> bool:
    """rm -rf DIRECTORY unless something is still mounted below it (then False)."""
    for mountpoint in sorted(_mounts_below(directory), key=len, reverse=True):
        _force_unmount(mountpoint)
    if _mounts_below(directory):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def drop_caches() -> bool:
    """sync, then drop the page, dentry and inode caches (root only)."""
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=False, timeout=120)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> None:
    """Unmount and remove what crashed earlier runs left behind."""
    for parent in (SCRATCH_ROOT, CACHE_ROOT):
        if not parent.exists():
            continue
        for entry in parent.iterdir():
            name = entry.name
            if parent == CACHE_ROOT:
                if not name.startswith("scratch-"):
                    continue
                name = name[len("scratch-") :]
            if not name.isdigit() or _pid_alive(int(name)):
                continue
            remove_scratch(entry)
            with contextlib.suppress(OSError):
                if entry.exists():
                    entry.rmdir()


@contextlib.contextmanager
def scratch_filesystems() -> Iterator[dict[str, Path]]:
    """A tmpfs (mounted for this run when root) and an ext4 directory for uppers."""
    own = SCRATCH_ROOT / str(os.getpid())
    ext4 = CACHE_ROOT / f"scratch-{os.getpid()}"
    own.mkdir(parents=True, exist_ok=True)
    ext4.mkdir(parents=True, exist_ok=True)
    tmpfs = own / "tmpfs"
    tmpfs.mkdir(exist_ok=True)
    mounted_tmpfs = False
    if os.geteuid() == 0:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16g,mode=0755", "bench-tmpfs", str(tmpfs)],
            capture_output=True,
            check=False,
        )
        mounted_tmpfs = result.returncode == 0
    if not mounted_tmpfs:
        tmpfs = Path("/dev/shm") / f"unionfs-bench-{os.getpid()}"
        tmpfs.mkdir(exist_ok=True)
    try:
        yield {"tmpfs": tmpfs, "ext4": ext4}
    finally:
        for directory in (tmpfs, ext4):
            for child in list(directory.iterdir()) if directory.exists() else []:
                remove_scratch(child)
        if mounted_tmpfs:
            subprocess.run(["umount", str(tmpfs)], capture_output=True, check=False)
            if is_mounted(tmpfs):
                subprocess.run(["umount", "-l", str(tmpfs)], capture_output=True, check=False)
        if not _mounts_below(own):
            shutil.rmtree(own, ignore_errors=True)
        if not _mounts_below(ext4):
            shutil.rmtree(ext4, ignore_errors=True)
        if not mounted_tmpfs and not _mounts_below(tmpfs):
            shutil.rmtree(tmpfs, ignore_errors=True)


def _filesystem_type(path: Path) -> str:
    result = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


@contextlib.contextmanager
def run_lock() -> Iterator[None]:
    """One benchmark run at a time on this machine."""
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    with open(SCRATCH_ROOT / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                "bench: another benchmark run holds /tmp/unionfs-bench/.lock"
            ) from None
        yield


class Runner:
    def __init__(self, config: RunConfig, data: Dataset, scratch: dict[str, Path]) -> None:
        self.config = config
        self.data = data
        self.scratch = scratch
        self.results = Results()
        self.failed: set[tuple[str, str]] = set()
        self.cpu_sample: float | None = None

    def say(self, message: str) -> None:
        if self.config.verbose:
            print(message, flush=True)

    def probe(self) -> list[System]:
        """The systems that can mount the small 'empty' stack; the others are n/a."""
        usable = []
        for system in self.config.systems:
            reason = system.availability()
            if reason is None and system.kind != "native":
                reason = self._probe_mount(system)
            if reason is None:
                usable.append(system)
            else:
                self.results.unavailable[system.name] = reason
                self.say(f"bench: {system.name}: n/a ({reason})")
        return usable

    def _probe_mount(self, system: System) -> str | None:
        base = self.scratch["tmpfs"] / f"probe.{system.name}"
        paths = [base / "upper", base / "work", base / "mnt"]
        for path in paths:
            path.mkdir(parents=True)
        mounted: Mounted | None = None
        try:
            mounted = system.mount(
                self.data.stack("empty"), paths[0], paths[1], paths[2], True, self.config.timeout
            )
            # In a child with a timeout: a hung daemon must not hang the harness.
            listing = subprocess.run(
                ["ls", "-A", str(mounted.root)],
                capture_output=True,
                text=True,
                timeout=self.config.timeout,
                check=False,
            )
            names = listing.stdout.split()
            if "dest" not in names:
                return f"probe mount shows {sorted(names)}, not the layers"
            write = subprocess.run(
                ["cp", "/dev/null", str(mounted.root / "dest" / "probe")],
                capture_output=True,
                text=True,
                timeout=self.config.timeout,
                check=False,
            )
            if write.returncode != 0:
                return f"probe write failed: {write.stderr.strip()}"
            return None
        except subprocess.TimeoutExpired:
            abort_fuse(paths[2])
            return "probe mount hung"
        except (MountError, OSError) as error:
            return f"mount failed: {error}"
        finally:
            if mounted is not None:
                mounted.unmount()
            remove_scratch(base)

    def run(self) -> Results:
        systems = self.probe()
        names = [system.name for system in systems]
        by_name = {system.name: system for system in systems}
        for workload in self.config.workloads:
            for row in workload.rows:
                self.results.samples[row] = {
                    name: [] for name in names if workload.applies_to(name)
                }
        for round_index in range(self.config.rounds):
            order = rotate(names, round_index)
            for workload in self.config.workloads:
                skip = workload.missing_requirement()
                for name in order:
                    if not workload.applies_to(name):
                        continue
                    if skip is not None:
                        self._record(workload, name, None, skip)
                        continue
                    if (workload.name, name) in self.failed:
                        self._record(workload, name, None, None)
                        continue
                    values, error = self.sample(workload, by_name[name], round_index)
                    self._record(workload, name, values, error)
                    shown = (
                        "FAILED: " + (error or "")[:160]
                        if values is None
                        else "  ".join(
                            f"{value:.4g} {unit}"
                            for value, unit in zip(values, workload.units, strict=True)
                        )
                    )
                    self.say(
                        f"[{round_index + 1}/{self.config.rounds}] {workload.name:<16} "
                        f"{name:<17} {shown}"
                    )
        if self.config.count_requests:
            self.count_requests(by_name)
        return self.results

    def count_requests(self, by_name: dict[str, System]) -> None:
        """One more sample of every workload on the counted daemons, mounted with debug output:
        the requests of the timed step by opcode. Not timed (the debug output slows a daemon);
        CPU per request is the timed rounds' median daemon CPU over this count."""
        for workload in self.config.workloads:
            if workload.own_daemons or workload.missing_requirement() is not None:
                continue
            for name in COUNTED_SYSTEMS:
                system = by_name.get(name)
                if not isinstance(system, FuseDaemon) or not workload.applies_to(name):
                    continue
                if (workload.name, name) in self.failed:
                    continue
                counts, error = self.sample(workload, system, -1, debug=True)
                if counts is None:
                    self.say(f"[requests] {workload.name:<16} {name:<17} FAILED: {error}")
                    continue
                self.results.requests.setdefault(workload.name, {})[name] = counts
                top = ", ".join(f"{op} {n}" for op, n in list(counts.items())[:4])
                self.say(
                    f"[requests] {workload.name:<16} {name:<17} {sum(counts.values())} ({top})"
                )

    def _record(
        self, workload: Workload, system: str, values: list[float] | None, error: str | None
    ) -> None:
        cpu = self.results.daemon_cpu.setdefault(workload.name, {}).setdefault(system, [])
        cpu.append(self.cpu_sample if values is not None else None)
        self.cpu_sample = None
        for index, row in enumerate(workload.rows):
            value = None if values is None else values[index]
            self.results.samples[row][system].append(value)
        if error is not None:
            self.failed.add((workload.name, system))
            self.results.errors.setdefault(workload.name, {}).setdefault(system, error)

    def _keep_log(self, base: Path, workload: Workload, system: System, round_index: int) -> str:
        """Copy a failed sample's daemon log out of the scratch directory; say where."""
        log = base / "unionfs.log"
        if not log.exists():
            return ""
        FAILED_LOGS.mkdir(parents=True, exist_ok=True)
        kept = FAILED_LOGS / f"{workload.name}.{system.name}.{round_index}.log"
        shutil.copyfile(log, kept)
        return f" (daemon log: {kept})"

    @typing.overload
    def sample(
        self, workload: Workload, system: System, round_index: int
    ) -> tuple[list[float] | None, str | None]: ...

    @typing.overload
    def sample(
        self, workload: Workload, system: FuseDaemon, round_index: int, debug: typing.Literal[True]
    ) -> tuple[dict[str, int] | None, str | None]: ...

    def sample(
        self, workload: Workload, system: System, round_index: int, debug: bool = False
    ) -> tuple[list[float] | dict[str, int] | None, str | None]:
        """One sample: mount, prepare, (drop caches), the timed step, verify, unmount. Its
        values; with ``debug`` (a FuseDaemon) the timed step's requests by opcode instead."""
        label = "requests" if debug else str(round_index)
        base = self.scratch[workload.upperfs] / f"{workload.name}.{system.name}.{label}"
        upper, work, mountpoint = base / "upper", base / "work", base / "mnt"
        for path in (upper, work, mountpoint):
            path.mkdir(parents=True)
        mounted: Mounted | None = None
        self.cpu_sample = None
        try:
            stack = self.data.stack(workload.stack)
            if debug:
                assert isinstance(system, FuseDaemon)
                mounted = system.debug_mount(
                    stack, upper, work, mountpoint, base / "debug.log", MOUNT_TIMEOUT
                )
            else:
                mounted = system.mount(
                    stack, upper, work, mountpoint, workload.writable, MOUNT_TIMEOUT
                )
            context = Context(self.data, mounted, self.config.timeout, base)
            if workload.prepare is not None:
                workload.prepare(context)
            if workload.cold:
                drop_caches()
            if debug:
                assert mounted.log is not None
                time.sleep(0.2)  # what the kernel sends after prepare (forgets) lands first
                offset = mounted.log.stat().st_size
                workload.run(context)
                time.sleep(0.2)
                return count_opcodes(mounted.log, offset), None
            cpu_before = None if workload.own_daemons else daemon_cpu_seconds(mounted.pid)
            values = workload.run(context)
            cpu_after = daemon_cpu_seconds(mounted.pid)
            if cpu_before is not None and cpu_after is not None:
                self.cpu_sample = cpu_after - cpu_before
            if workload.verify is not None:
                verify(context, workload.verify(context))
            if mounted.log is not None and mounted.log.exists():
                text = mounted.log.read_text(errors="replace")
                if "Traceback" in text:
                    return values, "daemon logged a Traceback: " + text[text.index("Traceback") :][
                        :300
                    ]
            return values, None
        except WorkloadTimeout as error:
            abort_fuse(mountpoint)
            return None, str(error) + self._keep_log(base, workload, system, round_index)
        except (MountError, WorkloadError, OSError) as error:
            kept = self._keep_log(base, workload, system, round_index)
            return None, f"{type(error).__name__}: {error}{kept}"
        finally:
            if mounted is not None:
                mounted.unmount()
            if is_mounted(mountpoint):
                _force_unmount(str(mountpoint))
            if not remove_scratch(base):
                self.say(f"bench: could not clean {base}: still mounted")


def versions(systems: list[System]) -> dict[str, str]:
    found: dict[str, str] = {
        "kernel": platform.release(),
        "python (harness)": platform.python_version(),
        "unionfs python": unionfs_python(),
    }
    for system in systems:
        text = system.version()
        if text:
            found[system.name] = text
    try:
        fio = subprocess.run(["fio", "--version"], capture_output=True, text=True, timeout=10)
        found["fio"] = fio.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    found["git"] = git.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "unionfs"],
        capture_output=True,
        text=True,
        check=False,
    )
    if dirty.stdout.strip():
        found["git"] += " (unionfs/ has uncommitted changes)"
    return found


def machine() -> dict[str, Any]:
    memory = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        memory = meminfo.readline().split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(),
        "memory": memory,
        "root": os.geteuid() == 0,
        "argv": sys.argv[1:],
    }


def execute(config: RunConfig) -> Results:
    """Generate (or reuse) the data set, run every round, return the raw results."""
    with run_lock():
        clean_stale()
        data = dataset_module.ensure(config.scale, config.seed, log=config.verbose)
        started = time.time()
        load_before = os.getloadavg()
        with scratch_filesystems() as scratch:
            runner = Runner(config, data, scratch)
            results = runner.run()
            results.meta = {
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "duration_s": round(time.time() - started, 1),
                "scale": config.scale.name,
                "rounds": config.rounds,
                "timeout_s": config.timeout,
                "seed": config.seed,
                "dataset": {"version": dataset_module.VERSION, **data.manifest},
                "loadavg_before": [round(value, 2) for value in load_before],
                "loadavg_after": [round(value, 2) for value in os.getloadavg()],
                "versions": versions(config.systems),
                "machine": machine(),
                "upper_filesystems": {
                    name: _filesystem_type(path) for name, path in scratch.items()
                },
                "caches_dropped": os.geteuid() == 0,
            }
        return results

"""The workloads of issue 4, one ``Workload`` per measurement (a few yield two rows).

A workload names the stack it mounts, whether it writes (the native system then gets a private
copy of the merged tree on the upper's filesystem), whether it is cold (caches dropped after the
mount and after ``prepare``), an untimed ``prepare`` step and the timed ``run`` step. Every
command runs in a child process with the sample's timeout; times come from the child itself
(``benchmarks.actions``) or from the wall clock around the child.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import podman
from benchmarks.dataset import MIB, Dataset, Scale, lookup_counts
from benchmarks.systems import REPO, Mounted


class WorkloadError(Exception):
    """A workload's command failed (the message says how)."""


class WorkloadTimeout(WorkloadError):
    """A workload's command ran past the sample timeout."""


@dataclass
class Context:
    """What a workload step gets: the data set, the live mount and the time limit."""

    dataset: Dataset
    mounted: Mounted
    timeout: float
    scratch: Path

    @property
    def root(self) -> Path:
        return self.mounted.root


@dataclass
class Workload:
    name: str
    title: str
    stack: str
    run: Callable[[Context], list[float]]
    prepare: Callable[[Context], None] | None = None
    verify: Callable[[Context], list[str]] | None = None
    cold: bool = False
    writable: bool = False
    upperfs: str = "tmpfs"
    units: tuple[str, ...] = ("s",)
    rows: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    daemon_only: bool = False
    rootless: bool = False
    group: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    # Only these systems (empty: every system the other flags allow).
    systems: tuple[str, ...] = ()
    # The step starts daemons of its own (podman's mount_program): the mounted daemon's CPU and
    # requests say nothing about it, so neither is measured.
    own_daemons: bool = False
    # Why the workload cannot run here (None: it can), asked once per run.
    probe: Callable[[], str | None] | None = None

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = (self.name,)

    def applies_to(self, system: str) -> bool:
        if self.systems and system not in self.systems:
            return False
        if self.daemon_only and system in ("native", "overlay", "overlay-rootless"):
            return False
        return not (system == "overlay-rootless" and not self.rootless)

    def missing_requirement(self) -> str | None:
        for requirement in self.requires:
            if requirement == "root":
                if os.geteuid() != 0:
                    return "needs root"
            elif shutil.which(requirement) is None:
                return f"{requirement} not installed"
        return None if self.probe is None else self.probe()


# ---------------------------------------------------------------- helpers


def timed(context: Context, command: list[str], cwd: Path | None = None) -> float:
    """Wall-clock seconds of COMMAND (output discarded); WorkloadError if it fails."""
    started = time.perf_counter()
    _run(context, command, cwd)
    return time.perf_counter() - started


def _run(context: Context, command: list[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=context.timeout,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise WorkloadTimeout(f"{command[0]} timed out after {context.timeout:.0f} s") from error
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise WorkloadError(f"{' '.join(command[:3])}: exit {result.returncode}: {detail}")
    return result.stdout.decode(errors="replace")


def action(context: Context, name: str, *arguments: str | Path) -> float:
    """Seconds reported by ``python -m benchmarks.actions NAME ARGUMENTS``."""
    output = _run(
        context,
        [sys.executable, "-m", "benchmarks.actions", name, *(str(a) for a in arguments)],
        cwd=REPO,
    )
    return float(output.strip().splitlines()[-1])


def verify(context: Context, specs: list[str]) -> None:
    """Untimed check that the workload did what it claims (a fast wrong answer is no win)."""
    _run(
        context,
        [sys.executable, "-m", "benchmarks.actions", "check", str(context.root), *specs],
        cwd=REPO,
    )


def _tree_samples(context: Context) -> list[str]:
    """A few files of the tree, spread over it (relative paths)."""
    with open(context.dataset.tree_paths) as handle:
        files = [line.strip() for line in handle if line.strip().endswith(".txt")]
    step = max(1, len(files) // 5)
    return files[::step][:5]


def _check_rename(context: Context) -> list[str]:
    moved = [f"exists:t-renamed/{path[len('t/') :]}" for path in _tree_samples(context)]
    return ["absent:t", *moved]


def _check_chmod(context: Context) -> list[str]:
    return [f"modebits:{path}:020" for path in _tree_samples(context)]


def _check_chown(context: Context) -> list[str]:
    return [f"uid:{path}:1234" for path in _tree_samples(context)]


def _check_removed(context: Context) -> list[str]:
    return ["absent:t"]


def _check_size(name: str, size: Callable[[Dataset], int]) -> Callable[[Context], list[str]]:
    def check(context: Context) -> list[str]:
        return [f"size:{name}:{size(context.dataset) + 1}"]

    return check


def _check_untar(context: Context) -> list[str]:
    last = context.dataset.scale.tar_files - 1
    return [
        "exists:dest/src/p00/file00000.py",
        f"exists:dest/src/p{last % 50:02d}/file{last:05d}.py",
    ]


def quiet(command: list[str]) -> Callable[[Context], list[float]]:
    def run(context: Context) -> list[float]:
        return [timed(context, [part.format(root=context.root) for part in command])]

    return run


def twice(run: Callable[[Context], list[float]]) -> Callable[[Context], None]:
    """A prepare step that does the timed step once, untimed: what makes a 'warm' workload."""

    def prepare(context: Context) -> None:
        run(context)

    return prepare


# ---------------------------------------------------------------- workload steps


def _find(context: Context) -> list[float]:
    return [timed(context, ["find", str(context.root / "t")])]


def _stat_tree(context: Context) -> list[float]:
    return [action(context, "stat-all", context.root, context.dataset.tree_paths)]


def _ls_f(context: Context) -> list[float]:
    return [timed(context, ["ls", "-f", str(context.root / "big")])]


def _ls_l(context: Context) -> list[float]:
    return [timed(context, ["ls", "-l", str(context.root / "big")])]


def _read_big(context: Context) -> list[float]:
    return [action(context, "read", context.root / "big.bin")]


def _container(context: Context) -> list[float]:
    python = context.dataset.python_in_rootfs
    command = [
        "env",
        "-i",
        "PATH=/bin:/usr/bin",
        "HOME=/",
        "PYTHONDONTWRITEBYTECODE=1",
        shutil.which("chroot") or "/usr/sbin/chroot",
        str(context.root),
        python,
        "/app/main.py",
    ]
    return [timed(context, command)]


def _walk_then_daemon(context: Context) -> list[float]:
    action(context, "walk", context.root)
    pid = context.mounted.pid
    if pid is None:
        raise WorkloadError("daemon PID not found")
    rss_kib = pss_kib = 0
    # smaps_rollup's Rss and Pss: Pss splits shared pages (the interpreter, libraries) among
    # the processes mapping them, what a daemon of many costs the machine.
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Rss:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss_kib = int(line.split()[1])
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    return [rss_kib / 1024, pss_kib / 1024, float(descriptors)]


NULL_REQUESTS = 20000


def _podman_build(context: Context) -> list[float]:
    try:
        return [podman.build(context.mounted.system, context.timeout)]
    except subprocess.TimeoutExpired as error:
        raise WorkloadTimeout(f"podman build timed out after {error.timeout:.0f} s") from error
    except (RuntimeError, subprocess.CalledProcessError) as error:
        raise WorkloadError(str(error)) from error


def _null_requests(context: Context) -> list[float]:
    return [action(context, "null-requests", context.root, str(NULL_REQUESTS))]


def _lookup(context: Context) -> list[float]:
    return [action(context, "stat-all", context.root, context.dataset.stack_paths)]


def _append_mid(context: Context) -> list[float]:
    return [action(context, "append-byte", context.root / "mid.bin")]


def _append_sparse(context: Context) -> list[float]:
    return [action(context, "append-byte", context.root / "sparse.img")]


def _seq_write(size_mib: int) -> Callable[[Context], list[float]]:
    def run(context: Context) -> list[float]:
        target = context.root / "dest" / "written.bin"
        command = [
            "dd",
            "if=/dev/zero",
            f"of={target}",
            "bs=1M",
            f"count={size_mib}",
            "conv=fsync",
            "status=none",
        ]
        return [timed(context, command)]

    return run


def _fio(size_mib: int) -> Callable[[Context], list[float]]:
    def run(context: Context) -> list[float]:
        command = [
            "fio",
            "--name=randwrite",
            f"--filename={context.root / 'dest' / 'fio.dat'}",
            "--rw=randwrite",
            "--bs=4k",
            f"--size={size_mib}M",
            "--ioengine=psync",
            "--randrepeat=1",
            "--end_fsync=1",
            "--output-format=json",
        ]
        output = _run(context, command)
        report = json.loads(output[output.index("{") :])
        return [report["jobs"][0]["write"]["runtime"] / 1000.0]

    return run


def _untar(context: Context) -> list[float]:
    return [
        timed(
            context, ["tar", "-xf", str(context.dataset.tarball), "-C", str(context.root / "dest")]
        )
    ]


def _warm_tarball(context: Context) -> None:
    with open(context.dataset.tarball, "rb") as handle:
        while handle.read(1 << 20):
            pass


def all_workloads(scale: Scale) -> list[Workload]:
    """Every workload, in the order of the results table."""
    small = scale.name == "small"
    write_mib = 64 if small else 1024
    fio_mib = 16 if small else 128
    tree = "tree"
    workloads = [
        Workload("find-cold", "find, cold", tree, _find, cold=True, group="cold"),
        Workload("find-warm", "find, warm", tree, _find, prepare=twice(_find), group="warm"),
        Workload("stat-cold", "stat every path, cold", tree, _stat_tree, cold=True, group="cold"),
        Workload(
            "stat-warm",
            "stat every path, warm",
            tree,
            _stat_tree,
            prepare=twice(_stat_tree),
            group="warm",
        ),
        Workload(
            "ls-f-cold", "ls -f big directory, cold", "bigdir", _ls_f, cold=True, group="cold"
        ),
        Workload(
            "ls-l-cold", "ls -l big directory, cold", "bigdir", _ls_l, cold=True, group="cold"
        ),
        Workload(
            "ls-l-warm",
            "ls -l big directory, warm",
            "bigdir",
            _ls_l,
            prepare=twice(_ls_l),
            group="warm",
        ),
        Workload(
            "seqread-fresh",
            "sequential read big file, fresh mount",
            "bigfile",
            _read_big,
            cold=True,
            group="io",
        ),
        Workload(
            "seqread-reread",
            "sequential reread big file (page cache)",
            "bigfile",
            _read_big,
            prepare=twice(_read_big),
            group="warm",
        ),
        Workload(
            "seqwrite",
            f"sequential write {write_mib} MiB + fsync",
            "empty",
            _seq_write(write_mib),
            writable=True,
            group="io",
        ),
        Workload(
            "seqwrite-ext4",
            f"sequential write {write_mib} MiB + fsync, ext4 upper",
            "empty",
            _seq_write(write_mib),
            writable=True,
            upperfs="ext4",
            group="io",
        ),
        Workload(
            "fio-randwrite",
            f"fio 4k random writes, {fio_mib} MiB",
            "empty",
            _fio(fio_mib),
            writable=True,
            requires=("fio",),
            group="write",
        ),
        Workload(
            "copyup-mid",
            f"copy-up: append 1 byte to {scale.mid_file // MIB} MiB lower file",
            "midfile",
            _append_mid,
            writable=True,
            verify=_check_size("mid.bin", lambda data: data.scale.mid_file),
            group="copyup",
        ),
        Workload(
            "copyup-mid-ext4",
            f"copy-up: append 1 byte to {scale.mid_file // MIB} MiB lower file, ext4 upper",
            "midfile",
            _append_mid,
            writable=True,
            verify=_check_size("mid.bin", lambda data: data.scale.mid_file),
            upperfs="ext4",
            group="copyup",
        ),
        Workload(
            "untar",
            f"untar {scale.tar_files} small files",
            "empty",
            _untar,
            writable=True,
            verify=_check_untar,
            prepare=_warm_tarball,
            group="write",
        ),
        Workload(
            "untar-ext4",
            f"untar {scale.tar_files} small files, ext4 upper",
            "empty",
            _untar,
            writable=True,
            verify=_check_untar,
            upperfs="ext4",
            prepare=_warm_tarball,
            group="write",
        ),
        Workload(
            "container-cold",
            "container start (chroot + imports), cold",
            "rootfs",
            _container,
            cold=True,
            requires=("root", "chroot"),
            group="io",
        ),
        Workload(
            "container-warm",
            "container start (chroot + imports), warm",
            "rootfs",
            _container,
            prepare=twice(_container),
            requires=("root", "chroot"),
            group="warm",
        ),
        Workload(
            "chmod-R",
            "chmod -R of the lower tree",
            tree,
            quiet(["chmod", "-R", "g+w", "{root}/t"]),
            writable=True,
            verify=_check_chmod,
            rootless=True,
            group="meta",
        ),
        Workload(
            "chown-R",
            "chown -R of the lower tree",
            tree,
            quiet(["chown", "-R", "1234:1234", "{root}/t"]),
            writable=True,
            verify=_check_chown,
            rootless=True,
            requires=("root",),
            group="meta",
        ),
        Workload(
            "rm-rf",
            "rm -rf of the lower tree",
            tree,
            quiet(["rm", "-rf", "{root}/t"]),
            writable=True,
            verify=_check_removed,
            rootless=True,
            group="meta",
        ),
        Workload(
            "rename-dir",
            "rename of a lower directory (mv)",
            tree,
            quiet(["mv", "{root}/t", "{root}/t-renamed"]),
            writable=True,
            verify=_check_rename,
            rootless=True,
            group="meta",
        ),
        Workload(
            "sparse-copyup",
            f"copy-up of a sparse file ({scale.sparse_size >> 30} GiB apparent)",
            "sparse",
            _append_sparse,
            writable=True,
            verify=_check_size("sparse.img", lambda data: data.scale.sparse_size),
            rootless=True,
            group="meta",
        ),
    ]
    for count in lookup_counts(scale):
        workloads.append(
            Workload(
                f"lookup-{count}",
                f"lookup cost, {count} layer{'s' if count > 1 else ''}, cold",
                f"stack{count}",
                _lookup,
                cold=True,
                group="lookup",
            )
        )
    workloads.append(
        Workload(
            "podman-build",
            f"podman build adding {podman.FILES:,} files (mount_program)",
            "empty",
            _podman_build,
            systems=("fuse-overlayfs", "unionfs"),
            own_daemons=True,
            probe=podman.missing,
            group="container",
        )
    )
    workloads.append(
        Workload(
            "null-requests",
            f"{NULL_REQUESTS:,} GETXATTR of a missing xattr (a request's own cost)",
            "empty",
            _null_requests,
            daemon_only=True,
            group="daemon",
        )
    )
    workloads.append(
        Workload(
            "daemon",
            "daemon after walking the tree",
            tree,
            _walk_then_daemon,
            rows=("daemon-rss", "daemon-pss", "daemon-fds"),
            units=("MiB", "MiB", "fds"),
            daemon_only=True,
            group="daemon",
        )
    )
    return workloads


ROW_TITLES_EXTRA = {
    "daemon-rss": "daemon RSS after walking the tree",
    "daemon-pss": "daemon PSS after walking the tree",
    "daemon-fds": "daemon open fds after walking the tree",
    "lookup-growth": "lookup cost growth, 100 vs 2 layers (cold)",
}

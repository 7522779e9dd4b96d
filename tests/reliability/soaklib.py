"""Soak and load helpers: a mixed workload against one mount, sampled RSS/fd counts of the daemon,
and a model-checked random read/write/truncate exerciser.

``scripts/soak`` runs :func:`soak` for an hour (or ``--duration``); ``test_load.py`` runs it for a
minute and asserts that the daemon's fd count returns to its baseline once every file is closed
and that its RSS stops growing.

    python -m tests.reliability.soaklib --duration 3600 [--dir DIR] [--threads 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import mounts as mount_helpers
from tests.support.mounts import pid_from_log, unionfs_mounted


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sample:
    seconds: float
    rss_kib: int
    fds: int
    operations: int


@dataclass
class ExerciserResult:
    operations: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class FileModel:
    """One file's expected content, owned by one thread."""

    def __init__(self, path: Path, initial: bytes) -> None:
        self.path = path
        self.data = bytearray(initial)


def exercise(
    models: list[FileModel],
    seconds: float,
    seed: int,
    result: ExerciserResult,
    lock: threading.Lock,
    stop: threading.Event | None = None,
) -> None:
    """Random pwrite/pread/ftruncate/fsync/reopen on ``models`` (this thread's files only),
    every read checked against the model."""
    rng = random.Random(seed)
    fds: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    count = 0
    try:
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            index = rng.randrange(len(models))
            model = models[index]
            if index not in fds:
                fds[index] = os.open(model.path, os.O_RDWR)
            fd = fds[index]
            roll = rng.random()
            size = len(model.data)
            if roll < 0.4:
                offset = rng.randrange(0, size + 4096)
                data = rng.randbytes(rng.choice([1, 100, 4096, 70_000]))
                written = os.pwrite(fd, data, offset)
                assert written == len(data)
                if offset > size:
                    model.data.extend(b"\0" * (offset - size))
                model.data[offset : offset + len(data)] = data
            elif roll < 0.75:
                offset = rng.randrange(0, size + 1)
                length = rng.choice([1, 4096, 100_000])
                got = os.pread(fd, length, offset)
                want = bytes(model.data[offset : offset + length])
                if got != want:
                    with lock:
                        result.mismatches.append(
                            f"{model.path.name}: pread({length}, {offset}) differs from model"
                        )
            elif roll < 0.85:
                new_size = rng.randrange(0, size + 8192)
                os.ftruncate(fd, new_size)
                if new_size < size:
                    del model.data[new_size:]
                else:
                    model.data.extend(b"\0" * (new_size - size))
            elif roll < 0.9:
                os.fsync(fd)
            else:
                os.close(fds.pop(index))
            count += 1
    except OSError as error:
        with lock:
            result.errors.append(f"{error!r}")
    finally:
        for fd in fds.values():
            os.close(fd)
        with lock:
            result.operations += count


def check_models(models: list[FileModel]) -> list[str]:
    """Whole-file comparison (after a remount, say)."""
    problems = []
    for model in models:
        data = model.path.read_bytes()
        if data != bytes(model.data):
            problems.append(f"{model.path.name}: {len(data)} bytes, model {len(model.data)}")
    return problems


def mixed_workload(root: Path, seconds: float, seed: int, counter: list[int]) -> None:
    """Creates, writes, reads, renames, deletes, listings and copy-ups under ``root``; every
    file is closed again when an operation ends."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    work = root / f"w{seed}"
    work.mkdir(exist_ok=True)
    lower_files = sorted(p for p in root.glob("lower*/*") if p.is_file())
    names: list[Path] = []
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.3 or not names:
            path = work / f"f{rng.randrange(10**9)}"
            path.write_bytes(rng.randbytes(rng.choice([10, 5000, 200_000])))
            names.append(path)
        elif roll < 0.5:
            path = rng.choice(names)
            with open(path, "rb") as file:
                file.read()
        elif roll < 0.6:
            path = rng.choice(names)
            new = work / f"r{rng.randrange(10**9)}"
            os.rename(path, new)
            names[names.index(path)] = new
        elif roll < 0.75:
            path = names.pop(rng.randrange(len(names)))
            path.unlink()
        elif roll < 0.85:
            os.listdir(work)
            os.listdir(root)
        elif lower_files:
            path = rng.choice(lower_files)
            with open(path, "rb") as file:
                file.read(65536)
            if rng.random() < 0.2:
                os.utime(path)  # metadata copy-up
        counter[0] += 1
        if len(names) > 300:
            for path in names[:150]:
                path.unlink()
            del names[:150]
    for path in names:
        path.unlink()


def soak(
    base: Path,
    duration: float,
    *,
    threads: int = 3,
    sample_every: float = 10.0,
    print_samples: bool = False,
) -> tuple[list[Sample], int, int, list[str]]:
    """Mount, run the mixed workload in ``threads`` threads for ``duration`` seconds while
    sampling the daemon. Returns (samples, fds at baseline, fds after all closed, problems)."""
    lower = base / "lower"
    (lower / "lower1").mkdir(parents=True, exist_ok=True)
    for index in range(50):
        (lower / "lower1" / f"l{index}").write_bytes(os.urandom(20_000))
    upper, workdir, mnt = base / "upper", base / "work", base / "mnt"
    mnt.mkdir(exist_ok=True)
    log = base / "daemon.log"
    problems: list[str] = []
    samples: list[Sample] = []
    # The helpers' watchdog declares a mount held longer than a test's timeout hung.
    mount_helpers.watchdog_seconds = max(mount_helpers.watchdog_seconds, duration + 300)
    with unionfs_mounted([lower], mnt, upper=upper, workdir=workdir, log=log):
        pid = pid_from_log(log)
        assert pid is not None
        os.listdir(mnt)
        baseline_fds = fd_count(pid)
        counter = [0]
        workers = [
            threading.Thread(
                target=_guarded, args=(mixed_workload, mnt, duration, seed, counter, problems)
            )
            for seed in range(threads)
        ]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            time.sleep(min(sample_every, max(0.1, duration / 20)))
            sample = Sample(time.monotonic() - started, vm_rss_kib(pid), fd_count(pid), counter[0])
            samples.append(sample)
            if print_samples:
                print(
                    f"t={sample.seconds:7.1f}s rss={sample.rss_kib / 1024:7.1f} MiB "
                    f"fds={sample.fds:4d} ops={sample.operations}",
                    flush=True,
                )
        for worker in workers:
            worker.join()
        time.sleep(0.5)  # releases are asynchronous
        final_fds = fd_count(pid)
    return samples, baseline_fds, final_fds, problems


def _guarded(
    function: object, root: Path, duration: float, seed: int, counter: list[int], out: list[str]
) -> None:
    try:
        function(root, duration, seed, counter)  # type: ignore[operator]
    except Exception as error:  # a worker's failure is a finding, not a crash of the run
        out.append(f"worker {seed}: {error!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--sample-every", type=float, default=30.0)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        base = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        base.mkdir(parents=True, exist_ok=True)
        print(f"soak: {args.duration:.0f} s, {args.threads} threads, in {base}", flush=True)
        samples, baseline, final, problems = soak(
            base,
            args.duration,
            threads=args.threads,
            sample_every=args.sample_every,
            print_samples=True,
        )
        if args.dir is not None:
            for name in ("upper", "work"):
                shutil.rmtree(base / name, ignore_errors=True)
    first = samples[len(samples) // 4] if samples else None
    last = samples[-1] if samples else None
    print(f"soak: {last.operations if last else 0} operations; fds {baseline} at start, {final}")
    if first and last:
        print(
            f"soak: RSS {first.rss_kib / 1024:.1f} MiB at t={first.seconds:.0f}s, "
            f"{last.rss_kib / 1024:.1f} MiB at the end; peak "
            f"{max(s.rss_kib for s in samples) / 1024:.1f} MiB; peak fds "
            f"{max(s.fds for s in samples)}"
        )
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems or final > baseline + args.threads + 4 else 0


if __name__ == "__main__":
    sys.exit(main())

"""Count the FUSE requests a command causes on each FUSE system (a profiling aid).

    python -m benchmarks.requests [--small] [--stack tree] [--warm] [--systems a,b] -- CMD ARG...

``{root}`` in CMD is replaced by the mount's root. Each system is mounted in the foreground
with libfuse's debug output (fuse-overlayfs ``-d``, unionfs ``-f --debug``, unionfs-fuse
``-d``), CMD runs once untimed first when ``--warm`` is given, and the request lines libfuse
prints (``unique: N, opcode: LOOKUP (1), ...``) during the measured run are counted by opcode.
Same libfuse, same format: the counts compare request for request.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import dataset
from benchmarks.runner import drop_caches, remove_scratch
from benchmarks.systems import ALL_SYSTEMS, REPO, FuseDaemon, abort_fuse, is_mounted

OPCODE = re.compile(rb"opcode: (\w+)")


def _command(system: str, stack: dataset.Stack, upper: Path, work: Path, mnt: Path) -> list[str]:
    daemon = ALL_SYSTEMS.get(system)
    if not isinstance(daemon, FuseDaemon):
        raise SystemExit(f"requests: unknown FUSE system {system}")
    return daemon.command(stack, upper, work, mnt, True)


def count(
    system: str, stack: dataset.Stack, command: list[str], warm: bool, cold: bool
) -> tuple[collections.Counter[str], float]:
    base = Path(tempfile.mkdtemp(prefix=f"requests-{system}-", dir="/dev/shm"))
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for path in (upper, work, mnt):
        path.mkdir()
    log_path = base / "debug.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            _command(system, stack, upper, work, mnt),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"requests: {system} did not mount; see {log_path}")
            time.sleep(0.02)
        concrete = [part.replace("{root}", str(mnt)) for part in command]
        if warm:
            subprocess.run(concrete, stdout=subprocess.DEVNULL, check=False, timeout=600)
        if cold:
            drop_caches()
        time.sleep(0.2)
        offset = os.path.getsize(log_path)
        started = time.perf_counter()
        subprocess.run(concrete, stdout=subprocess.DEVNULL, check=False, timeout=600)
        elapsed = time.perf_counter() - started
        time.sleep(0.3)
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            counts = collections.Counter(
                match.group(1).decode() for match in OPCODE.finditer(handle.read())
            )
        return counts, elapsed
    finally:
        for unmount in (["fusermount3", "-u", str(mnt)], ["fusermount3", "-uz", str(mnt)]):
            if is_mounted(mnt):
                subprocess.run(unmount, capture_output=True, check=False, timeout=30)
        if is_mounted(mnt):
            abort_fuse(mnt)
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        remove_scratch(base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.requests", description=__doc__)
    parser.add_argument("--small", action="store_true")
    parser.add_argument(
        "--stack", default="tree", help="tree, bigdir, bigfile, rootfs, stack100..."
    )
    parser.add_argument("--warm", action="store_true", help="run CMD once untimed first")
    parser.add_argument("--cold", action="store_true", help="drop caches before the counted run")
    parser.add_argument("--systems", default="fuse-overlayfs,unionfs")
    parser.add_argument("command", nargs="+", help="command; {root} is the mount's root")
    arguments = parser.parse_args(argv)
    data = dataset.ensure(dataset.SMALL if arguments.small else dataset.FULL)
    stack = data.stack(arguments.stack)
    systems = [name for name in arguments.systems.split(",") if name]
    results = {}
    for system in systems:
        results[system] = count(system, stack, arguments.command, arguments.warm, arguments.cold)
    opcodes = sorted(
        {op for counts, _ in results.values() for op in counts},
        key=lambda op: -max(results[s][0][op] for s in systems),
    )
    print(f"{'opcode':<16}" + "".join(f"{s:>16}" for s in systems))
    for op in opcodes:
        print(f"{op:<16}" + "".join(f"{results[s][0][op]:>16}" for s in systems))
    print(f"{'total':<16}" + "".join(f"{sum(results[s][0].values()):>16}" for s in systems))
    print(f"{'seconds (debug)':<16}" + "".join(f"{results[s][1]:>16.3f}" for s in systems))
    return 0


if __name__ == "__main__":
    sys.exit(main())

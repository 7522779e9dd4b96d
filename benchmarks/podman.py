"""``podman build`` of a Containerfile that adds ~900 files, with a FUSE daemon as podman's
overlay ``mount_program`` (unionfs or fuse-overlayfs): what a user's image build costs.

Each build gets a private, short-lived store (``/tmp/pb-XXXX``: long store paths make podman
wait out conmon timeouts) configured by ``scripts/containers-podman-config``, with its
``mount_program`` set to the system's daemon. The Containerfile has no RUN step (no container
runtime needed): ``FROM scratch`` and two COPY steps of 450 files each, so the second step's
container mounts the first step's layer as a lower one. The store is reset and removed after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.systems import REPO, unionfs_python
from unionfs import mountinfo

DIRECTORIES = 30
FILES_PER_DIRECTORY = 15  # per COPY step: 2 x 30 x 15 = 900 files
FILES = 2 * DIRECTORIES * FILES_PER_DIRECTORY
CONTAINERFILE = "FROM scratch\nCOPY one /one\nCOPY two /two\n"


def missing() -> str | None:
    """Why podman builds cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (a rootful podman store)"
    if shutil.which("podman") is None:
        return "podman not installed (scripts/containers-setup installs it)"
    return None


def mount_program(system: str) -> str:
    if system == "unionfs":
        program = Path(unionfs_python()).parent / "unionfs"
        if not program.exists():
            raise RuntimeError(f"{program} missing (scripts/setup makes it)")
        return str(program)
    if system == "fuse-overlayfs":
        found = shutil.which("fuse-overlayfs")
        if found is None:
            raise RuntimeError("fuse-overlayfs not installed")
        return found
    raise RuntimeError(f"no podman mount_program for {system}")


def make_context(directory: Path) -> None:
    """The build context: the Containerfile and 900 small files in two trees."""
    (directory / "Containerfile").write_text(CONTAINERFILE)
    for part in ("one", "two"):
        for index in range(DIRECTORIES):
            subdirectory = directory / part / f"d{index:02d}"
            subdirectory.mkdir(parents=True)
            for number in range(FILES_PER_DIRECTORY):
                (subdirectory / f"f{number:03d}.txt").write_text(f"{part} {index} {number}\n" * 8)


def _environment(store: Path, program: str) -> dict[str, str]:
    printed = subprocess.run(
        [str(REPO / "scripts" / "containers-podman-config"), str(store)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    configuration = store / "storage.conf"
    lines = [
        f'mount_program = "{program}"' if line.startswith("mount_program") else line
        for line in configuration.read_text().splitlines()
    ]
    configuration.write_text("\n".join(lines) + "\n")
    environment = dict(os.environ)
    for assignment in printed.replace("export ", "").split():
        name, _, value = assignment.partition("=")
        environment[name] = value.strip("'")
    environment["TMPDIR"] = str(store / "tmp")
    (store / "tmp").mkdir(exist_ok=True)
    return environment


def _unmount_below(directory: Path) -> None:
    prefix = str(directory).rstrip("/") + "/"
    found = [mountpoint for mountpoint in mountinfo.mount_points() if mountpoint.startswith(prefix)]
    for mountpoint in sorted(found, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)


def build(system: str, timeout: float) -> float:
    """Seconds of one ``podman build`` with SYSTEM as mount_program, in a fresh store."""
    program = mount_program(system)
    store = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    try:
        environment = _environment(store, program)
        context = store / "ctx"
        context.mkdir()
        make_context(context)

        def podman(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            done = subprocess.run(
                ["podman", *arguments],
                env=environment,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                cwd=store,
            )
            if check and done.returncode != 0:
                detail = (done.stderr.strip() or done.stdout.strip())[-300:]
                raise RuntimeError(f"podman {arguments[0]}: exit {done.returncode}: {detail}")
            return done

        started = time.perf_counter()
        podman("build", "-q", "-t", "localhost/bench-build", "-f", "Containerfile", str(context))
        elapsed = time.perf_counter() - started
        image = podman("image", "inspect", "--format", "{{len .RootFS.Layers}}", "bench-build")
        if image.stdout.strip() != "2":
            raise RuntimeError(f"built image has {image.stdout.strip()} layers, not 2")
        return elapsed
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(
                ["podman", "system", "reset", "-f"],
                env=_environment_for_cleanup(store),
                capture_output=True,
                timeout=120,
                check=False,
            )
        _unmount_below(store)
        shutil.rmtree(store, ignore_errors=True)


def _environment_for_cleanup(store: Path) -> dict[str, str]:
    return dict(
        os.environ,
        CONTAINERS_CONF=str(store / "containers.conf"),
        CONTAINERS_STORAGE_CONF=str(store / "storage.conf"),
        TMPDIR=str(store / "tmp"),
    )
